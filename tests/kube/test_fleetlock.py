"""cluo-coord's FleetLock server against Zincati's own FleetLock client code.

The real cluo-coord (its console script, the deploy/ RBAC plus deploy/fleetlock-rbac.yaml)
runs with ``--fleetlock-address``; the FleetLock client is the harness built from the
zincati crate's ``src/fleet_lock/mod.rs`` (hack/build-fleetlock-client.sh,
testbed/fleetlock_client.py), and `ZincatiHost` plays Zincati's fleet_lock strategy on an
emulated host (steady-state, pre-reboot until yes, reboot, steady-state until yes).
The requests Zincati never sends (no header, bad JSON, GET) are sent by hand.

- every way a request is refused: the answer is the protocol's JSON error, its kind read
  by Zincati's client as the server's (not a generic HTTP error);
- another holder: a second client waits, the holder asking again gets yes again;
- pre-reboot answered yes only once the node is cordoned and its pods evicted (checked
  from the cluster at the moment of the yes), the client found by the machine id the
  kubelet reports, derived as systemd does (``systemd-id128 -a``); then the reboot is
  proven by the new boot id and the node is uncordoned (by the planner's reset) and
  released;
- a pod a PodDisruptionBudget keeps: never a yes, the drain times out and the grant goes
  back, counted as a failed drain (the planner's backoff);
- a coordinator stopped mid-drain: the next one resumes the cycle from the node's marks,
  with no request from the client, and the drain ends;
- a roll mixing stand-in cluo-agent nodes and FleetLock clients under one
  ``--max-concurrent 1``: never two in flight across both kinds (testbed/recorder.py).
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import CoreV1Api, PolicyV1Api

from cluo.protocol import Keys
from testbed.controlplane import ControlPlane, free_port
from testbed.coordinator import CoordProcess
from testbed.fake_agents import FakeAgents
from testbed.fleetlock_client import FleetLockClient, Reply, ZincatiHost, find_fleetlock_client
from testbed.recorder import InFlightRecorder
from testbed.waiting import wait_for
from tests.kube.test_agent import make_pod
from tests.kube.test_coordinator import NAMESPACE, SELECTOR_LABEL, Rig, recorder, rig
from tests.kube.test_drain_backoff import budget_keeping_every_pod

__all__ = ["recorder", "rig"]  # the fixtures of tests/kube/test_coordinator.py

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEYS = Keys()
ZINCATI_APP_ID = "de35106b6ec24688b63afddaa156679b"  # Zincati's src/identity/mod.rs
STAND_IN_LABEL = "cluo-stand-in"  # the nodes FakeAgents plays
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def coord_kubeconfig(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    """cluo-coord's ServiceAccount token, with the deploy/ RBAC and FleetLock's."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "coordinator-rbac.yaml"),
                          "-f", str(DEPLOY / "fleetlock-rbac.yaml"))
    path = tmp_path_factory.mktemp("coord") / "kubeconfig"
    return control_plane.service_account_kubeconfig(NAMESPACE, "cluo-coord", path)


@pytest.fixture(scope="module")
def client_binary() -> Path:
    return find_fleetlock_client()


def start(rig: Rig, binary: Path, *flags: str) -> tuple[CoordProcess, FleetLockClient]:
    port = free_port()
    coord = rig.start("--fleetlock-address", f"127.0.0.1:{port}", *flags)
    return coord, FleetLockClient(binary, f"http://127.0.0.1:{port}/")


def fleetlock_node(rig: Rig, name: str, client_id: str) -> str:
    """A node of the rig whose FleetLock client id is set by annotation."""
    rig.emulator.add_node(name, labels={SELECTOR_LABEL: rig.test_id})
    rig.annotate(name, {KEYS.fleetlock_id: client_id})
    wait_for(lambda: rig.node(name).status.node_info.boot_id, 20, f"{name} to report a bootID")
    return name


def raw_request(client: FleetLockClient, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    host_port = client.base_url.removeprefix("http://").rstrip("/")
    connection = http.client.HTTPConnection(host_port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def test_protocol_errors_are_fleetlock_errors_and_a_second_client_waits_for_the_holder(
    rig: Rig, client_binary: Path,
) -> None:
    a = fleetlock_node(rig, f"fa{rig.test_id}", "a" * 32)
    b = fleetlock_node(rig, f"fb{rig.test_id}", "b" * 32)
    _, client = start(rig, client_binary)
    body = json.dumps({"client_params": {"id": "a" * 32, "group": "default"}}).encode()
    protocol = {"fleet-lock-protocol": "true"}

    status, error = raw_request(client, "GET", "/v1/pre-reboot", b"", protocol)
    assert (status, error["kind"]) == (405, "method_not_allowed")
    status, error = raw_request(client, "POST", "/v1/pre-reboot", body, {})
    assert (status, error["kind"]) == (400, "missing_protocol_header")
    status, error = raw_request(client, "POST", "/v1/pre-reboot", b'{"client_params": {',
                                protocol)
    assert (status, error["kind"]) == (400, "bad_request")
    unknown = client.ask("c" * 32, "default", "pre-reboot")
    assert (unknown.ok, unknown.status, unknown.kind) == (False, 404, "unknown_client")
    assert KEYS.fleetlock_id in unknown.value and "c" * 32 in unknown.value

    # a asks until it holds the slot and is drained (it has no pods): yes.
    first = client.ask("a" * 32, "default", "pre-reboot")
    assert (first.ok, first.status) == (False, 409)
    yes = wait_for(lambda: (r := client.ask("a" * 32, "default", "pre-reboot")).ok and r,
                   TIMEOUT, "a's pre-reboot to be answered yes")
    assert isinstance(yes, Reply)
    annotations = rig.annotations(a)
    assert annotations[KEYS.reboot_reason] == f"FleetLock pre-reboot from {'a' * 32}"
    assert annotations[KEYS.fleetlock_client] == "a" * 32
    # Queued by the time of its first pre-reboot, as an agent node by its update check.
    assert abs(int(annotations[KEYS.last_checked_time]) - time.time()) < TIMEOUT
    assert rig.node(a).spec.unschedulable
    # Another holder: b waits for the one slot; the holder asking again gets yes again.
    for _ in range(3):
        other = client.ask("b" * 32, "default", "pre-reboot")
        assert (other.ok, other.status, other.kind) == (False, 409, "waiting_for_slot")
        assert client.ask("a" * 32, "default", "pre-reboot").ok
    assert rig.annotations(b).get(KEYS.reboot_ok) != "true"
    # The holder cannot give back a slot it is rebooting with; b, which only waited, can:
    # it withdraws its reboot.
    held = client.ask("a" * 32, "default", "steady-state")
    assert (held.ok, held.status, held.kind) == (False, 409, "slot_held")
    assert client.ask("b" * 32, "default", "steady-state").ok
    wait_for(lambda: rig.annotations(b).get(KEYS.reboot_needed) == "false", TIMEOUT,
             "b's withdrawn reboot to read reboot-needed=false")


def _pods_on(core: CoreV1Api, node: str) -> list[str]:
    pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
    return [f"{p.metadata.namespace}/{p.metadata.name}" for p in pods]


@pytest.mark.skipif(shutil.which("systemd-id128") is None, reason="needs systemd-id128")
def test_pre_reboot_is_answered_only_once_the_node_is_cordoned_and_drained(
    rig: Rig, client_binary: Path, namespace: str,
) -> None:
    core = rig.core
    name = f"fz{rig.test_id}"
    node = rig.emulator.add_node(name, labels={SELECTOR_LABEL: rig.test_id})
    # This host's machine id as the node's, as its kubelet would report it; the client id
    # is what systemd derives from it for Zincati, as Zincati does on that host.
    machine_id = Path("/etc/machine-id").read_text().strip()
    core.patch_node_status(name, {"status": {"nodeInfo": {"machineID": machine_id}}})
    client_id = subprocess.run(["systemd-id128", "-a", ZINCATI_APP_ID, "machine-id"],
                               capture_output=True, text=True, check=True).stdout.strip()
    for pod in ("web-a", "web-b"):
        core.create_namespaced_pod(namespace, make_pod(pod, name, grace=2))
    wait_for(lambda: all(core.read_namespaced_pod(p, namespace).status.phase == "Running"
                         for p in ("web-a", "web-b")), TIMEOUT, "the pods to run")
    coord, client = start(rig, client_binary)
    seen_at_yes: dict[str, Any] = {}

    def at_yes() -> None:
        seen = rig.node(name)
        seen_at_yes.update(pods=_pods_on(core, name), cordoned=seen.spec.unschedulable,
                           boot_id=seen.status.node_info.boot_id,
                           recorded=(seen.metadata.annotations or {}).get(
                               KEYS.boot_id_before_reboot))

    host = ZincatiHost(client, node, client_id, on_granted=at_yes)
    with host:
        wait_for(lambda: host.finished or host.error, TIMEOUT,
                 "the Zincati host to be told yes, reboot and reach steady state")
    assert not host.error, host.error
    assert seen_at_yes["pods"] == [], "pre-reboot answered yes with pods still on the node"
    assert seen_at_yes["cordoned"], "pre-reboot answered yes on a schedulable node"
    assert seen_at_yes["recorded"] == seen_at_yes["boot_id"], "no boot id recorded"
    refusals = [r for r in host.replies("pre-reboot") if not r.ok]
    assert refusals and {r.kind for r in refusals} <= {"waiting_for_slot", "draining"}
    # steady-state said no while the slot was held, after the reboot, until released.
    after = [r for r in host.replies("steady-state") if r.at > (host.rebooted_at or 0)]
    assert after[-1].ok and all(r.kind == "slot_held" for r in after[:-1])
    wait_for(lambda: rig.done(name) and not rig.node(name).spec.unschedulable
             and KEYS.fleetlock_client not in rig.annotations(name), TIMEOUT,
             "the FleetLock node's cycle to end: released, uncordoned, unmarked")
    for reason in ("RebootNeeded", "RebootGranted", "Rebooting", "Rebooted", "RebootFinished"):
        assert rig.events(name, reason), f"no {reason} Event from cluo-coord"
    # The planner's reset uncordoned the node (the agent's part has nothing left to undo).
    assert any("node uncordoned" in event.message
               for event in rig.events(name, "RebootFinished"))
    assert not rig.events(name, "Uncordoned")
    assert coord.metric('cluo_fleetlock_requests_total{endpoint="pre-reboot",result="ok"}') \
        == len(host.replies("pre-reboot")) - len(refusals)


def node_with_kept_pods(rig: Rig, admin: kubernetes.client.ApiClient, namespace: str,
                        name: str, client_id: str) -> str:
    """A FleetLock node running pods web-a and web-b, which a budget keeps from leaving."""
    fleetlock_node(rig, name, client_id)
    for pod in ("web-a", "web-b"):
        rig.core.create_namespaced_pod(namespace, make_pod(pod, name, grace=2))
    budget_keeping_every_pod(admin, namespace)
    return name


def test_a_pod_a_budget_keeps_means_no_yes_and_the_drain_times_out(
    rig: Rig, client_binary: Path, kube_admin: kubernetes.client.ApiClient, namespace: str,
) -> None:
    core = rig.core
    name = node_with_kept_pods(rig, kube_admin, namespace, f"fp{rig.test_id}", "d" * 32)
    _, client = start(rig, client_binary, "--fleetlock-drain-timeout", "3s")
    host = ZincatiHost(client, rig.emulator.node(name), "d" * 32)
    with host:
        wait_for(lambda: rig.annotations(name).get(KEYS.drain_failures) == "1", TIMEOUT,
                 "the timed-out drain to be counted as a failed drain")
        wait_for(lambda: not rig.node(name).spec.unschedulable, TIMEOUT,
                 "the node to be uncordoned after the aborted drain")
    assert not host.error, host.error
    replies = host.replies("pre-reboot")
    assert not any(r.ok for r in replies), "pre-reboot answered yes with pods left"
    assert "draining" in {r.kind for r in replies}
    assert sorted(_pods_on(core, name)) == [f"{namespace}/web-a", f"{namespace}/web-b"]
    assert rig.events(name, "DrainTimedOut")


def test_a_new_coordinator_resumes_the_cycle_from_the_node_without_a_request(
    rig: Rig, client_binary: Path, kube_admin: kubernetes.client.ApiClient, namespace: str,
) -> None:
    core = rig.core
    name = node_with_kept_pods(rig, kube_admin, namespace, f"fr{rig.test_id}", "e" * 32)
    first, client = start(rig, client_binary)
    wait_for(lambda: client.ask("e" * 32, "default", "pre-reboot").kind == "draining",
             TIMEOUT, "the first coordinator to drain the node")
    first.stop()
    annotations = rig.annotations(name)
    assert annotations[KEYS.reboot_in_progress] == "true"
    assert annotations[KEYS.fleetlock_client] == "e" * 32
    assert KEYS.boot_id_before_reboot not in annotations
    assert rig.node(name).spec.unschedulable
    PolicyV1Api(kube_admin).delete_namespaced_pod_disruption_budget("web", namespace)
    # The client asks nothing: the new coordinator finds the node's mark and goes on.
    _, client = start(rig, client_binary)
    boot_id = rig.node(name).status.node_info.boot_id
    wait_for(lambda: rig.annotations(name).get(KEYS.boot_id_before_reboot) == boot_id,
             TIMEOUT, "the new coordinator to finish the drain and record the boot id")
    assert _pods_on(core, name) == []
    assert client.ask("e" * 32, "default", "pre-reboot").ok


def test_a_roll_of_agent_nodes_and_fleetlock_clients_has_one_node_in_flight(
    rig: Rig, client_binary: Path, recorder: InFlightRecorder,
) -> None:
    agent_nodes = [f"ca{rig.test_id}-{i}" for i in range(2)]
    rig.emulator.add_nodes(agent_nodes, labels={SELECTOR_LABEL: rig.test_id,
                                                STAND_IN_LABEL: "true"})
    for node in agent_nodes:
        rig.annotate(node, {KEYS.reboot_needed: "true"})
    clients = {fleetlock_node(rig, f"cf{rig.test_id}-{i}", f"{i:032x}"): f"{i:032x}"
               for i in (1, 2)}
    _, client = start(rig, client_binary, "--max-concurrent", "1")
    # Each client's yes comes while its node holds a reboot slot, as an agent's reboot.
    holding_at_yes: dict[str, bool] = {}

    def at_yes(node: str) -> None:
        holding_at_yes[node] = node in rig.slot_holders().values()

    hosts = [ZincatiHost(client, rig.emulator.node(node), client_id,
                         on_granted=lambda node=node: at_yes(node))  # type: ignore[misc]
             for node, client_id in clients.items()]
    with FakeAgents(rig.control_plane, rig.emulator,
                    f"{rig.selector},{STAND_IN_LABEL}=true") as agents, \
            hosts[0], hosts[1]:
        every = [*agent_nodes, *clients]
        wait_for(lambda: (all(rig.done(n) for n in every) and all(h.finished for h in hosts))
                 or any(h.error for h in hosts), 3 * TIMEOUT,
                 "two agent nodes and two FleetLock clients to reboot once each")
    assert not agents.errors and not any(h.error for h in hosts)
    assert recorder.max_in_flight() == 1
    assert sorted(recorder.grant_order()) == sorted(every)
    assert holding_at_yes == dict.fromkeys(clients, True)
