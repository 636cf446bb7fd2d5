"""The reconcile loop plans on events and deadlines only, never by polling.

The real loop runs on fakes and fake time (tests/unit/coord_fakes.py), in the test's
thread: an idle loop makes no plan, and a rule that depends on time alone (a reboot
timeout, a window opening, a cache entry expiring) fires at its time, with no watch
event; a wall-clock step forward is noticed within a tick; a standby does not spin.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cluo.protocol import TRUE
from cluo_coord.coordinator import DEADLINE_SLACK, IDLE_TICK
from cluo_coord.planner import Policy
from cluo_coord.windows import parse_windows
from tests.unit.coord_fakes import KEYS, T0, Cluster, CoordRig, Standby

BEFORE_HOOK = "hooks.example.com/before-check"
IN_PROGRESS = {KEYS.reboot_needed: TRUE, KEYS.reboot_ok: TRUE, KEYS.reboot_in_progress: TRUE}


def on_time(due: float) -> object:
    """A time matching ``due``: at it, or at the monotonic wake-up just after it (the wall
    clock says it passed at ``due`` when a tick lands there)."""
    return pytest.approx(due + DEADLINE_SLACK / 2, abs=DEADLINE_SLACK / 2 + 1e-6)


def test_idle_loop_makes_no_plan_between_events() -> None:
    rig = CoordRig(Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    rig.cluster.add_node("a")
    rig.at(10, rig.coordinator.wake)  # a watch event that changed nothing the plan reads
    rig.event_at(20, lambda cluster: cluster.annotate("a", **{KEYS.reboot_needed: TRUE}))
    journal = rig.run(until=60)
    # The first plan; then the one for the change, and one more at once after its writes
    # (the node then waits for its before-reboot hook: only an event can move it on).
    assert journal.times("plan") == [0, 20, 20]
    assert journal.times("acquire") == [20]


def test_reboot_timeout_fires_on_time_without_any_event() -> None:
    rig = CoordRig(Policy(reboot_timeout=timedelta(hours=1)))
    rig.cluster.add_node("a", **IN_PROGRESS)
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=50))
    journal = rig.run(until=900)
    assert journal.times("mark_stuck") == [on_time(600)]
    (marked,) = journal.times("mark_stuck")
    assert journal.times("plan") == [0, marked, marked]
    assert [(e.node, e.detail) for e in journal.of("event")] == [("a", "RebootTimedOut")]


def test_a_wall_clock_step_forward_is_noticed_within_a_tick() -> None:
    rig = CoordRig(Policy(reboot_timeout=timedelta(hours=1)))
    rig.cluster.add_node("a", **IN_PROGRESS)
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=50))
    rig.at(5, lambda: rig.time.step_wall(timedelta(minutes=10)))  # the monotonic clock: 5 s
    journal = rig.run(until=60)
    (marked,) = journal.times("mark_stuck")
    assert 5 <= marked <= 5 + IDLE_TICK


def test_new_slots_are_taken_when_the_window_opens_without_any_event() -> None:
    policy = Policy(windows=parse_windows("Mon 10:00 1h"),
                    before_reboot_annotations=(BEFORE_HOOK,))
    rig = CoordRig(policy, wall=datetime(2026, 3, 2, 9, 59, 30, tzinfo=UTC))
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    journal = rig.run(until=120)
    assert journal.times("acquire") == [on_time(30)]
    holder = rig.cluster.slots[0]
    assert holder.holder == "a"
    assert holder.acquired_at is not None
    assert holder.acquired_at >= datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    # The node now waits for its before-reboot hook: no plan after the one that follows
    # the writes.
    (acquired,) = journal.times("acquire")
    assert journal.times("plan") == [0, acquired, acquired]


def test_cache_override_expiring_replans_without_any_event() -> None:
    rig = CoordRig()
    rig.cluster.add_node("a")
    rig.cluster.expires_in = 3.0  # a slot this coordinator wrote stops overriding the watch
    journal = rig.run(until=30)
    assert journal.times("plan") == [0, on_time(3)]


def test_changes_the_planner_ignores_make_no_plan() -> None:
    rig = CoordRig(Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    rig.cluster.add_node("a", **{KEYS.last_checked_time: "1700000000"})
    rig.cluster.add_node("b")
    # The agent refreshes last-checked-time: no cycle, no reboot needed.
    rig.event_at(10, lambda cluster: cluster.annotate(
        "a", **{KEYS.last_checked_time: "1700003600"}))
    rig.event_at(20, lambda cluster: cluster.annotate("a", **{KEYS.reboot_needed: TRUE}))
    journal = rig.run(until=40)
    assert 10 in journal.times("snapshot"), "the loop looked at the change"
    assert journal.times("plan") == [0, 20, 20]
    assert journal.times("acquire") == [20]


def test_a_change_to_a_slot_holder_is_planned_even_when_it_looks_idle() -> None:
    rig = CoordRig()
    rig.cluster.add_node("a", **IN_PROGRESS)
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5))

    def back(cluster: Cluster) -> None:  # the agent is back: no flag, the slot names it
        cluster.annotate("a", **dict.fromkeys(IN_PROGRESS))

    rig.event_at(10, back)
    journal = rig.run(until=30)
    assert journal.times("release") == [10]


def test_a_holder_between_two_ignored_states_is_still_planned() -> None:
    # The slot names a node that is NotReady with no flags (re-registered while it
    # rebooted): the plan changes nothing. NotReady and Ready without flags are both
    # states the planner ignores for an unslotted node; only the slot makes the node's
    # readiness worth a plan.
    rig = CoordRig()
    rig.cluster.add_node("a")
    rig.cluster.set_ready("a", False)
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5))
    rig.event_at(10, lambda cluster: cluster.set_ready("a", True))
    journal = rig.run(until=30)
    assert journal.times("plan")[:2] == [0, 10]
    assert journal.times("release") == [10]


def test_a_standby_sleeps_through_events() -> None:
    standby = Standby()
    rig = CoordRig(leadership=standby)
    rig.cluster.add_node("a")
    wakes = [t / 10 for t in range(1, 200)]  # a standby's caches see events all the time
    for t in wakes:
        rig.at(t, rig.coordinator.wake)
    journal = rig.run(until=20)  # a loop that does not clear the wake-up spins: Spinning
    # One turn per tick and per event at most.
    assert standby.asked <= 20 / IDLE_TICK + len(wakes) + 2
    assert not journal.of("plan", "snapshot")


def test_a_malformed_value_is_reported_once_per_change() -> None:
    rig = CoordRig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: "true", KEYS.reboot_paused: "True"})
    rig.cluster.add_node("b")
    rig.event_at(5, lambda cluster: cluster.annotate("b", **{KEYS.status: "anything"}))
    rig.event_at(10, lambda cluster: cluster.annotate("a", **{KEYS.reboot_paused: "yes"}))
    rig.event_at(15, lambda cluster: cluster.annotate("a", **{KEYS.last_checked_time: "1"}))
    rig.event_at(20, lambda cluster: cluster.annotate("a", **{KEYS.reboot_paused: "true"}))
    rig.event_at(25, lambda cluster: cluster.annotate("a", **{KEYS.reboot_paused: "yes"}))
    metrics = rig.coordinator._metrics
    seen: list[float] = []
    rig.at(12, lambda: seen.append(metrics.nodes_with_malformed_values._value.get()))
    rig.at(22, lambda: seen.append(metrics.nodes_with_malformed_values._value.get()))
    journal = rig.run(until=30)
    reported = [e for e in journal.of("event") if e.detail == "MalformedValue"]
    # 'True' at the start, 'yes' at 10, fixed at 20, 'yes' again at 25: three reports,
    # none for the other changes of the same node or of others.
    assert [(e.node, round(e.t)) for e in reported] == [("a", 0), ("a", 10), ("a", 25)]
    assert seen == [1, 0]
    assert metrics.events.labels(type="Warning", reason="MalformedValue")._value.get() == 3
