"""Faults under the real coordinator: what an operator meets in week two.

The rig of tests/kube/test_coordinator.py (the real ``cluo-coord`` as a process with its
ServiceAccount, KWOK-emulated nodes, ``FakeAgents`` standing in for the agents) with
faults that test file does not cover: etcd killed and restarted under a running roll; the
elected leader of two replicas killed with SIGKILL mid-roll; a node that comes back from
its reboot NotReady; a reboot window that closes mid-roll.
Each test keeps its own `InFlightRecorder`: there a watch that failed and resumed is no
failure (the fault may cause one), while a gap still makes its summaries refuse.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import urllib3
from kubernetes.client import CoordinationV1Api
from kubernetes.client.exceptions import ApiException

from cluo.protocol import LEADER_LEASE_NAME
from testbed.controlplane import ControlPlane
from testbed.recorder import InFlightRecorder
from testbed.waiting import assert_stays, wait_for
from tests.kube import test_coordinator as coordinator_tests

pytestmark = pytest.mark.kube

Rig = coordinator_tests.Rig
KEYS = coordinator_tests.KEYS
NAMESPACE = coordinator_tests.NAMESPACE
coord_kubeconfig = coordinator_tests.coord_kubeconfig  # fixtures, shared with that file
rig = coordinator_tests.rig

ETCD_DOWN_SECONDS = 10.0
FIRST_WINDOW_SECONDS = 6
NOT_READY = "False"
WINDOW_MARGIN = timedelta(seconds=1)  # the coordinator's and the test's reads of the clock


@pytest.fixture
def recorder(rig: Rig) -> Iterator[InFlightRecorder]:
    rec = InFlightRecorder(rig.admin, rig.selector, NAMESPACE, KEYS).start()
    yield rec
    rec.stop()


def _boot_back(rig: Rig, name: str, boot_id: str | None = None) -> None:
    """The node that went down boots (Ready, a new bootID) and its agent reports it back."""
    new_boot = rig.emulator.node(name).boot(boot_id)
    wait_for(lambda: rig.node(name).status.node_info.boot_id == new_boot, 30,
             f"{name} to report its new bootID")
    rig.annotate(name, {KEYS.reboot_needed: "false", KEYS.reboot_in_progress: "false"})


def _agent_finishes(rig: Rig, name: str) -> None:
    """The rest of the agent's part: once reboot-ok=false (which uncordoned the node the
    agent cordoned), remove the recorded boot id."""
    wait_for(lambda: rig.annotations(name).get(KEYS.reboot_ok) == "false", 60,
             f"the coordinator to set reboot-ok=false on {name}")
    assert not rig.node(name).spec.unschedulable, "the reset uncordons the node"
    rig.annotate(name, {KEYS.agent_made_unschedulable: None,
                        KEYS.boot_id_before_reboot: None})


def _api_reads(rig: Rig) -> bool:
    """A quorum read of the Nodes answers (it goes to etcd, past the watch cache)."""
    try:
        rig.core.list_node(label_selector=rig.selector, resource_version="",
                           _request_timeout=2)
    except (ApiException, urllib3.exceptions.HTTPError):
        return False
    return True


def test_etcd_restart_mid_roll_then_the_roll_completes_one_at_a_time(
    rig: Rig, recorder: InFlightRecorder, control_plane: ControlPlane
) -> None:
    names = rig.add_nodes(3)
    first, middle = names[:2]
    boots = {name: rig.node(name).status.node_info.boot_id for name in names}
    coord = rig.start()
    # The middle node goes down and stays down through the outage, holding the slot: its
    # stand-in agent is done at the shutdown, so no stand-in writes while etcd is away.
    with rig.agents(never_return=frozenset({middle})) as agents:
        wait_for(lambda: rig.done(first), 40, "the first node to reboot and finish")
        wait_for(lambda: rig.annotations(middle).get(KEYS.reboot_in_progress) == "true"
                 and agents.settled(), 30, "the middle node to be granted and go down")

        control_plane.stop_etcd()
        try:
            wait_for(lambda: not _api_reads(rig), 10, "the API server to fail reads")
            assert_stays(lambda: coord.process.poll() is None, ETCD_DOWN_SECONDS,
                         "cluo-coord to keep running while etcd is down")
        finally:
            control_plane.start_etcd()
        assert rig.slot_holders() == {"cluo-reboot-slot-0": middle}, "the slot survived"

        _boot_back(rig, middle)
        _agent_finishes(rig, middle)
        wait_for(lambda: all(rig.done(name) for name in names), 60,
                 "the roll to finish after etcd's restart")
    assert not agents.errors, agents.errors
    assert coord.process.poll() is None, f"cluo-coord exited:\n{coord.log_tail()}"
    # The API server's watches ride etcd's restart out (they resume from their versions),
    # so the recorder has no gap to excuse: it saw every state.
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == names  # each granted once, in order
    for name in names:
        assert rig.node(name).status.node_info.boot_id != boots[name], f"{name} rebooted"
    assert coord.metric("cluo_grants_total") == 3


def test_leader_killed_mid_roll_the_standby_takes_over_and_finishes(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    names = rig.add_nodes(3)
    coords = [rig.start(leader_elect=True, name=f"replica{i}") for i in range(2)]
    wait_for(lambda: sorted(c.metric("cluo_is_leader") or 0 for c in coords) == [0, 1], 20,
             "one replica to lead and the other to stand by")
    leader, standby = sorted(coords, key=lambda c: c.metric("cluo_is_leader") or 0,
                             reverse=True)
    with rig.agents() as agents:
        # Mid-roll: the second node granted, its reboot under way, the first one done.
        wait_for(lambda: rig.annotations(names[1]).get(KEYS.reboot_ok) == "true", 40,
                 "the leader to grant the second node")
        assert not standby.leading()
        leader.process.kill()  # SIGKILL: no step-down, its Lease must expire
        leader.process.wait(5)
        rig.coordinators.remove(leader)  # its exit by -9 is this test's doing
        wait_for(standby.leading, 30, "the standby to take over once the leader Lease expired")
        wait_for(lambda: all(rig.done(name) for name in names), 60,
                 "the standby to finish the roll")
    assert not agents.errors, agents.errors
    lease = CoordinationV1Api(rig.admin).read_namespaced_lease(LEADER_LEASE_NAME, NAMESPACE)
    assert lease.spec.holder_identity == standby.identity
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == names  # each node granted once: no double reboot
    assert standby.metric("cluo_grants_total") == 1  # the last node; the leader did two


def test_node_back_but_not_ready_keeps_its_slot_until_ready(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    slow, nxt = rig.add_nodes(2)
    rig.start()
    with rig.agents(never_return=frozenset({slow})) as agents:
        wait_for(lambda: rig.annotations(slow).get(KEYS.reboot_in_progress) == "true"
                 and agents.settled(), 30, "the first node to be granted and go down")
        # Its host boots but its kubelet posts NotReady (the emulator is silent for a host
        # that is down, so this status stays); the agent, up, reports the reboot done.
        new_boot = str(uuid.uuid4())
        rig.core.patch_node_status(slow, {"status": {
            "nodeInfo": {"bootID": new_boot},
            "conditions": [{"type": "Ready", "status": NOT_READY, "reason": "KubeletNotReady",
                            "message": "container runtime network not ready"}]}})
        rig.annotate(slow, {KEYS.reboot_needed: "false", KEYS.reboot_in_progress: "false"})
        assert not _ready(rig, slow)
        assert_stays(lambda: rig.slot_holders() == {"cluo-reboot-slot-0": slow}
                     and rig.annotations(slow).get(KEYS.reboot_ok) == "true"
                     and KEYS.reboot_ok not in rig.annotations(nxt), 4.0,
                     "the slot to stay with the node back but NotReady, nothing granted")
        _boot_back(rig, slow, new_boot)  # now Ready
        _agent_finishes(rig, slow)
        wait_for(lambda: rig.done(nxt), 40, "the next node to reboot once the first is Ready")
    assert not agents.errors, agents.errors
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == [slow, nxt]


def _ready(rig: Rig, name: str) -> bool:
    conditions = rig.node(name).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def test_window_closing_mid_roll_grants_nothing_until_it_reopens(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    names = rig.add_nodes(4)
    # The first window closes a few seconds after the coordinator starts; the next one
    # opens on the first minute boundary at least 5 s later (windows start on a minute).
    now = datetime.now(UTC)
    minute = now.replace(second=0, microsecond=0)
    closes = now + timedelta(seconds=FIRST_WINDOW_SECONDS)
    reopens = (closes + timedelta(seconds=65)).replace(second=0, microsecond=0)
    windows = (f"{minute:%H:%M} {(closes - minute).total_seconds():.0f}s, "
               f"{reopens:%H:%M} 1h")
    rig.start("--reboot-windows", windows, "--time-zone", "UTC")
    # Nodes that stay down for 2 s: the window closes before the last node's turn.
    with rig.agents(down_for=2.0) as agents:
        wait_for(lambda: datetime.now(UTC) >= closes + WINDOW_MARGIN, 30,
                 "the first window to close")
        granted = _granted_or_done(rig, names)
        assert granted and granted != set(names), (
            f"the roll must be under way when the window closes (granted: {granted})")
        assert_stays(lambda: _granted_or_done(rig, names) == granted,
                     (reopens - WINDOW_MARGIN - datetime.now(UTC)).total_seconds(),
                     "no new grant while every window is closed")
        wait_for(lambda: all(rig.done(name) for name in names), 60,
                 "the roll to finish in the window that reopened")
    assert not agents.errors, agents.errors
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == names


def _granted_or_done(rig: Rig, names: list[str]) -> set[str]:
    """The nodes granted so far (reboot-ok is set, true or already false again)."""
    return {name for name in names if KEYS.reboot_ok in rig.annotations(name)}
