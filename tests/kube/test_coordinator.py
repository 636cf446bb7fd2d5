"""cluo-coord as a process against the real control plane.

The coordinator runs as its console script (``cluo-coord``), authenticated with a real token
of the cluo-coord ServiceAccount bound by deploy/coordinator-rbac.yaml. Nodes are virtual
(KubeletEmulator) and carry a per-test label the coordinator selects on. The test plays the
agents (``testbed.fake_agents.FakeAgents``: reboot-in-progress, shutdown, boot with a new
bootID, reboot-needed=false) and the hook DaemonSets. ``InFlightRecorder`` watches the Nodes
and the slot Leases for the whole test; both live in the same etcd, so ordering their events
by resourceVersion gives one history, and the invariant "never more than max-concurrent
nodes in flight" is asserted over every state in it.

The API server outage test runs last: it restarts the shared kube-apiserver.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import CoordinationV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException

from cluo.protocol import LEADER_LEASE_NAME, SLOT_LEASE_LABEL, Keys
from testbed.controlplane import ControlPlane
from testbed.coordinator import COORD, CRASH_EXIT_CODE, CoordProcess
from testbed.fake_agents import FakeAgents
from testbed.kubelet import KubeletEmulator
from testbed.recorder import InFlightRecorder
from testbed.waiting import assert_stays, wait_for

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAMESPACE = "cluo-system"
KEYS = Keys()
SELECTOR_LABEL = "cluo-coord-test"
BEFORE_HOOK = "hooks.example.com/before-done"
AFTER_HOOK = "hooks.example.com/after-done"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def coord_kubeconfig(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    """A kubeconfig with a real cluo-coord ServiceAccount token (RBAC from deploy/)."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "coordinator-rbac.yaml"))
    path = tmp_path_factory.mktemp("coord") / "kubeconfig"
    return control_plane.service_account_kubeconfig(NAMESPACE, "cluo-coord", path)


def _clean_leases(api: kubernetes.client.ApiClient) -> None:
    coordination = CoordinationV1Api(api)
    coordination.delete_collection_namespaced_lease(NAMESPACE, label_selector=SLOT_LEASE_LABEL)
    try:
        coordination.delete_namespaced_lease(LEADER_LEASE_NAME, NAMESPACE)
    except ApiException as err:
        if err.status != 404:
            raise


@dataclass
class Rig:
    control_plane: ControlPlane
    admin: kubernetes.client.ApiClient
    kubeconfig: Path
    workdir: Path
    emulator: KubeletEmulator
    test_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    coordinators: list[CoordProcess] = field(default_factory=list)

    @property
    def selector(self) -> str:
        return f"{SELECTOR_LABEL}={self.test_id}"

    @property
    def core(self) -> CoreV1Api:
        return CoreV1Api(self.admin)

    def add_nodes(self, count: int, *, needing_reboot: bool = True) -> list[str]:
        names = [f"c{self.test_id}-{i}" for i in range(count)]
        self.emulator.add_nodes(names, labels={SELECTOR_LABEL: self.test_id})
        for i, name in enumerate(names):
            if needing_reboot:
                # last-checked-time orders the queue: node 0 first.
                self.annotate(name, {KEYS.reboot_needed: "true",
                                     KEYS.last_checked_time: str(1_700_000_000 + i)})
        wait_for(lambda: all(self.node(n).status.node_info.boot_id for n in names), 20,
                 "the emulated nodes to report a bootID")
        return names

    def node(self, name: str) -> Any:
        return self.core.read_node(name)

    def annotations(self, name: str) -> dict[str, str]:
        return dict(self.node(name).metadata.annotations or {})

    def annotate(self, name: str, values: dict[str, str | None]) -> None:
        self.core.patch_node(name, {"metadata": {"annotations": values}})

    def start(self, *flags: str, leader_elect: bool = False, crash_after: str = "",
              name: str = "") -> CoordProcess:
        """cluo-coord named ``name`` (its identity and log); with ``crash_after`` (a change
        type), it exits after applying the first such change, and is returned even if it
        exited before it was ready."""
        name = name or f"coord{len(self.coordinators)}"
        coord = CoordProcess.start(self.kubeconfig, self.selector, self.workdir / f"{name}.log",
                                   identity=name, leader_elect=leader_elect, flags=flags,
                                   namespace=NAMESPACE, crash_after=crash_after)
        self.coordinators.append(coord)
        return coord

    def agents(self, *, never_return: frozenset[str] = frozenset(),
               finish_delay: float = 0.0, down_for: float = 0.1) -> FakeAgents:
        """The agents of this rig's nodes (each as its own node, as the agent is)."""
        return FakeAgents(self.control_plane, self.emulator, self.selector,
                          never_return=never_return, finish_delay=finish_delay,
                          down_for=down_for)

    def wait_until_down(self, name: str, agents: FakeAgents) -> None:
        """Until ``name`` was granted and went down (its agent never brings it back)."""
        wait_for(lambda: self.annotations(name).get(KEYS.reboot_in_progress) == "true"
                 and agents.settled(), 30, f"{name} to be granted and go down")

    def admin_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(COORD), *args, "--kubeconfig", str(self.control_plane.admin_kubeconfig)],
            capture_output=True, text=True, timeout=30, check=False,
        )

    def slot_holders(self) -> dict[str, str]:
        leases = CoordinationV1Api(self.admin).list_namespaced_lease(
            NAMESPACE, label_selector=SLOT_LEASE_LABEL).items
        return {lease.metadata.name: lease.spec.holder_identity for lease in leases
                if lease.spec.holder_identity}

    def events(self, node: str, reason: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            "default", field_selector=f"involvedObject.name={node}").items
        return [e for e in items if e.reason == reason and e.source.component == "cluo-coord"]

    def done(self, name: str) -> bool:
        """The node's cycle is over: rebooted, reboot-ok=false, no phase labels."""
        node = self.node(name)
        annotations = node.metadata.annotations or {}
        labels = node.metadata.labels or {}
        return (annotations.get(KEYS.reboot_needed) == "false"
                and annotations.get(KEYS.reboot_ok) == "false"
                and KEYS.before_reboot not in labels and KEYS.after_reboot not in labels
                and name not in self.slot_holders().values())


@pytest.fixture
def rig(control_plane: ControlPlane, kube_admin: kubernetes.client.ApiClient,
        coord_kubeconfig: Path, tmp_path: Path) -> Iterator[Rig]:
    _clean_leases(kube_admin)
    with KubeletEmulator(kube_admin, heartbeat_interval=5.0) as emulator:
        the_rig = Rig(control_plane, kube_admin, coord_kubeconfig, tmp_path, emulator)
        try:
            yield the_rig
        finally:
            for coord in the_rig.coordinators:
                coord.stop()
            emulator.stop(delete_nodes=True)
            _clean_leases(kube_admin)
    for coord in the_rig.coordinators:
        if coord.process.returncode not in (0, CRASH_EXIT_CODE):
            pytest.fail(f"{coord.identity} exited with {coord.process.returncode}:\n"
                        f"{coord.log_tail()}")


@pytest.fixture
def recorder(rig: Rig) -> Iterator[InFlightRecorder]:
    rec = InFlightRecorder(rig.admin, rig.selector, NAMESPACE, KEYS).start()
    yield rec
    rec.stop()
    assert not rec.errors, f"gaps in the recorded history: {rec.errors}"


def _all_done(rig: Rig, names: list[str]) -> Callable[[], bool]:
    return lambda: all(rig.done(name) for name in names)


# --------------------------------------------------------------------------- tests


def test_five_nodes_roll_one_at_a_time_in_queue_order(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    names = rig.add_nodes(5)
    coord = rig.start()
    with rig.agents() as agents:
        wait_for(_all_done(rig, names), 60, "all five nodes to reboot and finish")
    assert not agents.errors
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == names  # queue order: last-checked-time
    for name in names:
        assert rig.events(name, "RebootApproved"), f"no RebootApproved event for {name}"
        # Posted after the slot's release, which already makes the node done.
        wait_for(lambda name=name: rig.events(name, "RebootFinished"), 10,
                 f"the RebootFinished event for {name}")
    # Metrics: five grants, four handoffs (their speed is measured by bench/, not here).
    assert coord.metric("cluo_grants_total") == 5
    assert coord.metric("cluo_handoff_seconds_count") == 4
    assert coord.metric("cluo_nodes_needing_reboot") == 0
    assert coord.metric("cluo_nodes_in_flight") == 0
    assert coord.metric("cluo_is_leader") == 1
    assert coord.get("/healthz")[0] == 200
    assert coord.get("/readyz")[0] == 200
    # Logs: one JSON object per line, constant messages with fields.
    entries = [json.loads(line) for line in coord.log_path.read_text().splitlines()]
    assert all({"time", "level", "msg"} <= entry.keys() for entry in entries)
    granted = [e for e in entries if e["msg"] == "reboot granted"]
    assert [e["node"] for e in granted] == names


def test_max_concurrent_two_is_reached_and_never_exceeded(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    names = rig.add_nodes(5)
    rig.start("--max-concurrent", "2")
    with rig.agents() as agents:
        wait_for(_all_done(rig, names), 60, "all five nodes to reboot and finish")
    assert not agents.errors
    assert recorder.max_in_flight() == 2


def test_the_reset_uncordons_the_node_and_hands_its_slot_on_without_the_agent(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    first, by_admin, last = rig.add_nodes(3)
    rig.core.patch_node(by_admin, {"spec": {"unschedulable": True}})  # before cluo touches it
    rig.start()
    # Agents that look at the end of their cycle a second late: the hand-over does not
    # wait for them.
    with rig.agents(finish_delay=1.0) as agents:
        wait_for(_all_done(rig, [first, by_admin, last]), 60, "all three nodes to finish")
    assert not agents.errors
    # Every uncordon was the coordinator's, in the reset's write (reboot-ok=false), which
    # also removed the boot id: no agent had anything left to write.
    assert agents.uncordoned == 0
    assert agents.finish_writes == 0
    for name in (first, by_admin, last):
        assert KEYS.boot_id_before_reboot not in rig.annotations(name)
    assert recorder.uncordons() == [(first, True), (last, True)]
    assert recorder.max_cordoned() == 1
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == [first, by_admin, last]
    spans = recorder.grant_spans()
    assert spans[by_admin][0][0] < agents.finishing_at[first], (spans, agents.finishing_at)
    # The admin's cordon is the admin's: it stays, and it did not hold up the roll.
    assert rig.node(by_admin).spec.unschedulable
    assert not rig.node(first).spec.unschedulable
    assert KEYS.agent_made_unschedulable not in rig.annotations(first)


def test_crash_between_slot_and_grant_resumes_the_same_node(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    first, second = rig.add_nodes(2)
    crashing = rig.start(crash_after="AcquireSlot", name="crashing")
    wait_for(lambda: crashing.process.poll() is not None, 20, "the crash hook to exit")
    assert crashing.process.returncode == CRASH_EXIT_CODE, crashing.log_tail()
    # The state a crash leaves: a slot names the first node, nobody has reboot-ok.
    assert list(rig.slot_holders().values()) == [first]
    assert KEYS.reboot_ok not in rig.annotations(first)
    rig.start(name="restarted")
    with rig.agents() as agents:
        wait_for(_all_done(rig, [first, second]), 40, "both nodes to reboot and finish")
    assert not agents.errors
    assert recorder.grant_order() == [first, second]
    assert recorder.max_in_flight() == 1


@pytest.mark.parametrize("flags", [(), ("--group-max-concurrent", "1")],
                         ids=["global-slot", "with-group-slot"])
def test_crash_between_a_reset_and_the_hand_over_resumes_with_the_hand_over(
    rig: Rig, recorder: InFlightRecorder, flags: tuple[str, ...]
) -> None:
    first, second = rig.add_nodes(2)
    crashing = rig.start(*flags, crash_after="ResetRebootOk", name="crashing")
    with rig.agents() as agents:
        wait_for(lambda: crashing.process.poll() is not None, 40,
                 "the crash hook to exit after the first node's reset")
        assert crashing.process.returncode == CRASH_EXIT_CODE, crashing.log_tail()
        # The state a crash leaves: the first node reset, its slots (the global one, and
        # with a group limit its group's) still naming it.
        assert rig.annotations(first).get(KEYS.reboot_ok) == "false"
        assert list(rig.slot_holders().values()) == [first] * (2 if flags else 1)
        restarted = rig.start(*flags, name="restarted")
        wait_for(_all_done(rig, [first, second]), 40, "both nodes to reboot and finish")
    assert not agents.errors
    assert recorder.grant_order() == [first, second]
    assert recorder.max_in_flight() == 1
    # Each slot went from the first node to the second in one write, none released.
    entries = restarted.entries()
    handed = [(e["node"], e["from"], bool(e.get("group"))) for e in entries
              if e.get("msg") == "reboot slot handed over"]
    assert handed == [(second, first, True)] * bool(flags) + [(second, first, False)]
    assert not [e for e in entries if e.get("msg") == "reboot slot released"
                and e.get("node") == first]


@pytest.mark.parametrize("leader_elect", [False, True], ids=["cas-only", "leader-election"])
def test_two_coordinators_never_put_two_nodes_in_flight(
    rig: Rig, recorder: InFlightRecorder, leader_elect: bool
) -> None:
    names = rig.add_nodes(4)
    coords = [rig.start(leader_elect=leader_elect, name=f"twin{i}") for i in range(2)]
    with rig.agents() as agents:
        wait_for(_all_done(rig, names), 60, "all four nodes to reboot and finish")
    assert not agents.errors
    assert recorder.max_in_flight() == 1
    assert sorted(set(recorder.grant_order())) == names
    if leader_elect:
        leaders = [c.metric("cluo_is_leader") for c in coords]
        assert sorted(leaders) == [0, 1], leaders
        # The leader steps down on SIGTERM: the standby takes over well before the
        # 15 s lease would expire.
        leader, standby = (coords[0], coords[1]) if leaders[0] == 1 else (coords[1], coords[0])
        leader.stop()
        assert leader.process.returncode == 0
        wait_for(lambda: standby.metric("cluo_is_leader") == 1, 8,
                 "the standby to take over after the leader stepped down")


def test_node_that_never_returns_keeps_its_slot_until_released(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    lost, nxt = rig.add_nodes(2)
    coord = rig.start("--reboot-timeout", "4s")
    with rig.agents(never_return=frozenset({lost})) as agents:
        wait_for(lambda: rig.events(lost, "RebootTimedOut"), 30,
                 "a RebootTimedOut Warning event for the lost node")
        event = rig.events(lost, "RebootTimedOut")[0]
        assert event.type == "Warning"
        lease = CoordinationV1Api(rig.admin).read_namespaced_lease(
            "cluo-reboot-slot-0", NAMESPACE)
        assert lease.spec.holder_identity == lost
        assert lease.metadata.annotations.get("cluo.flatcar-linux.net/stuck") == "true"
        wait_for(lambda: coord.metric("cluo_stuck_nodes") == 1, 10, "cluo_stuck_nodes to be 1")
        assert coord.metric(f'cluo_slot_holder_info{{node="{lost}",slot="0"}}')
        assert_stays(lambda: KEYS.reboot_ok not in rig.annotations(nxt)
                     or rig.annotations(nxt)[KEYS.reboot_ok] != "true", 1.0,
                     "the next node to get no grant while the lost node holds the slot")
        result = rig.admin_command("release", lost)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: rig.done(nxt), 30, "the next node to reboot after the release")
        assert rig.events(lost, "RebootSlotReleasedByAdmin")
    assert not agents.errors
    assert recorder.max_in_flight() == 1
    assert coord.metric("cluo_stuck_nodes") == 0


def test_node_deleted_while_holding_a_slot_frees_it_and_the_roll_goes_on(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    lost, nxt = rig.add_nodes(2)
    coord = rig.start()
    with rig.agents(never_return=frozenset({lost})) as agents:
        rig.wait_until_down(lost, agents)
        assert_stays(lambda: list(rig.slot_holders().values()) == [lost], 1.0,
                     "the slot to stay with the node that went down")
        rig.core.delete_node(lost)  # an autoscaler gives up on it
        wait_for(lambda: rig.done(nxt), 30, "the next node to reboot after the deletion")
    assert not agents.errors
    events = rig.core.list_namespaced_event(
        NAMESPACE, field_selector="involvedObject.name=cluo-reboot-slot-0").items
    (gone,) = [e for e in events if e.reason == "RebootSlotHolderGone"]
    assert gone.type == "Warning" and lost in gone.message
    assert gone.involved_object.kind == "Lease"
    assert coord.metric(
        'cluo_events_total{reason="RebootSlotHolderGone",type="Warning"}') == 1
    freed = [e for e in coord.entries()
             if e["msg"] == "reboot slot freed: its holder's Node is gone"]
    assert [e["node"] for e in freed] == [lost]
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == [lost, nxt]


def test_node_recreated_under_its_name_keeps_the_slot_until_the_new_node_is_ready(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    lost, nxt = rig.add_nodes(2)
    first = rig.start()
    with rig.agents(never_return=frozenset({lost})) as agents:
        rig.wait_until_down(lost, agents)
        old_uid = rig.node(lost).metadata.uid
        # An instance group replaces the machine while no coordinator runs, so the next
        # one meets a Node of the holder's name with a new uid, not a deletion.
        first.stop()
        rig.core.delete_node(lost)
        rig.core.create_node({"metadata": {"name": lost,
                                           "labels": {SELECTOR_LABEL: rig.test_id}}})
        _post_ready(rig, lost, "False")
        assert rig.node(lost).metadata.uid != old_uid
        rig.start()
        assert_stays(lambda: list(rig.slot_holders().values()) == [lost]
                     and rig.annotations(nxt).get(KEYS.reboot_ok) != "true", 3.0,
                     "the slot to stay with the re-created node while it is NotReady")
        _post_ready(rig, lost, "True")
        wait_for(lambda: rig.done(nxt), 30, "the next node to reboot once the new node is Ready")
    assert not agents.errors
    (replaced,) = rig.events(lost, "RebootSlotHolderReplaced")
    assert replaced.type == "Warning" and old_uid in replaced.message
    assert recorder.grant_order() == [lost, nxt]
    assert recorder.max_in_flight() == 1
    rig.core.delete_node(lost)  # not the emulator's: it would outlive the test


def _post_ready(rig: Rig, name: str, status: str) -> None:
    """Post the node's Ready condition as its kubelet would (the emulator does not serve it)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rig.core.patch_node_status(name, {"status": {"conditions": [{
        "type": "Ready", "status": status, "reason": "KubeletReady" if status == "True"
        else "KubeletNotReady", "message": "posted by the test", "lastHeartbeatTime": now,
        "lastTransitionTime": now}]}})


def test_admin_lists_slots_and_frees_them_whether_or_not_the_node_exists(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    gone, lost, last = rig.add_nodes(3)
    coord = rig.start(name="before")
    with rig.agents(never_return=frozenset({gone, lost})) as agents:
        rig.wait_until_down(gone, agents)
        listed = rig.admin_command("slots")
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split() == ["SLOT", "HOLDER", "SINCE", "STUCK"]
        assert row.split()[:2] == ["cluo-reboot-slot-0", gone] and row.split()[3] == "no"

        # No coordinator to notice: the admin frees the slot of a Node that is gone.
        coord.stop()
        rig.core.delete_node(gone)
        result = rig.admin_command("release", gone)
        assert result.returncode == 0, result.stderr
        assert not rig.slot_holders()
        again = rig.admin_command("release", gone)
        assert again.returncode == 1 and "holds no reboot slot" in again.stderr

        rig.start(name="after")
        wait_for(lambda: rig.annotations(lost).get(KEYS.reboot_in_progress) == "true"
                 and agents.settled(), 30, "the second node to be granted and go down")
        # The Node exists: freed through the coordinator (release-slot=true).
        result = rig.admin_command("slots", "--free", "cluo-reboot-slot-0")
        assert result.returncode == 0, result.stderr
        assert rig.annotations(lost).get(KEYS.release_slot) == "true"
        wait_for(lambda: rig.done(last), 30,
                 "the last node to reboot after the admin freed the slot")
        unknown = rig.admin_command("slots", "--free", "no-such-node")
        assert unknown.returncode == 1 and "no reboot slot" in unknown.stderr
    assert not agents.errors
    assert recorder.max_in_flight() == 1


def test_hooks_gate_the_grant_and_the_release(rig: Rig, recorder: InFlightRecorder) -> None:
    names = rig.add_nodes(2)
    violations: list[str] = []
    stop = threading.Event()

    def hook_daemonsets() -> None:
        while not stop.wait(0.05):
            for node in rig.core.list_node(label_selector=rig.selector).items:
                labels = node.metadata.labels or {}
                annotations = node.metadata.annotations or {}
                name = node.metadata.name
                if labels.get(KEYS.before_reboot) == "true" and BEFORE_HOOK not in annotations:
                    time.sleep(0.5)
                    if rig.annotations(name).get(KEYS.reboot_ok) == "true":
                        violations.append(f"{name} granted before its before-reboot hook")
                    rig.annotate(name, {BEFORE_HOOK: "true"})
                if labels.get(KEYS.after_reboot) == "true" and AFTER_HOOK not in annotations:
                    time.sleep(0.5)
                    if name not in rig.slot_holders().values():
                        violations.append(f"{name} released before its after-reboot hook")
                    rig.annotate(name, {AFTER_HOOK: "true"})

    hooks = threading.Thread(target=hook_daemonsets, daemon=True)
    hooks.start()
    try:
        rig.start("--before-reboot-annotations", BEFORE_HOOK,
                  "--after-reboot-annotations", AFTER_HOOK)
        with rig.agents() as agents:
            wait_for(_all_done(rig, names), 60, "both nodes to go through both hooks")
    finally:
        stop.set()
        hooks.join(10)
    assert not violations
    assert not agents.errors
    assert recorder.grant_order() == names
    for name in names:  # hook annotations are cleared when the cycle ends
        annotations = rig.annotations(name)
        assert BEFORE_HOOK not in annotations and AFTER_HOOK not in annotations


def test_paused_node_is_skipped_and_global_pause_holds_new_slots(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    paused, first, second = rig.add_nodes(3)
    rig.annotate(paused, {KEYS.reboot_paused: "true"})
    result = rig.admin_command("pause")
    assert result.returncode == 0, result.stderr
    rig.start()
    with rig.agents() as agents:
        assert_stays(lambda: not rig.slot_holders(), 2.0,
                     "no slot to be taken while globally paused")
        result = rig.admin_command("resume")
        assert result.returncode == 0, result.stderr
        wait_for(_all_done(rig, [first, second]), 40, "the unpaused nodes to reboot")
        assert_stays(lambda: not rig.slot_holders(), 1.0,
                     "the paused node to get no slot")
    assert not agents.errors
    assert recorder.grant_order() == [first, second]
    assert rig.annotations(paused).get(KEYS.reboot_needed) == "true"


def test_node_paused_after_its_grant_has_the_grant_cancelled(rig: Rig) -> None:
    # No agents: the test plays the one agent step it needs, on the second node.
    first, second = rig.add_nodes(2)
    rig.start("--before-reboot-annotations", BEFORE_HOOK)
    wait_for(lambda: rig.node(first).metadata.labels.get(KEYS.before_reboot) == "true", 20,
             "the first node to take the slot and get the before-reboot label")
    rig.annotate(first, {BEFORE_HOOK: "true"})
    wait_for(lambda: rig.annotations(first).get(KEYS.reboot_ok) == "true", 20,
             "the first node's grant")
    rig.annotate(first, {KEYS.reboot_paused: "true"})  # paused before its agent started
    wait_for(lambda: rig.slot_holders() == {"cluo-reboot-slot-0": second}, 20,
             "the slot to go to the second node")
    assert rig.annotations(first).get(KEYS.reboot_ok) == "false"
    assert rig.events(first, "RebootCancelled")

    # The second node is paused while its (played) agent drains it: the grant is withdrawn
    # at once, the slot stays until the agent stopped and uncordoned the node.
    rig.annotate(second, {BEFORE_HOOK: "true"})
    wait_for(lambda: rig.annotations(second).get(KEYS.reboot_ok) == "true", 20,
             "the second node's grant")
    rig.annotate(second, {KEYS.reboot_in_progress: "true",
                          KEYS.agent_made_unschedulable: "true"})
    rig.core.patch_node(second, {"spec": {"unschedulable": True}})
    rig.annotate(second, {KEYS.reboot_paused: "true"})
    wait_for(lambda: rig.annotations(second).get(KEYS.reboot_ok) == "false", 20,
             "the second node's grant to be withdrawn")
    labels = rig.node(second).metadata.labels or {}
    assert KEYS.before_reboot not in labels and BEFORE_HOOK not in rig.annotations(second)
    assert_stays(lambda: rig.slot_holders() == {"cluo-reboot-slot-0": second}, 1.0,
                 "the slot to stay while the agent still drains the cordoned node")
    rig.annotate(second, {KEYS.reboot_in_progress: "false"})
    rig.core.patch_node(second, {"spec": {"unschedulable": False}})
    rig.annotate(second, {KEYS.agent_made_unschedulable: None})
    wait_for(lambda: not rig.slot_holders(), 20, "the slot to be released")
    for name in (first, second):
        assert rig.annotations(name).get(KEYS.reboot_needed) == "true"  # queues when unpaused


def test_malformed_value_is_reported_once_by_an_event_naming_key_and_value(rig: Rig) -> None:
    odd, fine = rig.add_nodes(2)
    rig.annotate(odd, {KEYS.reboot_paused: "True"})  # meant as a pause, but not "true"
    coord = rig.start()
    with rig.agents() as agents:
        wait_for(lambda: rig.done(fine), 30, "the well-formed node to reboot and finish")
        wait_for(lambda: rig.events(odd, "MalformedValue"), 10, "a MalformedValue Event")
        rig.annotate(odd, {KEYS.status: "UPDATE_STATUS_IDLE"})  # another change: no report
        assert_stays(lambda: KEYS.reboot_ok not in rig.annotations(odd), 1.0,
                     "the node with the malformed value to get no grant")
    assert not agents.errors
    (event,) = rig.events(odd, "MalformedValue")
    assert event.type == "Warning"
    assert f"{KEYS.reboot_paused} must be 'true' or 'false', not 'True'" in event.message
    assert coord.metric("cluo_nodes_with_malformed_values") == 1
    logged = [e for e in coord.entries() if e["msg"] == "malformed value"]
    assert [e["node"] for e in logged] == [odd]


def test_closed_window_grants_nothing_and_open_window_grants(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    names = rig.add_nodes(1)
    now = datetime.now(UTC)
    closed = f"{now + timedelta(hours=2):%H:%M} 1h"
    opened = f"{now - timedelta(minutes=5):%H:%M} 1h"
    closed_coord = rig.start("--reboot-windows", closed, "--time-zone", "UTC", name="closed")
    assert_stays(lambda: not rig.slot_holders(), 2.0, "no slot outside the window")
    closed_coord.stop()
    rig.start("--reboot-windows", opened, "--time-zone", "UTC", name="open")
    with rig.agents() as agents:
        wait_for(_all_done(rig, names), 30, "the node to reboot inside the window")
    assert not agents.errors
    assert recorder.grant_order() == names


def test_grant_is_refused_when_the_slot_lease_moved_since_the_plan(
    rig: Rig, coord_kubeconfig: Path
) -> None:
    """Rule 3, driven in-process: reboot-ok=true only while the slot Lease is unchanged."""
    from cluo.errors import KubeError
    from cluo.kube.config import kubeconfig_client
    from cluo.kube.nodes import KubeNodes
    from cluo_coord.cluster import ClusterCache, ClusterWriter
    from cluo_coord.coordinator import Coordinator
    from cluo_coord.leases import KubeSlots
    from cluo_coord.metrics import CoordMetrics
    from cluo_coord.planner import AcquireSlot, GrantRebootOk, Policy, ReleaseSlot

    (name,) = rig.add_nodes(1)
    api = kubeconfig_client(coord_kubeconfig, "cluo-coord")
    try:
        slots = KubeSlots(api, NAMESPACE)
        cache = ClusterCache(api, NAMESPACE, KEYS, node_selector=rig.selector)
        metrics = CoordMetrics()
        coordinator = Coordinator(
            cache, writer=ClusterWriter(api, NAMESPACE, KEYS), slots=slots,
            nodes=KubeNodes(api, KEYS), policy=Policy(), metrics=metrics)
        now = datetime.now(UTC)
        taken = slots.acquire(AcquireSlot(0, name, None, "boot", now))
        assert taken.resource_version is not None
        node_version = rig.node(name).metadata.resource_version
        # The slot moves on (released) after the planner saw it taken.
        slots.release(ReleaseSlot(0, name, taken.resource_version, now))
        grant = GrantRebootOk(name, 0, node_version, taken.resource_version)
        with pytest.raises(KubeError) as refused:
            coordinator._apply(grant, {})
        assert refused.value.kind == "conflict"
        assert KEYS.reboot_ok not in rig.annotations(name)
        assert metrics.grants._value.get() == 0
    finally:
        api.close()


def test_node_check_passes_at_the_planned_version_and_fails_as_the_write_would(
    rig: Rig, coord_kubeconfig: Path
) -> None:
    """Rule 4's no-op reset, as the coordinator's ServiceAccount: an uncached read that
    fails with the write's 409 once the node moved on, and its 404 once it is gone."""
    from cluo.errors import KubeError
    from cluo.kube.config import kubeconfig_client
    from cluo_coord.cluster import ClusterWriter

    (name,) = rig.add_nodes(1)
    api = kubeconfig_client(coord_kubeconfig, "cluo-coord")
    try:
        writer = ClusterWriter(api, NAMESPACE, KEYS)
        planned = rig.node(name).metadata.resource_version
        writer.check_node(name, planned)
        rig.annotate(name, {KEYS.last_checked_time: "1800000000"})  # the agent checked
        moved = rig.node(name).metadata.resource_version
        with pytest.raises(KubeError) as stale:
            writer.check_node(name, planned)
        assert (stale.value.kind, stale.value.status) == ("conflict", 409)
        assert name in str(stale.value)
        assert planned in str(stale.value) and moved in str(stale.value)
        with pytest.raises(KubeError) as gone:
            writer.check_node(f"{name}-gone", moved)
        assert (gone.value.kind, gone.value.status) == ("not_found", 404)
    finally:
        api.close()


def test_node_view_is_rebuilt_only_when_its_resource_version_changes(
    rig: Rig, coord_kubeconfig: Path
) -> None:
    """The cache keeps each node's planner view until the Node's resourceVersion moves."""
    from cluo.kube.config import kubeconfig_client
    from cluo_coord.cluster import ClusterCache

    quiet, changed = rig.add_nodes(2, needing_reboot=False)
    api = kubeconfig_client(coord_kubeconfig, "cluo-coord")
    cache = ClusterCache(api, NAMESPACE, KEYS, node_selector=rig.selector)
    try:
        cache.start()
        wait_for(lambda: cache.synced, 20, "the cache to sync")
        before = {view.name: view for view in cache.snapshot().nodes}
        assert set(before) == {quiet, changed}
        assert not before[changed].state.reboot_paused

        rig.annotate(changed, {KEYS.reboot_paused: "true"})
        wait_for(lambda: cache.snapshot().nodes[1].resource_version
                 != before[changed].resource_version, 10, "the watch to deliver the change")
        after = {view.name: view for view in cache.snapshot().nodes}
        assert after[changed].state.reboot_paused
        assert after[changed].resource_version == rig.node(changed).metadata.resource_version
        assert after[quiet] is before[quiet]  # not rebuilt: its version did not move
    finally:
        cache.stop()
        api.close()


def test_reboot_timeout_fires_from_its_deadline_while_the_loop_idles(
    rig: Rig, coord_kubeconfig: Path
) -> None:
    """No watch event and no polling: the planner's deadline wakes the loop (time injected)."""
    from cluo.kube.config import kubeconfig_client
    from cluo.kube.nodes import KubeNodes
    from cluo_coord.cluster import ClusterCache, ClusterWriter
    from cluo_coord.coordinator import Coordinator
    from cluo_coord.leases import KubeSlots
    from cluo_coord.metrics import CoordMetrics
    from cluo_coord.planner import Policy

    (name,) = rig.add_nodes(1)
    shift = [timedelta(0)]
    api = kubeconfig_client(coord_kubeconfig, "cluo-coord")
    woken: list[Coordinator] = []
    cache = ClusterCache(api, NAMESPACE, KEYS, node_selector=rig.selector,
                         on_change=lambda: woken[0].wake() if woken else None)
    coordinator = Coordinator(
        cache, writer=ClusterWriter(api, NAMESPACE, KEYS), slots=KubeSlots(api, NAMESPACE),
        nodes=KubeNodes(api, KEYS), policy=Policy(reboot_timeout=timedelta(hours=1)),
        metrics=CoordMetrics(), clock=lambda: datetime.now(UTC) + shift[0], tick=0.05)
    woken.append(coordinator)
    stop = threading.Event()
    loop = threading.Thread(target=coordinator.run, args=(stop,), daemon=True)
    try:
        cache.start()
        loop.start()
        wait_for(lambda: rig.annotations(name).get(KEYS.reboot_ok) == "true", 20,
                 "the grant")
        rig.annotate(name, {KEYS.reboot_in_progress: "true"})  # the agent drains: no return
        settled = [-1]

        def settled_now() -> bool:
            previous, settled[0] = settled[0], coordinator.plans
            return previous == settled[0]

        wait_for(settled_now, 10, "the loop to stop planning", interval=0.5)
        assert_stays(lambda: coordinator.plans == settled[0], 2.0,
                     "no plan while nothing changes (the loop ticks every 0.05 s)")
        lease = "cluo-reboot-slot-0"
        coordination = CoordinationV1Api(rig.admin)
        assert not (coordination.read_namespaced_lease(lease, NAMESPACE).metadata.annotations
                    or {}).get("cluo.flatcar-linux.net/stuck")

        shift[0] = timedelta(hours=1, seconds=1)  # past the reboot timeout
        wait_for(lambda: (coordination.read_namespaced_lease(lease, NAMESPACE).metadata
                          .annotations or {}).get("cluo.flatcar-linux.net/stuck") == "true",
                 10, "the holder marked stuck at its deadline")
        # The Event is posted after the mark it reports is written.
        wait_for(lambda: rig.events(name, "RebootTimedOut"), 10, "the RebootTimedOut Event")
    finally:
        stop.set()
        loop.join(10)
        cache.stop()
        api.close()


# Last in the file: it restarts the session's kube-apiserver.
def test_api_server_outage_while_a_node_reboots_then_the_roll_resumes(
    rig: Rig, control_plane: ControlPlane
) -> None:
    first, second, third = rig.add_nodes(3)
    coord = rig.start()
    # Two recordings: a watch cannot resume across an API server restart (its watch cache
    # starts anew, so the old resourceVersion is too old). Between them only the
    # coordinator could change who is in flight, and it cannot: the one slot is held by
    # the first node, which is down until this test boots it.
    before = InFlightRecorder(rig.admin, rig.selector, NAMESPACE, KEYS).start()
    with rig.agents(never_return=frozenset({first})) as agents:
        rig.wait_until_down(first, agents)
        before.stop()
        assert not before.errors, before.errors
        assert before.history()[-1].in_flight == {first}

        control_plane.stop_apiserver()
        try:
            outage_ends = time.monotonic() + 15
            wait_for(lambda: "list or watch failed, retrying" in coord.log_path.read_text(),
                     15, "the coordinator to notice the outage")
            while time.monotonic() < outage_ends:
                assert coord.process.poll() is None, f"cluo-coord exited:\n{coord.log_tail()}"
                time.sleep(0.5)
            assert coord.get("/healthz")[0] == 200, "a loop that waits is healthy"
        finally:
            control_plane.start_apiserver()

        after = InFlightRecorder(rig.admin, rig.selector, NAMESPACE, KEYS).start()
        try:
            assert after.history()[-1].in_flight == {first}, "nothing moved in between"
            # The first node comes back, as its agent would report it.
            host = rig.emulator.node(first)
            new_boot = host.boot()
            wait_for(lambda: rig.node(first).status.node_info.boot_id == new_boot, 30,
                     f"{first} to report its new bootID")
            rig.annotate(first, {KEYS.reboot_needed: "false", KEYS.reboot_in_progress: "false"})
            wait_for(lambda: rig.annotations(first).get(KEYS.reboot_ok) == "false", 90,
                     f"the coordinator to set reboot-ok=false on {first}")
            rig.core.patch_node(first, {"spec": {"unschedulable": False}})  # as its agent would
            rig.annotate(first, {KEYS.agent_made_unschedulable: None})
            wait_for(_all_done(rig, [first, second, third]), 90,
                     "the coordinator to hand on the slot and finish the roll after the outage")
        finally:
            after.stop()
    assert not agents.errors, agents.errors
    assert agents.list_failures > 0, "the outage reached the agents too"
    assert not after.errors, after.errors
    assert before.max_in_flight() == after.max_in_flight() == 1
    assert after.grant_order() == [first, second, third]  # the first: granted when it started
    assert coord.process.poll() is None, "the same process rode the outage out"
    assert coord.metric("cluo_grants_total") == 3
    failed = [e for e in coord.entries() if e["msg"] == "list or watch failed, retrying"]
    assert {e.get("what") for e in failed} >= {"nodes"}, failed[:3]
