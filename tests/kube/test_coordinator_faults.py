"""Faults under the real coordinator: what an operator meets in week two.

The rig of tests/kube/test_coordinator.py (the real ``cluo-coord`` as a process with its
ServiceAccount, KWOK-emulated nodes, ``FakeAgents`` standing in for the agents) with
faults that test file does not cover: etcd killed and restarted under a running roll; the
elected leader of two replicas killed with SIGKILL mid-roll.
Each test keeps its own `InFlightRecorder`, because the recorder must ride the fault out
(re-listing, reporting any gap) instead of failing the test at its end.
"""

from __future__ import annotations

from collections.abc import Iterator

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


@pytest.fixture
def recorder(rig: Rig) -> Iterator[InFlightRecorder]:
    rec = InFlightRecorder(rig.admin, rig.selector, NAMESPACE, KEYS).start()
    yield rec
    rec.stop()


def _finish_reboot_as_its_agent(rig: Rig, name: str) -> None:
    """The node that went down comes back; play its agent's part to the end of its cycle."""
    new_boot = rig.emulator.node(name).boot()
    wait_for(lambda: rig.node(name).status.node_info.boot_id == new_boot, 30,
             f"{name} to report its new bootID")
    rig.annotate(name, {KEYS.reboot_needed: "false", KEYS.reboot_in_progress: "false"})
    wait_for(lambda: rig.annotations(name).get(KEYS.reboot_ok) == "false", 60,
             f"the coordinator to set reboot-ok=false on {name}")
    rig.core.patch_node(name, {"spec": {"unschedulable": False}})
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

        _finish_reboot_as_its_agent(rig, middle)
        wait_for(lambda: all(rig.done(name) for name in names), 60,
                 "the roll to finish after etcd's restart")
    assert not agents.errors, agents.errors
    assert coord.process.poll() is None, f"cluo-coord exited:\n{coord.log_tail()}"
    for gap in recorder.gaps:  # a gap may only be where nothing could change: etcd was down
        assert gap.relisted is not None, gap
    assert recorder.max_in_flight(allow_gaps=True) == 1
    assert recorder.grant_order(allow_gaps=True) == names  # each granted once, in order
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
