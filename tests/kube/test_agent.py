"""The real cluo-agent process against the real control plane and the private system bus.

The agent runs as its console script, authenticated as its node with a kubelet.conf-shaped
kubeconfig (a client certificate of system:node:<name>, as kubeadm's kubelet has), confined
by the Node authorizer, NodeRestriction and deploy/agent-policy.yaml; it talks to dbusmock's
update_engine and logind, and drains pods that the kubelet emulator runs. The test plays the
coordinator (reboot-ok) and the host's reboot (new boot id, node back with a new bootID).

The kubelet emulator scales grace periods by 0.05: a pod with
terminationGracePeriodSeconds=100 takes 5 s to go once evicted, which keeps a drain
running long enough to kill, stop or cut off the agent in the middle of it.

The API server outage test runs last: it restarts the shared kube-apiserver.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dbus
import kubernetes.client
import pytest
from kubernetes.client import (
    CoreV1Api,
    CoreV1Event,
    PolicyV1Api,
    V1Container,
    V1LabelSelector,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodDisruptionBudget,
    V1PodDisruptionBudgetSpec,
    V1PodSpec,
)
from kubernetes.watch.watch import iter_resp_lines

from cluo.protocol import Keys
from testbed.agent_host import AgentProcess, HostDir
from testbed.controlplane import ControlPlane
from testbed.dbus_bus import MockService
from testbed.kubelet import EmulatedNode, KubeletEmulator
from testbed.waiting import assert_stays, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.dbus]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEYS = Keys()
NEED_REBOOT = (dbus.Int64(1_700_000_000), 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT",
               "4152.2.0", dbus.Int64(300_000_000))
# update_engine checked again later, still needing the reboot: more than an hour later, so
# the agent records the new last-checked-time (agent_core.LAST_CHECKED_REFRESH).
CHECKED_AGAIN = (dbus.Int64(1_700_004_000), 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT",
                 "4152.2.0", dbus.Int64(300_000_000))
IDLE = (dbus.Int64(1_700_000_100), 0.0, "UPDATE_STATUS_IDLE", "0.0.0", dbus.Int64(0))
TIMEOUT = 60
EVENT_NAMESPACE = "default"  # where the agent records its Events (kube_nodes)
# What systemd >= 257 answers Reboot() while a block inhibitor is held (dbus_templates/logind).
BLOCKED_BY_INHIBITOR = "org.freedesktop.login1.BlockedByInhibitorLock"
BLOCKED_BY_INHIBITOR_MESSAGE = "Operation denied due to active block inhibitor"
# 100 s x the emulator's grace_period_scale 0.05: an evicted pod takes 5 s to go.
SLOW_GRACE_SECONDS = 100
REVOKED = "node-restriction.kubernetes.io/cluo-revoked"  # docs/security.md


@pytest.fixture(scope="module")
def agent_policy(control_plane: ControlPlane) -> ControlPlane:
    """The API server enforces deploy/agent-policy.yaml, as in a cluster running cluo."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
    control_plane.apply_agent_policy()
    return control_plane


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    with KubeletEmulator(kube_admin, heartbeat_interval=2.0, grace_period_scale=0.05) as k:
        yield k


# -- watching the node: every version, not samples ----------------------------------------


@dataclass(frozen=True)
class NodeVersion:
    annotations: dict[str, str]
    labels: dict[str, str]
    unschedulable: bool

    def annotation(self, name: str) -> str | None:
        return self.annotations.get(KEYS.prefix + name)


class NodeHistory:
    """Every version of one node from now on, through a watch in a thread of its own.

    A watch from the resourceVersion of a read misses no write, where polling would miss
    a value that lasted a few milliseconds: "the agent never wrote X" can be asserted.
    """

    def __init__(self, core: CoreV1Api, name: str) -> None:
        first = core.read_node(name)
        self.versions: list[NodeVersion] = [NodeVersion(
            dict(first.metadata.annotations or {}), dict(first.metadata.labels or {}),
            bool(first.spec.unschedulable),
        )]
        self._response: Any = core.list_node(
            field_selector=f"metadata.name={name}", watch=True,
            resource_version=first.metadata.resource_version, timeout_seconds=280,
            _preload_content=False,
        )
        self._thread = threading.Thread(target=self._run, name="node-history", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in iter_resp_lines(self._response):
                if not line:
                    continue
                event = json.loads(line)
                if event.get("type") not in ("ADDED", "MODIFIED"):
                    continue
                node = event["object"]
                self.versions.append(NodeVersion(
                    dict(node["metadata"].get("annotations") or {}),
                    dict(node["metadata"].get("labels") or {}),
                    bool(node["spec"].get("unschedulable")),
                ))
        except Exception:  # the response was shut down by close()
            return

    def close(self) -> None:
        self._response.shutdown()
        self._response.release_conn()
        self._thread.join(5)

    def snapshot(self) -> list[NodeVersion]:
        return list(self.versions)


# -- systemd's side of NOTIFY_SOCKET ------------------------------------------------------


class NotifyListener:
    """A bound AF_UNIX datagram socket, as systemd listens on NOTIFY_SOCKET, read by a
    thread that records each datagram with its monotonic arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self.datagrams: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.datagrams.append((time.monotonic(), data.decode().split("\n")))

    def assignments(self) -> list[tuple[float, str]]:
        """Every ``KEY=value`` received, in order, with its arrival time."""
        return [(at, line) for at, lines in list(self.datagrams) for line in lines]

    def received(self, assignment: str) -> list[float]:
        """Arrival times of ``assignment`` (exact match)."""
        return [at for at, line in self.assignments() if line == assignment]

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for _at, line in self.assignments()
                if line.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def notify_listener() -> Iterator[NotifyListener]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="cluo-notify-", dir="/tmp"))
    listener = NotifyListener(folder / "notify")
    yield listener
    listener.close()
    shutil.rmtree(folder, ignore_errors=True)


# -- the rig ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentOptions:
    """How the rig runs the agent; pass through indirect parametrization of ``rig``.
    A plain tuple there is taken as ``args``."""

    args: tuple[str, ...] = ()
    start: bool = True  # False: the test sets agent.env and starts it itself


@dataclass
class Rig:
    """One node with its host, its agent, and handles on everything around it."""

    core: CoreV1Api
    node: EmulatedNode
    host: HostDir
    agent: AgentProcess
    update_engine: MockService
    logind: MockService
    namespace: str
    histories: list[NodeHistory] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    def read(self) -> kubernetes.client.V1Node:
        return self.core.read_node(self.name)

    def annotation(self, name: str) -> str | None:
        return (self.read().metadata.annotations or {}).get(KEYS.prefix + name)

    def label(self, name: str) -> str | None:
        return (self.read().metadata.labels or {}).get(KEYS.prefix + name)

    def set_annotation(self, name: str, value: str) -> None:
        self.core.patch_node(self.name, {"metadata": {"annotations": {KEYS.prefix + name: value}}})

    def cordoned(self) -> bool:
        return bool(self.read().spec.unschedulable)

    def reboots(self) -> int:
        return len(self.logind.calls("Reboot"))

    def pods(self) -> list[str]:
        return sorted(p.metadata.name for p in self.core.list_namespaced_pod(self.namespace).items)

    def pod_deleting(self, name: str) -> bool:
        pods = self.core.list_namespaced_pod(self.namespace,
                                             field_selector=f"metadata.name={name}").items
        return bool(pods and pods[0].metadata.deletion_timestamp)

    def add_pod(self, name: str, *, grace: int) -> None:
        """One more controller-managed pod on the node, Running before this returns."""
        self.core.create_namespaced_pod(self.namespace, make_pod(name, self.name, grace=grace))
        self.wait(lambda: self.core.read_namespaced_pod(name, self.namespace).status.phase
                  == "Running", f"pod {name} Running")

    def add_budget(self, name: str, min_available: int) -> None:
        """A PodDisruptionBudget over the app=web pods, processed by the disruption
        controller (without its status the Eviction API does not know what is allowed)."""
        policy = PolicyV1Api(self.core.api_client)
        policy.create_namespaced_pod_disruption_budget(self.namespace, V1PodDisruptionBudget(
            metadata=V1ObjectMeta(name=name),
            spec=V1PodDisruptionBudgetSpec(
                min_available=min_available,
                selector=V1LabelSelector(match_labels={"app": "web"}),
            ),
        ))

        def processed() -> bool:
            pdb = policy.read_namespaced_pod_disruption_budget(name, self.namespace)
            return bool(pdb.status and pdb.status.observed_generation == pdb.metadata.generation
                        and pdb.status.current_healthy == 2
                        and pdb.status.disruptions_allowed == 0)

        self.wait(processed, f"the disruption controller to process budget {name}")

    def events(self, reason: str) -> list[CoreV1Event]:
        """The Events about this node with this reason, oldest first."""
        items = self.core.list_namespaced_event(
            EVENT_NAMESPACE, field_selector=f"involvedObject.name={self.name},reason={reason}",
        ).items
        return sorted(items, key=lambda e: e.metadata.creation_timestamp)

    def history(self) -> NodeHistory:
        history = NodeHistory(self.core, self.name)
        self.histories.append(history)
        return history

    def reboot_host(self) -> None:
        """What a real reboot does: the agent dies, the host comes back with a new boot id,
        update_engine starts idle, the kubelet reports the new bootID, systemd starts the
        agent again."""
        self.agent.kill()
        self.node.shutdown()
        self.update_engine.mock.SetStatus(*IDLE)
        boot_id = self.host.reboot()
        self.node.boot(boot_id)
        self.agent.start()

    def finish_cycle(self) -> None:
        """After the reboot: wait for the report, play the coordinator's end of the
        after-reboot phase (reboot-ok=false), wait until the agent closed the cycle."""
        self.wait(lambda: self.annotation("reboot-needed") == "false"
                  and self.annotation("reboot-in-progress") == "false",
                  "the agent to report the reboot (reboot-needed=false, in-progress=false)")
        self.set_annotation("reboot-ok", "false")
        self.wait(lambda: self.annotation("boot-id-before-reboot") is None
                  and self.annotation("agent-made-unschedulable") in (None, "false"),
                  "the agent to close the cycle (boot id and mark cleared)")

    def wait(self, predicate, what: str, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
        try:
            return wait_for(predicate, timeout=timeout, what=what)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n--- agent log:\n{self.agent.log()[-6000:]}") from None


def make_pod(name: str, node: str, *, controller: bool = True, grace: int = 30) -> V1Pod:
    owners = [V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web-1",
                               uid="00000000-0000-0000-0000-0000000000aa",
                               controller=True)] if controller else None
    return V1Pod(
        metadata=V1ObjectMeta(name=name, labels={"app": "web"}, owner_references=owners),
        spec=V1PodSpec(node_name=node, termination_grace_period_seconds=grace,
                       containers=[V1Container(name="c", image="pause")]),
    )


@pytest.fixture
def rig(
    kube_admin: kubernetes.client.ApiClient,
    kubelet: KubeletEmulator,
    agent_policy: ControlPlane,
    update_engine_mock: MockService,
    logind_mock: MockService,
    system_bus_address: str,
    namespace: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Rig]:
    options = getattr(request, "param", AgentOptions())
    if not isinstance(options, AgentOptions):
        options = AgentOptions(args=tuple(options))
    core = CoreV1Api(kube_admin)
    host = HostDir(tmp_path / "host")
    node = kubelet.add_node(f"n-{uuid.uuid4().hex[:8]}", boot_id=host.boot_id)
    for pod in ("web-a", "web-b"):
        core.create_namespaced_pod(namespace, make_pod(pod, node.name))
    kubelet_conf = agent_policy.node_kubeconfig(node.name, tmp_path / "kubelet.conf")
    agent = AgentProcess(node.name, kubelet_conf, system_bus_address, host,
                         tmp_path / "agent.log", extra_args=options.args)
    rig = Rig(core, node, host, agent, update_engine_mock, logind_mock, namespace)
    rig.wait(lambda: all(core.read_namespaced_pod(p, namespace).status.phase == "Running"
                         for p in ("web-a", "web-b")), "both pods Running")
    if options.start:
        agent.start()
    yield rig
    agent.kill()
    for history in rig.histories:
        history.close()
    for pod in core.list_namespaced_pod(namespace).items:
        core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)


WAITING_STATUS = "reboot needed: waiting for the coordinator's grant"


def announce_and_grant(rig: Rig) -> None:
    rig.update_engine.mock.SetStatus(*NEED_REBOOT)
    rig.wait(lambda: rig.annotation("reboot-needed") == "true", "reboot-needed=true")
    rig.set_annotation("reboot-ok", "true")


def test_happy_path_drains_reboots_once_and_uncordons(rig: Rig) -> None:
    rig.wait(lambda: rig.read().metadata.labels.get(KEYS.group) == "stable",
             "the group label from /etc/flatcar/update.conf")
    labels = rig.read().metadata.labels
    assert labels[KEYS.id] == "flatcar"
    assert labels[KEYS.version] == "4081.2.0"  # quotes stripped

    history = rig.history()
    rig.update_engine.mock.SetStatus(*NEED_REBOOT)
    rig.wait(lambda: rig.annotation("reboot-needed") == "true", "reboot-needed=true")
    node = rig.read()
    assert node.metadata.labels[KEYS.reboot_needed] == "true"
    assert node.metadata.annotations[KEYS.status] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert node.metadata.annotations[KEYS.new_version] == "4152.2.0"
    assert not node.spec.unschedulable
    assert_stays(lambda: rig.reboots() == 0, 1.0, "no reboot without a grant")

    rig.set_annotation("reboot-ok", "true")
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false)")
    assert rig.logind.calls("Reboot") == [[False]]
    assert rig.pods() == []
    node = rig.read()
    assert node.spec.unschedulable
    assert node.metadata.annotations[KEYS.reboot_in_progress] == "true"
    assert node.metadata.annotations[KEYS.agent_made_unschedulable] == "true"
    assert node.metadata.annotations[KEYS.boot_id_before_reboot] == rig.host.boot_id

    before = rig.host.boot_id
    rig.reboot_host()
    rig.wait(lambda: rig.annotation("reboot-needed") == "false"
             and rig.annotation("reboot-in-progress") == "false", "the agent to report back")
    assert rig.host.boot_id != before
    assert rig.cordoned(), "stays cordoned until the after-reboot phase ends"

    rig.set_annotation("reboot-ok", "false")
    rig.wait(lambda: not rig.cordoned(), "uncordon")
    rig.wait(lambda: rig.annotation("agent-made-unschedulable") in (None, "false"),
             "the agent-made-unschedulable mark cleared")
    assert rig.reboots() == 1
    assert rig.read().metadata.labels[KEYS.reboot_needed] == "false"
    # The mark and the cordon are one write each way: no version of the node had one
    # without the other.
    halves = [(v.unschedulable, v.annotation("agent-made-unschedulable"))
              for v in history.snapshot()
              if v.unschedulable is not (v.annotation("agent-made-unschedulable") == "true")]
    assert halves == [], halves


@pytest.mark.parametrize("rig", [("--drain-timeout", "3s")], indirect=True)
def test_pdb_blocked_drain_times_out_and_aborts(rig: Rig) -> None:
    rig.add_budget("web", min_available=2)  # both pods must stay: every eviction is refused
    history = rig.history()
    announce_and_grant(rig)

    # The agent gives up: in-progress=false with the reason, uncordon, mark cleared. The
    # grant is still true (the test has not taken it back): the reason is the hand-back.
    rig.wait(lambda: rig.annotation("reboot-in-progress") == "false"
             and not rig.cordoned()
             and rig.annotation("agent-made-unschedulable") in (None, "false"),
             "the drain to time out, the agent to uncordon and clear its mark")
    node = rig.read()
    annotations = node.metadata.annotations
    assert annotations[KEYS.reboot_ok] == "true"
    reason = annotations[KEYS.prefix + "blocked-reason"]
    assert reason.startswith("drain timed out after 3s; blocking pods: ")
    refusal = ("eviction refused by a PodDisruptionBudget: Cannot evict pod as it would "
               "violate the pod's disruption budget: The disruption budget web needs 2 healthy "
               "pods and has 2 currently")
    for pod in ("web-a", "web-b"):  # each pod, with the budget that refused it
        assert f"{rig.namespace}/{pod} ({refusal})" in reason, reason
    assert annotations[KEYS.reboot_needed] == "true", "the node still needs its reboot"
    assert node.metadata.labels[KEYS.reboot_needed] == "true"
    assert rig.reboots() == 0, "never reboot an undrained node"
    assert rig.pods() == ["web-a", "web-b"]

    events = rig.events("DrainTimedOut")
    assert len(events) == 1
    assert events[0].type == "Warning"
    assert events[0].message.startswith(reason)
    assert "reboot aborted" in events[0].message
    assert rig.events("Uncordoned"), "an Uncordoned event for the undone cordon"

    # The agent did cordon and drain before it gave up, and took the grant only once.
    versions = history.snapshot()
    assert any(v.unschedulable and v.annotation("reboot-in-progress") == "true"
               for v in versions)
    starts = [v for previous, v in itertools.pairwise(versions)
              if v.annotation("reboot-in-progress") == "true"
              and previous.annotation("reboot-in-progress") != "true"]
    assert len(starts) == 1, "the agent must not take the grant it handed back again"

    # The coordinator takes the grant back; the agent clears the reason and waits.
    rig.set_annotation("reboot-ok", "false")
    rig.wait(lambda: rig.annotation("blocked-reason") is None,
             "the agent to clear blocked-reason once the grant is taken back")
    assert_stays(lambda: rig.annotation("reboot-needed") == "true"
                 and rig.annotation("reboot-in-progress") == "false"
                 and not rig.cordoned() and rig.reboots() == 0,
                 1.0, "the node waits, reboot-needed, for its next grant")


def test_admin_cordoned_node_stays_cordoned(rig: Rig) -> None:
    rig.core.patch_node(rig.name, {"spec": {"unschedulable": True}})
    history = rig.history()
    announce_and_grant(rig)
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false)")
    assert rig.pods() == [], "the drain ran although the node was already cordoned"
    granted = rig.events("RebootGranted")
    assert granted and "already cordoned" in granted[-1].message

    rig.reboot_host()
    rig.finish_cycle()
    assert_stays(rig.cordoned, 1.0, "the admin's cordon to stay after the cycle")
    assert rig.reboots() == 1
    assert not rig.events("Uncordoned")
    versions = history.snapshot()
    assert all(v.unschedulable for v in versions), "the node was never uncordoned"
    assert not [v for v in versions if v.annotation("agent-made-unschedulable") == "true"], (
        "the agent claimed an admin's cordon as its own"
    )


def test_killed_mid_drain_finishes_with_exactly_one_reboot(rig: Rig) -> None:
    rig.add_pod("slow", grace=SLOW_GRACE_SECONDS)
    announce_and_grant(rig)
    rig.wait(lambda: rig.pod_deleting("slow"), "the drain to evict the slow pod")
    rig.agent.kill()
    # Killed mid-drain: in progress, cordoned, our mark, no boot id recorded yet.
    node = rig.read()
    assert node.spec.unschedulable
    assert node.metadata.annotations[KEYS.reboot_in_progress] == "true"
    assert node.metadata.annotations[KEYS.agent_made_unschedulable] == "true"
    assert KEYS.boot_id_before_reboot not in node.metadata.annotations
    assert "slow" in rig.pods()
    assert rig.reboots() == 0

    rig.agent.start()
    rig.wait(lambda: rig.reboots() == 1, "the restarted agent to finish the drain and reboot")
    assert rig.pods() == []
    second_run = rig.agent.log().split("--- start 2", 1)[1]
    assert "drain started" in second_run, "the restarted agent resumes the drain"
    assert_stays(lambda: rig.reboots() == 1, 1.0, "exactly one Reboot call")

    rig.reboot_host()
    rig.finish_cycle()
    assert not rig.cordoned()
    assert rig.reboots() == 1
    assert len(rig.events("RebootGranted")) == 1, "one cycle, not a second one after the kill"


@pytest.mark.parametrize(
    "rig", [("--reboot-retry-base", "1s", "--reboot-retry-max", "1s")], indirect=True
)
def test_logind_refusal_is_reported_and_retried(rig: Rig) -> None:
    rig.logind.mock.SetRebootError(BLOCKED_BY_INHIBITOR, BLOCKED_BY_INHIBITOR_MESSAGE)
    history = rig.history()
    announce_and_grant(rig)

    rig.wait(lambda: rig.reboots() >= 2, "a second Reboot attempt after the refusal", 30)
    reason = rig.wait(lambda: rig.annotation("blocked-reason"), "blocked-reason to be set")
    assert reason.startswith("reboot attempt ")
    assert f"refused: logind refused to reboot: {BLOCKED_BY_INHIBITOR}: " \
           f"{BLOCKED_BY_INHIBITOR_MESSAGE}" in reason
    failed = rig.wait(lambda: len(rig.events("RebootFailed")) >= 2 and rig.events("RebootFailed"),
                      "a RebootFailed event for each refused attempt")
    assert all(e.type == "Warning" and BLOCKED_BY_INHIBITOR_MESSAGE in e.message
               for e in failed)
    messages = " | ".join(e.message for e in failed)  # timestamps have 1 s resolution
    assert "reboot attempt 1 refused" in messages and "reboot attempt 2 refused" in messages

    # logind says yes again: the next retry is the last one.
    refused = int(rig.logind.mock.ClearRebootError())  # exact: the mock is single-threaded
    rig.wait(lambda: rig.reboots() == refused + 1, "the next retry after the refusal ended")
    assert_stays(lambda: rig.reboots() == refused + 1, 3.0,
                 "no more attempts once logind accepted (retries are 1 s apart)")

    # Throughout the refusals the node kept its slot: cordoned, in progress, granted.
    versions = history.snapshot()
    first = next(i for i, v in enumerate(versions) if v.unschedulable)
    assert all(v.unschedulable and v.annotation("reboot-in-progress") == "true"
               and v.annotation("reboot-ok") == "true" for v in versions[first:]), (
        "the cycle was dropped while the reboot was refused"
    )
    assert rig.pods() == []

    rig.reboot_host()
    rig.finish_cycle()
    assert rig.annotation("blocked-reason") is None


@pytest.mark.parametrize(
    "rig", [("--reboot-retry-base", "1s", "--reboot-retry-max", "1s")], indirect=True
)
def test_block_inhibitor_is_reported_without_calling_reboot(rig: Rig) -> None:
    mock = rig.logind.mock
    mock.AddInhibitor("shutdown:sleep", "backup-tool", "nightly backup running", "block",
                      dbus.UInt32(0), dbus.UInt32(4242))
    delay = ("shutdown", "NetworkManager", "cleaning up", "delay",
             dbus.UInt32(0), dbus.UInt32(77))
    mock.AddInhibitor(*delay)  # a delay inhibitor does not stop a reboot
    announce_and_grant(rig)

    reason = rig.wait(lambda: "reboot attempt 2 inhibited" in (rig.annotation("blocked-reason")
                                                                or "")
                      and rig.annotation("blocked-reason"),
                      "a second attempt stopped by the inhibitor", 30)
    assert "'backup-tool' (pid 4242, uid 0): nightly backup running" in reason
    assert "NetworkManager" not in reason
    failed = rig.wait(lambda: rig.events("RebootFailed"), "a RebootFailed event")
    assert failed and failed[0].type == "Warning" and "backup-tool" in failed[0].message
    assert rig.reboots() == 0, "Reboot is not called while a block inhibitor is listed"
    assert rig.cordoned() and rig.annotation("reboot-in-progress") == "true"

    mock.ClearInhibitors()
    mock.AddInhibitor(*delay)
    rig.wait(lambda: rig.reboots() == 1, "Reboot once the block inhibitor is gone")
    assert "reboot blocked by an inhibitor" in rig.agent.log()


def test_manual_trigger_by_annotation_reboots_on_grant(rig: Rig) -> None:
    rig.wait(lambda: rig.annotation("status") == "UPDATE_STATUS_IDLE",
             "the agent to mirror update_engine's idle status")
    rig.set_annotation("reboot-needed", "true")  # the admin asks for a reboot by hand
    rig.wait(lambda: rig.label("reboot-needed") == "true",
             "the agent to mirror reboot-needed into the label")
    needed = rig.wait(lambda: rig.events("RebootNeeded"),
                      "the RebootNeeded event (posted after the write)")
    assert "reboot requested through the reboot-needed annotation" in needed[0].message
    assert_stays(lambda: rig.reboots() == 0 and not rig.cordoned(), 1.0,
                 "no drain nor reboot without a grant")

    rig.set_annotation("reboot-ok", "true")
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false) after the grant")
    assert rig.pods() == []

    rig.reboot_host()
    rig.finish_cycle()
    assert not rig.cordoned()
    assert_stays(lambda: rig.annotation("reboot-needed") == "false"
                 and rig.label("reboot-needed") == "false" and rig.reboots() == 1,
                 1.0, "the manual request is done, not repeated")


@pytest.mark.parametrize("rig", [AgentOptions(start=False)], indirect=True)
def test_a_credential_of_another_node_is_refused_cleanly(
    rig: Rig, control_plane: ControlPlane, notify_listener: NotifyListener, tmp_path: Path
) -> None:
    """The kubelet.conf of node B, given to node A's agent: the API server refuses every
    request, the agent says why, writes nothing anywhere and keeps trying."""
    other = f"other-{uuid.uuid4().hex[:8]}"
    rig.core.create_node(kubernetes.client.V1Node(metadata=V1ObjectMeta(name=other)))
    try:
        rig.agent.kubeconfig = control_plane.node_kubeconfig(other, tmp_path / "other.conf")
        rig.agent.env["NOTIFY_SOCKET"] = str(notify_listener.path)
        rig.agent.start()
        refusal = rig.wait(lambda: next((s for s in notify_listener.statuses()
                                         if s.startswith("starting: cannot read node")), None),
                           "STATUS= to say the node cannot be read")
        assert f"node '{other}' cannot read '{rig.name}'" in refusal, refusal
        # Ready (start-up does not wait for the API server), and saying what is wrong.
        assert_stays(lambda: rig.agent.running() and "started" not in notify_listener.statuses(),
                     1.5, "the agent running, retrying, its node not read")
        assert len(notify_listener.received("READY=1")) == 1
        for name in (rig.name, other):
            labels = rig.core.read_node(name).metadata.labels or {}
            assert KEYS.group not in labels and KEYS.id not in labels, (name, labels)
        assert "cannot read or label the node, retrying" in rig.agent.log()
    finally:
        rig.core.delete_node(other)


@pytest.mark.parametrize("rig", [AgentOptions(start=False)], indirect=True)
def test_notify_socket_ready_status_watchdog_stopping(
    rig: Rig, control_plane: ControlPlane, notify_listener: NotifyListener
) -> None:
    rig.agent.env.update({"NOTIFY_SOCKET": str(notify_listener.path),
                          "WATCHDOG_USEC": "2000000"})  # a ping every second
    # READY=1 does not wait for the API server: while the agent may not label its node (an
    # operator revoked it: deploy/agent-policy.yaml) it is ready, and STATUS= says why the
    # node is not read yet.
    control_plane.kubectl("label", "node", rig.name, f"{REVOKED}=true")
    try:
        rig.agent.start()
        rig.wait(lambda: any(s.startswith("starting: cannot read node")
                             for s in notify_listener.statuses()),
                 "STATUS= to say the node cannot be read")
        assert notify_listener.received("READY=1")
        assert rig.agent.running()
    finally:
        control_plane.kubectl("label", "node", rig.name, f"{REVOKED}-")
    rig.wait(lambda: "started" in notify_listener.statuses(),
             "STATUS=started once the node can be labelled")
    assert rig.label("group") == "stable"
    startup = notify_listener.statuses()
    assert_in_order(startup, ["starting: connecting to update_engine",
                              "starting: reading the node", "started"])

    rig.update_engine.mock.SetStatus(*NEED_REBOOT)
    # Granted only once it waits: a grant that came with the echo of the agent's own
    # reboot-needed write would take it from RebootNeeded straight to Granted.
    rig.wait(lambda: WAITING_STATUS in notify_listener.statuses(), "STATUS= for the wait")
    rig.set_annotation("reboot-ok", "true")
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false)")
    rig.wait(lambda: "rebooting: attempt 1" in notify_listener.statuses(),
             "STATUS= for the reboot attempt")
    statuses = notify_listener.statuses()
    assert_in_order(statuses, [
        "started",
        "idle",
        WAITING_STATUS,
        "reboot granted: starting",  # and cordoned, in the same write
        "draining: starting",
        "drained: recording the boot id",
        "rebooting: attempt 1",
    ])

    code = rig.agent.terminate(timeout=10)
    assert code == 0
    assert len(notify_listener.received("READY=1")) == 1
    stopping = rig.wait(lambda: notify_listener.received("STOPPING=1"), "STOPPING=1")
    pings = notify_listener.received("WATCHDOG=1")
    before_stop = [at for at in pings if at < stopping[0]]
    assert len(before_stop) >= 3, f"too few watchdog pings: {len(before_stop)}"
    gaps = [later - earlier for earlier, later in itertools.pairwise(before_stop)]
    assert max(gaps) < 2.0, f"a watchdog gap of {max(gaps):.2f}s would trip WatchdogSec=2s"


@pytest.mark.parametrize("rig", [AgentOptions(start=False)], indirect=True)
def test_sigterm_mid_cycle_leaves_no_half_write(
    rig: Rig, notify_listener: NotifyListener
) -> None:
    rig.agent.env["NOTIFY_SOCKET"] = str(notify_listener.path)
    rig.add_pod("slow", grace=SLOW_GRACE_SECONDS)
    rig.agent.start()
    announce_and_grant(rig)
    rig.wait(lambda: rig.pod_deleting("slow"), "the drain to evict the slow pod")

    asked = time.monotonic()
    code = rig.agent.terminate(timeout=10)  # raises if the agent takes longer
    assert code == 0
    assert time.monotonic() - asked < 10
    assert notify_listener.received("STOPPING=1")
    # Stopped between two writes, never inside one: the node reads as "draining".
    annotations = rig.read().metadata.annotations
    assert rig.cordoned()
    assert annotations[KEYS.reboot_in_progress] == "true"
    assert annotations[KEYS.agent_made_unschedulable] == "true"
    assert annotations[KEYS.reboot_ok] == "true"
    assert KEYS.boot_id_before_reboot not in annotations
    assert KEYS.prefix + "blocked-reason" not in annotations
    assert rig.reboots() == 0

    rig.agent.start()
    rig.wait(lambda: rig.reboots() == 1, "the restarted agent to finish the drain and reboot")
    assert rig.pods() == []
    rig.reboot_host()
    rig.finish_cycle()
    assert not rig.cordoned()
    assert rig.reboots() == 1


@pytest.mark.parametrize(
    "rig", [("--drain-timeout", "5s", "--drain-timeout-policy", "force")], indirect=True
)
def test_force_policy_deletes_past_the_budget_and_reboots(rig: Rig) -> None:
    # The forced deletion gets a fresh drain timeout to finish in; the emulated pod takes
    # 1.5 s of its grace period to go, so 5 s leave room on a loaded machine.
    rig.add_budget("web", min_available=2)  # every eviction is refused
    announce_and_grant(rig)
    rig.wait(lambda: rig.reboots() == 1, "the forced drain to finish and the reboot")
    assert rig.pods() == []
    assert rig.events("DrainForced"), "the forced deletion is reported"
    rig.reboot_host()
    rig.finish_cycle()
    assert rig.reboots() == 1


@pytest.mark.parametrize("rig", [("--drain-timeout", "3s")], indirect=True)
def test_pod_without_controller_blocks_with_a_clear_reason(rig: Rig) -> None:
    rig.core.create_namespaced_pod(rig.namespace, make_pod("lonely", rig.name, controller=False))
    announce_and_grant(rig)
    rig.wait(lambda: "lonely" in (rig.annotation("blocked-reason") or ""),
             "blocked-reason naming the pod without a controller")
    assert "has no controller" in (rig.annotation("blocked-reason") or "")
    rig.wait(lambda: not rig.cordoned(), "the abort to uncordon")
    assert rig.reboots() == 0
    assert rig.agent.running(), "a blocking pod is reported, not a crash loop"


@pytest.mark.parametrize("rig", [("--drain-pods-without-controller",)], indirect=True)
def test_flag_drains_pods_without_controller(rig: Rig) -> None:
    rig.core.create_namespaced_pod(rig.namespace, make_pod("lonely", rig.name, controller=False))
    announce_and_grant(rig)
    rig.wait(lambda: rig.reboots() == 1, "the drain (lonely pod included) and the reboot")
    assert rig.pods() == []


NO_NODE = "no Node of this name"


@pytest.mark.parametrize("rig", [AgentOptions(start=False)], indirect=True)
def test_waits_for_a_node_of_its_name_and_carries_on_when_it_appears(
    rig: Rig, kubelet: KubeletEmulator, notify_listener: NotifyListener,
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    # The agent is told a name no Node has yet (a kubelet that registers late): it says so,
    # stays up, and waits. Its credential is that node's: a node may read its own Node
    # before it exists (a 404); another node's name would be a 403 (the test above).
    name = f"{rig.name}.example.com"
    rig.agent.node_name = name
    rig.agent.kubeconfig = control_plane.node_kubeconfig(name, tmp_path / "late.conf")
    rig.agent.env.update({"NOTIFY_SOCKET": str(notify_listener.path),
                          "WATCHDOG_USEC": "2000000"})  # a ping every second
    rig.agent.start()
    assert rig.agent.popen is not None
    pid = rig.agent.popen.pid

    status = rig.wait(lambda: next((s for s in notify_listener.statuses() if NO_NODE in s), None),
                      "STATUS= saying that no Node has the agent's name")
    assert status.startswith(f"waiting for Node {name!r} (name from --node-name): ")
    assert "set --node-name or CLUO_AGENT_NODE_NAME in /etc/cluo/agent.env" in status
    rig.wait(lambda: notify_listener.received("READY=1"), "READY=1: start-up is done, the "
             "API server answered that there is no such Node")
    line = rig.wait(lambda: next((line for line in rig.agent.log().splitlines()
                                  if NO_NODE in line), None), "the journal line")
    assert line.startswith("WARNING ")
    assert f"NODE={name} " in line and "NODE_NAME_SOURCE=--node-name" in line, line
    assert "KIND=not_found" in line, "a missing Node, not another failure"
    assert "set --node-name or CLUO_AGENT_NODE_NAME in /etc/cluo/agent.env" in line
    pings = len(notify_listener.received("WATCHDOG=1"))
    # Meanwhile the agent reads the node again (0.5 s, 1 s, 2 s apart): still one line.
    assert_stays(lambda: rig.agent.running() and rig.agent.log().count(NO_NODE) == 1, 4.0,
                 "the agent to stay up and report the missing Node once")
    assert len(notify_listener.received("WATCHDOG=1")) > pings, "the watchdog is fed"
    assert "cannot read or label the node" not in rig.agent.log()

    kubelet.add_node(name, boot_id=rig.host.boot_id)  # the kubelet registers this name

    def status_annotation() -> str | None:
        annotations = rig.core.read_node(name).metadata.annotations or {}
        return annotations.get(KEYS.status)

    rig.wait(lambda: status_annotation() == "UPDATE_STATUS_IDLE",
             "the agent to mirror update_engine's status onto the new Node")
    assert rig.core.read_node(name).metadata.labels.get(KEYS.group) == "stable"
    rig.update_engine.mock.SetStatus(*NEED_REBOOT)
    rig.wait(lambda: status_annotation() == "UPDATE_STATUS_UPDATED_NEED_REBOOT",
             "the agent to mirror update_engine's next status")
    assert rig.agent.running() and rig.agent.popen.pid == pid and rig.agent.starts == 1, (
        "the same process carried on"
    )
    assert "the Node appeared" in rig.agent.log()
    assert len(notify_listener.received("READY=1")) == 1
    assert_in_order(notify_listener.statuses(), [status, "started"])



# Last in the file: it restarts the session's kube-apiserver.
def test_api_server_outage_mid_drain(rig: Rig, control_plane: ControlPlane) -> None:
    rig.add_pod("slow", grace=SLOW_GRACE_SECONDS)
    announce_and_grant(rig)
    rig.wait(lambda: rig.pod_deleting("slow"), "the drain to evict the slow pod")

    control_plane.stop_apiserver()
    try:
        outage_ends = time.monotonic() + 20
        time.sleep(1)
        # update_engine checks again meanwhile: the agent must mirror it, and that write
        # fails until the API server is back.
        rig.update_engine.mock.SetStatus(*CHECKED_AGAIN)
        while time.monotonic() < outage_ends:
            assert rig.agent.running(), f"the agent exited:\n{rig.agent.log()[-4000:]}"
            time.sleep(0.5)
        # Without the API server nobody can see the slow pod go: no reboot yet.
        assert rig.reboots() == 0
    finally:
        control_plane.start_apiserver()

    rig.wait(lambda: rig.reboots() == 1, "the agent to finish the drain and reboot", 90)
    assert rig.agent.running() and rig.agent.starts == 1, "the same process rode it out"
    assert rig.pods() == []
    log = rig.agent.log()
    assert "drain round failed, retrying" in log, "the outage hit the drain"
    assert "action failed, deciding again after a pause" in log, "the outage hit a write"
    rig.wait(lambda: rig.annotation("last-checked-time") == str(int(CHECKED_AGAIN[0])),
             "the failed mirror write redone after the outage")

    rig.reboot_host()
    rig.finish_cycle()
    assert not rig.cordoned()
    assert rig.reboots() == 1


def assert_in_order(seen: list[str], expected: list[str]) -> None:
    """Each of ``expected`` occurs in ``seen``, in this order (others may come between)."""
    position = 0
    for item in expected:
        try:
            position = seen.index(item, position) + 1
        except ValueError:
            raise AssertionError(f"{item!r} missing (or out of order) in {seen!r}") from None
