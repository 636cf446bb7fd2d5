"""Groups, --max-unavailable, control-plane nodes and the canary (planner rule 15), on the
real coordinator process against the real control plane, with KWOK-emulated nodes and
stand-in agents (the rig of tests/kube/test_coordinator.py). The recorder's history of
the nodes in flight, ordered by resourceVersion, is where "never more than allowed" is
checked, per group; times compared come from the cluster (Lease fields), not the clock.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from kubernetes.client import CoordinationV1Api

from cluo.kube.objects import api_time
from cluo_coord.groups import CONTROL_PLANE_LABEL, group_slot_lease_name
from cluo_coord.leases import RELEASED_AT
from testbed.recorder import InFlightRecorder
from testbed.waiting import assert_stays, wait_for
from tests.kube import test_coordinator
from tests.kube.test_coordinator import KEYS, NAMESPACE, SELECTOR_LABEL, Rig, _all_done
from tests.kube.test_status import status_json

pytestmark = pytest.mark.kube

# The rig and its fixtures, shared with the coordinator tests.
coord_kubeconfig = test_coordinator.coord_kubeconfig
rig = test_coordinator.rig
recorder = test_coordinator.recorder

TIMEOUT = 90.0


def add_group(rig: Rig, prefix: str, count: int, labels: dict[str, str], *,
              first: int = 0, needing_reboot: bool = True) -> list[str]:
    """``count`` nodes with ``labels`` that need a reboot, queued from ``first`` on."""
    names = [f"{prefix}{rig.test_id}-{i}" for i in range(count)]
    rig.emulator.add_nodes(names, labels={SELECTOR_LABEL: rig.test_id, **labels})
    for i, name in enumerate(names):
        rig.annotate(name, {KEYS.reboot_needed: str(needing_reboot).lower(),
                            KEYS.last_checked_time: str(1_700_000_000 + first + i)})
    wait_for(lambda: all(rig.node(n).status.node_info.boot_id for n in names), 20,
             "the emulated nodes to report a bootID")
    return names


def most_in_flight_of(recorder: InFlightRecorder, names: list[str]) -> int:
    members = set(names)
    return max((len(m.in_flight & members) for m in recorder.history()), default=0)


def test_two_groups_roll_each_within_its_own_concurrency(
        rig: Rig, recorder: InFlightRecorder) -> None:
    """--max-concurrent 3, group big at 2 (its own), the others (the group label) at 1."""
    big = add_group(rig, "big", 3, {"pool": "big"})
    small = add_group(rig, "small", 2, {KEYS.group: "beta"}, first=10)
    rig.start("--max-concurrent", "3", "--group", "big:pool=big;max-concurrent=2",
              "--group-max-concurrent", "1")
    with rig.agents() as agents:
        wait_for(_all_done(rig, big + small), TIMEOUT, "both groups to finish their roll")
        assert agents.errors == []
    assert most_in_flight_of(recorder, big) == 2
    assert most_in_flight_of(recorder, small) == 1
    assert recorder.max_in_flight() == 3
    leases = {
        lease.metadata.name for lease in CoordinationV1Api(rig.admin).list_namespaced_lease(
            NAMESPACE).items if lease.metadata and lease.metadata.name}
    assert {group_slot_lease_name("big", 0), group_slot_lease_name("big", 1),
            group_slot_lease_name("beta", 0)} <= leases
    assert group_slot_lease_name("big", 2) not in leases


def test_a_notready_node_uses_up_max_unavailable_until_it_recovers(
        rig: Rig, recorder: InFlightRecorder) -> None:
    [down] = add_group(rig, "down", 1, {}, needing_reboot=False)
    waiting = add_group(rig, "wait", 2, {}, first=1)
    rig.emulator.node(down).shutdown()
    wait_for(lambda: not any(c.type == "Ready" and c.status == "True"
                             for c in rig.node(down).status.conditions or []),
             TIMEOUT, f"{down} to be NotReady")
    coord = rig.start("--max-concurrent", "2", "--max-unavailable", "1")
    with rig.agents() as agents:
        assert_stays(lambda: not rig.slot_holders(), 3.0,
                     "no slot taken while the NotReady node uses up the budget")
        hold = (f"max-unavailable: 1 of 3 nodes unavailable ({down} NotReady), "
                "max-unavailable 1")
        wait_for(lambda: hold in status_json(rig)["holds"], TIMEOUT,
                 "the status view to say what holds the queue")
        assert coord.metric("cluo_nodes_unavailable") == 1.0
        rig.emulator.node(down).boot()
        wait_for(_all_done(rig, waiting), TIMEOUT, "the waiting nodes to reboot once it is back")
        assert agents.errors == []
    assert recorder.grant_order() == waiting
    assert recorder.max_in_flight() == 1


def test_control_plane_nodes_reboot_one_at_a_time(
        rig: Rig, recorder: InFlightRecorder) -> None:
    control_plane = add_group(rig, "cp", 2, {CONTROL_PLANE_LABEL: ""})
    workers = add_group(rig, "w", 1, {}, first=10)
    rig.start("--max-concurrent", "3")
    with rig.agents() as agents:
        wait_for(_all_done(rig, control_plane + workers), TIMEOUT, "every node to reboot")
        assert agents.errors == []
    assert most_in_flight_of(recorder, control_plane) == 1
    assert recorder.max_in_flight() == 2  # a worker beside one control-plane node


def test_canary_group_goes_first_and_the_others_wait_out_its_soak(
        rig: Rig, recorder: InFlightRecorder) -> None:
    # The workers have waited longer: without the canary rule they would go first.
    workers = add_group(rig, "w", 2, {KEYS.group: "stable"})
    canary = add_group(rig, "c", 1, {KEYS.group: "alpha"}, first=10)
    rig.start("--max-concurrent", "2", "--canary-group", "alpha", "--canary-soak", "3s")
    coordination = CoordinationV1Api(rig.admin)

    def first_worker_slot() -> Any:
        for lease in coordination.list_namespaced_lease(NAMESPACE).items:
            if lease.spec and lease.spec.holder_identity in workers:
                return lease
        return None

    with rig.agents() as agents:
        wait_for(lambda: first_worker_slot() is not None, TIMEOUT,
                 "a worker to take a slot after the canary")
        taken = first_worker_slot()
        assert taken.spec.acquire_time is not None
        wait_for(_all_done(rig, workers + canary), TIMEOUT, "the others to finish")
        assert agents.errors == []
    order = recorder.grant_order()
    assert order[0] == canary[0] and sorted(order[1:]) == sorted(workers)
    released = coordination.read_namespaced_lease(group_slot_lease_name("alpha", 0), NAMESPACE)
    assert released.metadata is not None and released.metadata.annotations
    canary_released = api_time(released.metadata.annotations[RELEASED_AT])
    assert canary_released is not None
    worker_taken = taken.spec.acquire_time
    soak_end = canary_released + timedelta(seconds=3)
    assert worker_taken >= soak_end, (
        f"a worker took a slot at {worker_taken}, before the soak ended at {soak_end}")
