"""The driver and the health gate and blockers: the grant records the workloads on its
slot Lease (a compare-and-swap at the planned version, which is rule 3's check of the
global slot: no read of it follows), a blocker that changes makes
the loop plan again though the cluster did not, a closed gate is re-checked on a timer,
and every hold is logged, counted and posted once when it starts.

The real ``Coordinator`` loop on the fakes of tests/unit/coord_fakes.py and fake time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import timedelta

from cluo.protocol import TRUE
from cluo_coord.health import GATE_EVENT_REASON, HOLD_EVENT_REASON
from cluo_coord.planner import NodeView, Policy, SlotLease
from cluo_coord.workloads import GATE_RECHECK
from tests.unit.coord_fakes import KEYS, T0, Cluster, CoordRig, FakeSlots, patched

BEFORE_HOOK = "hooks.example.com/before-check"


class FakeGates:
    """The health gate: ``record_grant`` is a compare-and-swap on the slot, as
    ``WorkloadGates``' is; ``closing`` says which holders' gates are closed."""

    def __init__(self) -> None:
        self.cluster = Cluster.__new__(Cluster)  # the rig's, once it exists
        self.closing: dict[str, str] = {}
        self.checks = 0
        self.read_ahead: list[tuple[str, ...]] = []

    def grant_record(self, node: str) -> str:
        return f"workloads of {node}"

    def prefetch(self, queue: tuple[str, ...]) -> None:
        self.read_ahead.append(queue)

    def record_grant(self, node: str, slot: int, expected_lease_version: str) -> SlotLease:
        return FakeSlots(self.cluster)._write(
            "record_workloads", node, slot, expected_lease_version,
            lambda version: replace(self.cluster.slots[slot], resource_version=version))

    def closed(self, nodes: Iterable[NodeView], slots: Iterable[SlotLease]) -> dict[str, str]:
        self.checks += 1
        held = {slot.holder for slot in slots if slot.holder}
        return {node: why for node, why in self.closing.items() if node in held}


def gated_rig(policy: Policy | None = None) -> tuple[CoordRig, FakeGates]:
    gates = FakeGates()
    rig = CoordRig(policy, gates=gates)
    gates.cluster = rig.cluster
    return rig, gates


class FakeBlockers:
    def __init__(self, *firing: str) -> None:
        self.now: tuple[str, ...] = firing
        self.version = 0

    def firing(self) -> tuple[str, ...]:
        return self.now

    def change(self, *firing: str) -> None:
        self.now = firing
        self.version += 1


def test_the_grant_records_the_workloads_and_that_write_is_its_lease_check() -> None:
    rig, _ = gated_rig(Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE, BEFORE_HOOK: TRUE})
    rig.cluster.nodes["a"].labels[KEYS.before_reboot] = TRUE  # hooks done: next, the grant
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=1))
    journal = rig.run(until=5)
    (record,) = journal.of("record_workloads")
    (grant,) = patched(journal.entries, KEYS.reboot_ok)
    assert journal.index(record) < journal.index(grant)
    assert not journal.of("read_lease"), "the global slot Lease read again after its CAS"


def test_without_hooks_the_acquisition_carries_the_record_and_is_the_lease_check() -> None:
    rig, gates = gated_rig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    journal = rig.run(until=5)
    (acquire,) = journal.of("acquire")
    (record,) = journal.of("acquire_workloads")
    (grant,) = patched(journal.entries, KEYS.reboot_ok)
    assert record.node == "a" and record.detail == gates.grant_record("a")
    assert journal.index(acquire) < journal.index(grant)
    assert rig.cluster.nodes["a"].labels.get(KEYS.before_reboot) is None
    assert not journal.of("record_workloads") and not journal.of("read_lease")
    assert not rig.cluster.unbacked_grants


def test_without_hooks_a_lease_moved_since_the_plan_fails_the_acquisition_and_the_grant(
) -> None:
    rig, _ = gated_rig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    rig.cache.lag()  # the cache has not seen the slot change below yet
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    rig.cluster.hold(0, "b", acquired_at=T0)
    journal = rig.run(until=30)
    refused = journal.of("acquire", ok=False)
    assert refused and refused[0].failed == "conflict"
    assert not rig.cluster.unbacked_grants, "reboot-ok=true while no slot Lease named the node"
    assert not patched(journal.entries[:journal.index(journal.of("refresh")[0])],
                       KEYS.reboot_ok)


def test_the_queue_is_offered_for_reading_ahead_at_every_plan_without_hooks() -> None:
    rig, gates = gated_rig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: "false"})
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5), holder_boot_id="boot-old")
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    rig.run(until=5)
    assert gates.read_ahead[0] == ("b",)


def test_a_lease_moved_since_the_plan_fails_the_record_and_so_the_grant() -> None:
    rig, _ = gated_rig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    rig.cluster.nodes["a"].labels[KEYS.before_reboot] = TRUE  # hooks done: next, the grant
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=1))
    rig.cache.lag()  # the cache has not seen the slot change below yet
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    rig.cluster.hold(0, "b", acquired_at=T0)  # released and taken by another node
    journal = rig.run(until=30)
    (refused,) = journal.of("record_workloads", ok=False)
    assert refused.t == 0 and refused.failed == "conflict"
    assert not rig.cluster.unbacked_grants, "reboot-ok=true while no slot Lease named the node"
    assert not patched(journal.entries[:journal.index(journal.of("refresh")[0])],
                       KEYS.reboot_ok)


def test_a_blocker_holds_new_slots_and_the_loop_plans_again_once_it_stops() -> None:
    blockers = FakeBlockers("pods matching app=backup exist")
    rig = CoordRig(blockers=blockers)
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    rig.at(30, lambda: (blockers.change(), rig.coordinator.wake()))
    journal = rig.run(until=40)
    (acquire,) = journal.of("acquire")
    assert acquire.t >= 30
    (held,) = journal.of("slot_event")
    assert held.detail == f"0 {HOLD_EVENT_REASON}" and held.t < 1


def test_a_closed_gate_is_checked_again_on_a_timer_and_posted_once() -> None:
    rig, gates = gated_rig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: "false"})
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5), holder_boot_id="boot-old")
    gates.closing = {"a": "ReplicaSet shop/web has 1 of 2 replicas available"}
    rig.at(20, gates.closing.clear)  # no event: only the timer sees it
    journal = rig.run(until=20 + 2 * GATE_RECHECK)
    (release,) = journal.of("release")
    assert 20 <= release.t <= 20 + GATE_RECHECK + 1
    assert gates.checks >= 20 / GATE_RECHECK
    assert next(e.detail for e in journal.of("event") if e.node == "a") == GATE_EVENT_REASON
    assert len([e for e in journal.of("event") if e.detail == GATE_EVENT_REASON]) == 1
