"""A drain that can never finish backs off, and ends: the real coordinator and agent.

Node A runs the real cluo-agent (its console script, its node's credential, the private
system bus with update_engine and logind mocks) with two pods that a PodDisruptionBudget
at ``minAvailable = replicas`` keeps from ever leaving: each drain times out. Node B, which
also needs a reboot, is played by a stand-in agent (testbed/fake_agents.py). The real
cluo-coord runs with a short backoff and two attempts: A's failed drains are counted on
the Node, B is granted while A backs off, A is granted again only after its
``drain-retry-at``, and after the second failure A is out of the roll, visibly (its
annotations, a DrainBlocked Event, the ``cluo_nodes_out_of_roll`` gauge), until
``cluo-coord retry A`` puts it back.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client import (
    CoreV1Api,
    PolicyV1Api,
    V1LabelSelector,
    V1ObjectMeta,
    V1PodDisruptionBudget,
    V1PodDisruptionBudgetSpec,
)

from cluo.kube.objects import api_time
from cluo.protocol import Keys
from testbed.agent_host import AgentProcess, HostDir
from testbed.controlplane import ControlPlane
from testbed.coordinator import COORD, NAMESPACE, CoordProcess
from testbed.dbus_bus import MockService
from testbed.fake_agents import FakeAgents
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for
from tests.kube import test_coordinator as coordinator_tests
from tests.kube.test_agent import NEED_REBOOT, make_pod

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEYS = Keys()
SELECTOR_LABEL = "cluo-drain-backoff-test"
STAND_IN_LABEL = "cluo-stand-in"  # the nodes FakeAgents plays
EVENT_NAMESPACE = "default"  # where Node Events go (cluo.kube.nodes)
TIMEOUT = 90.0
DRAIN_TIMEOUT = "2s"
DRAIN_BACKOFF = "6s"


@pytest.fixture(scope="module")
def coord_kubeconfig(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    """A real cluo-coord ServiceAccount token (RBAC from deploy/), and the admission
    policy that confines the agent to its own keys, as in a cluster running cluo."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "coordinator-rbac.yaml"))
    control_plane.apply_agent_policy()
    path = tmp_path_factory.mktemp("coord") / "kubeconfig"
    return control_plane.service_account_kubeconfig(NAMESPACE, "cluo-coord", path)


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    """The emulated nodes, deleted afterwards."""
    with KubeletEmulator(kube_admin, heartbeat_interval=2.0, grace_period_scale=0.05) as k:
        try:
            yield k
        finally:
            k.stop(delete_nodes=True)


@pytest.fixture
def free_slots(kube_admin: kubernetes.client.ApiClient) -> Iterator[None]:
    """No slot Lease in the coordinator's namespace before the test, and none after it
    (A ends holding slot 0), as the coordinator tests' rig leaves them: test order does
    not matter."""
    coordinator_tests._clean_leases(kube_admin)
    try:
        yield
    finally:
        coordinator_tests._clean_leases(kube_admin)


def budget_keeping_every_pod(admin: kubernetes.client.ApiClient, namespace: str) -> None:
    """minAvailable = replicas over the app=web pods: no eviction is ever allowed."""
    policy = PolicyV1Api(admin)
    policy.create_namespaced_pod_disruption_budget(namespace, V1PodDisruptionBudget(
        metadata=V1ObjectMeta(name="web"),
        spec=V1PodDisruptionBudgetSpec(min_available=2,
                                       selector=V1LabelSelector(match_labels={"app": "web"}))))

    def processed() -> bool:
        status = policy.read_namespaced_pod_disruption_budget("web", namespace).status
        return bool(status and status.current_healthy == 2 and status.disruptions_allowed == 0)

    wait_for(processed, TIMEOUT, "the disruption controller to process the budget")


def slot_grants(coord: CoordProcess) -> list[tuple[str, datetime]]:
    """Each slot the coordinator took, in order: the node and when (its log line; a slot
    handed over from a finished node is taken too)."""
    grants = []
    for entry in coord.entries():
        if entry.get("msg") in ("reboot slot taken", "reboot slot handed over"):
            at = datetime.fromisoformat(entry["time"])
            grants.append((entry["node"], at))
    return grants


def test_a_drain_that_cannot_finish_backs_off_lets_others_go_and_ends_out_of_the_roll(
    control_plane: ControlPlane,
    kube_admin: kubernetes.client.ApiClient,
    coord_kubeconfig: Path,
    kubelet: KubeletEmulator,
    free_slots: None,
    update_engine_mock: MockService,
    logind_mock: MockService,
    system_bus_address: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    core = CoreV1Api(kube_admin)
    test_id = uuid.uuid4().hex[:8]
    selector = f"{SELECTOR_LABEL}={test_id}"
    host = HostDir(tmp_path / "host")
    a = kubelet.add_node(f"a-{test_id}", labels={SELECTOR_LABEL: test_id},
                         boot_id=host.boot_id).name
    b = kubelet.add_node(f"b-{test_id}", labels={SELECTOR_LABEL: test_id,
                                                 STAND_IN_LABEL: "true"}).name
    for pod in ("web-a", "web-b"):
        core.create_namespaced_pod(namespace, make_pod(pod, a))
    wait_for(lambda: all(core.read_namespaced_pod(p, namespace).status.phase == "Running"
                         for p in ("web-a", "web-b")), TIMEOUT, "both pods on A Running")
    budget_keeping_every_pod(kube_admin, namespace)

    agent = AgentProcess(a, control_plane.node_kubeconfig(a, tmp_path / "kubelet.conf"),
                         system_bus_address, host, tmp_path / "agent.log",
                         extra_args=("--drain-timeout", DRAIN_TIMEOUT))
    agent.start()
    update_engine_mock.mock.SetStatus(*NEED_REBOOT)  # A waits since 1_700_000_000
    wait_for(lambda: annotations(core, a).get(KEYS.reboot_needed) == "true", TIMEOUT,
             "the agent on A to announce its reboot")
    # B has waited less long: without the backoff, A would always be granted first.
    core.patch_node(b, {"metadata": {"annotations": {
        KEYS.reboot_needed: "true", KEYS.last_checked_time: "1700000500"}}})

    coord = CoordProcess.start(
        coord_kubeconfig, selector, tmp_path / "coord.log", identity="coord",
        leader_elect=False, namespace=NAMESPACE,
        flags=("--drain-backoff", DRAIN_BACKOFF, "--drain-backoff-max", DRAIN_BACKOFF,
               "--max-drain-attempts", "2"))
    try:
        with FakeAgents(control_plane, kubelet, f"{selector},{STAND_IN_LABEL}=true") as agents:
            # First failure: recorded on the Node with a retry time; B goes next.
            wait_for(lambda: annotations(core, a).get(KEYS.drain_failures) == "1", TIMEOUT,
                     "the coordinator to record A's first failed drain")
            retry_at = api_time(annotations(core, a)[KEYS.drain_retry_at])
            assert retry_at is not None
            wait_for(lambda: annotations(core, b).get(KEYS.reboot_needed) == "false",
                     TIMEOUT, "B, waiting, to be granted and rebooted while A backs off")

            # Second failure: out of the roll, with no retry time.
            wait_for(lambda: annotations(core, a).get(KEYS.drain_failures) == "2", TIMEOUT,
                     "the coordinator to record A's second failed drain")
            assert KEYS.drain_retry_at not in annotations(core, a)
            wait_for(lambda: coord.metric("cluo_nodes_out_of_roll") == 1.0, TIMEOUT,
                     "cluo_nodes_out_of_roll to count A")
            assert agents.errors == []

        grants = slot_grants(coord)
        assert [node for node, _ in grants] == [a, b, a]
        assert grants[2][1] >= retry_at, "A was granted again before its drain-retry-at"
        blocked = node_events(core, a, "DrainBlocked")
        assert [e.type for e in blocked] == ["Warning", "Warning"]
        assert "Drain attempt 1 of 2 failed: drain timed out after 2s" in blocked[0].message
        assert "Next attempt not before" in blocked[0].message
        assert "Drain attempt 2 of 2 failed" in blocked[1].message
        assert f"cluo-coord retry {a}" in blocked[1].message
        assert coord.metric('cluo_events_total{reason="DrainBlocked",type="Warning"}') == 2.0
        wait_for(lambda: annotations(core, a).get(KEYS.blocked_reason) is None, TIMEOUT,
                 "the agent on A to clear its blocked-reason once the grant is taken back")
        assert coord.metric("cluo_nodes_in_drain_backoff") == 0.0

        # The operator puts A back: it is granted again.
        done = subprocess_retry(control_plane, a)
        assert done.returncode == 0, done.stderr
        assert KEYS.drain_failures not in annotations(core, a)
        wait_for(lambda: [node for node, _ in slot_grants(coord)] == [a, b, a, a], TIMEOUT,
                 "A to take a reboot slot again after cluo-coord retry")
        assert coord.metric("cluo_nodes_out_of_roll") == 0.0
    finally:
        coord.stop()
        agent.kill()
        for pod in core.list_namespaced_pod(namespace).items:
            core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)


def annotations(core: CoreV1Api, name: str) -> dict[str, str]:
    return dict(core.read_node(name).metadata.annotations or {})


def node_events(core: CoreV1Api, name: str, reason: str) -> list[kubernetes.client.CoreV1Event]:
    items = core.list_namespaced_event(
        EVENT_NAMESPACE, field_selector=f"involvedObject.name={name},reason={reason}").items
    return sorted(items, key=lambda e: e.metadata.creation_timestamp)


def subprocess_retry(control_plane: ControlPlane, node: str
                     ) -> subprocess.CompletedProcess[str]:
    """``cluo-coord retry NODE`` with the admin's kubeconfig."""
    return subprocess.run(
        [str(COORD), "retry", node, "--kubeconfig", str(control_plane.admin_kubeconfig)],
        capture_output=True, text=True, timeout=30, check=False)
