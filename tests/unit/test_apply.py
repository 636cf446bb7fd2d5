"""How a plan's changes are applied: which change waits for which, and the two runners.

The schedule is checked by property: for any plan, a change waits (directly or through
others) for exactly the earlier changes that touch the same node or Lease, for the change
an Event reports, and across a PauseRoll; the plan's order is always a valid order. The
pooled runner is checked with changes that block until the test lets them go, so each
test proves what runs at the same time and what never does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluo.errors import KubeError
from cluo_coord.apply import (
    Applied,
    InOrder,
    Pooled,
    Step,
    one_chain,
    schedule,
    touches,
)
from cluo_coord.brake import FailedReboot
from cluo_coord.planner import (
    AcquireSlot,
    Change,
    EmitEvent,
    EventType,
    GrantRebootOk,
    LabelAfterReboot,
    LabelBeforeReboot,
    MarkStuck,
    PauseRoll,
    Reason,
    RecordFailedReboot,
    ReleaseSlot,
    ResetRebootOk,
)
from testbed.waiting import wait_for

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
WAIT = 10.0  # s: the longest a test waits for a worker to get somewhere

# -- the schedule ----------------------------------------------------------------------

node_names = st.sampled_from(["a", "b", "c"])
slot_indices = st.integers(min_value=0, max_value=2)
groups = st.sampled_from(["", "", "g"])


def _event(node: str) -> EmitEvent:
    return EmitEvent(node, EventType.NORMAL, Reason.REBOOT_FINISHED, "done")


changes = st.one_of(
    st.builds(lambda n: LabelBeforeReboot(n, "1"), node_names),
    st.builds(lambda n, s, g: GrantRebootOk(n, s, "1", "1", group_slots=((g, s, "1"),)
                                            if g else ()), node_names, slot_indices, groups),
    st.builds(lambda n: LabelAfterReboot(n, "1"), node_names),
    st.builds(lambda n: ResetRebootOk(n, "1"), node_names),
    st.builds(lambda s, n, g: AcquireSlot(s, n, "1", "boot", NOW, group=g),
              slot_indices, node_names, groups),
    st.builds(lambda s, n, giver: AcquireSlot(s, n, "1", "boot", NOW, handed_from=giver),
              slot_indices, node_names, node_names),
    st.builds(lambda s, n, g: ReleaseSlot(s, n, "1", NOW, group=g),
              slot_indices, node_names, groups),
    st.builds(lambda s, n: MarkStuck(s, n, "1"), slot_indices, node_names),
    st.builds(_event, node_names),
    st.builds(lambda n: RecordFailedReboot(FailedReboot(n, "did not come back", NOW)),
              node_names),
    st.just(PauseRoll("brake", NOW)),
)


def ancestors(steps: Sequence[Step]) -> list[set[int]]:
    """Every step's transitive predecessors."""
    found: list[set[int]] = []
    for step in steps:
        before: set[int] = set()
        for index in step.after:
            before |= {index} | found[index]
        found.append(before)
    return found


def must_wait(plan: Sequence[Change], i: int, j: int) -> bool:
    """The module docstring's rules, pairwise: change ``j`` waits for earlier change ``i``."""
    first, second = plan[i], plan[j]
    return (bool(touches(first) & touches(second))
            or (isinstance(second, EmitEvent) and i == j - 1)
            or isinstance(first, PauseRoll) or isinstance(second, PauseRoll))


@settings(max_examples=300, deadline=None)
@given(st.lists(changes, max_size=14))
def test_a_change_waits_for_exactly_what_it_must(plan: list[Change]) -> None:
    steps = schedule(plan)
    assert [step.change for step in steps] == plan
    assert all(step.index == i and all(b < i for b in step.after)
               for i, step in enumerate(steps)), "the plan's order must be a valid order"
    before = ancestors(steps)
    for j in range(len(plan)):
        required = {i for i in range(j) if must_wait(plan, i, j)}
        closure = set(required)
        for i in required:
            closure |= before[i]
        assert required <= before[j], f"change {j} ({plan[j]!r}) does not wait for " \
            f"{sorted(required - before[j])}"
        assert before[j] <= closure, f"change {j} waits for {sorted(before[j] - closure)} " \
            "although it need not: the plan runs more serially than it should"


def test_a_node_cycle_end_is_one_chain_and_other_nodes_run_beside_it() -> None:
    plan: list[Change] = [
        ResetRebootOk("a", "1"), ReleaseSlot(0, "a", "5", NOW), _event("a"),
        AcquireSlot(1, "b", "6", "boot", NOW, group="g"),
        AcquireSlot(2, "b", "7", "boot", NOW), LabelBeforeReboot("b", "2"), _event("b"),
    ]
    steps = schedule(plan)
    assert [step.after for step in steps] == [(), (0,), (1,), (), (3,), (4,), (5,)]
    assert not one_chain(steps)
    assert one_chain(steps[:3])


def test_a_hand_over_waits_for_the_givers_reset_and_the_grant_waits_for_it() -> None:
    handover = AcquireSlot(0, "b", "5", "boot", NOW, grant_follows=True, handed_from="a")
    plan: list[Change] = [
        ResetRebootOk("a", "1"), handover, _event("a"),
        GrantRebootOk("b", 0, "2", "", after_acquire=True), _event("b"), _event("b"),
    ]
    steps = schedule(plan)
    assert [step.after for step in steps] == [(), (0,), (1,), (1,), (3,), (4,)]
    assert one_chain(steps)  # the Events go after the writes

    # Without the giver's key the take would not wait for the reset (rule 4).
    taken = schedule([plan[0], replace(handover, handed_from=""), *plan[2:]])
    assert taken[1].after == ()
    assert not one_chain(taken)


def test_a_failed_reboot_is_recorded_before_the_mark_that_goes_with_it() -> None:
    plan: list[Change] = [
        LabelBeforeReboot("c", "3"),
        RecordFailedReboot(FailedReboot("a", "did not come back", NOW)),
        MarkStuck(0, "a", "5"), _event("a"),
        RecordFailedReboot(FailedReboot("b", "rolled back", NOW)),
        LabelAfterReboot("b", "4"),
        PauseRoll("brake", NOW), _event("b"),
        AcquireSlot(2, "c", "8", "boot", NOW),
    ]
    steps = schedule(plan)
    assert steps[2].after == (1,)
    assert steps[4].after == (1,), "the brake's records on the leader Lease, in turn"
    assert steps[5].after == (4,)
    assert ancestors(steps)[6] == set(range(6)), "the pause waits for every change before it"
    assert steps[7].after == (6,) and steps[8].after == (6,)


# -- the runners ------------------------------------------------------------------------


class Gates:
    """An ``apply`` whose changes (by node) block until the test opens their gate, and
    that records when each started and ended."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []  # ("start" | "end", describe(change))
        self.open: dict[str, threading.Event] = {}
        self.started = threading.Condition(self.lock)
        self.fail = fail or {}
        self.threads: set[int] = set()

    def gate(self, node: str) -> threading.Event:
        with self.lock:
            return self.open.setdefault(node, threading.Event())

    def __call__(self, change: Change) -> bool:
        node = getattr(change, "node", "")
        name = f"{type(change).__name__}({node})"
        with self.started:
            self.log.append(("start", name))
            self.threads.add(threading.get_ident())
            self.started.notify_all()
        if not self.gate(node).wait(WAIT):
            raise AssertionError(f"{name} was never let go")
        with self.lock:
            self.log.append(("end", name))
        if name in self.fail:
            raise self.fail[name]
        return not isinstance(change, EmitEvent)

    def wait_started(self, name: str) -> None:
        with self.started:
            assert self.started.wait_for(lambda: ("start", name) in self.log, WAIT), (
                f"{name} did not start")


def run_in_thread(target: Callable[[], Applied]) -> tuple[threading.Thread, list[object]]:
    """The runner in a thread of its own (the test's thread opens the gates)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as err:  # handed to the test
            outcome.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


TWO_NODES: list[Change] = [
    ResetRebootOk("a", "1"), ReleaseSlot(0, "a", "5", NOW),
    ResetRebootOk("b", "2"), ReleaseSlot(1, "b", "6", NOW),
]


@pytest.fixture
def pooled() -> Iterator[Pooled]:
    runner = Pooled(4)
    yield runner
    runner.close()


def test_changes_of_different_nodes_run_at_the_same_time(pooled: Pooled) -> None:
    gates = Gates()
    thread, outcome = run_in_thread(
        lambda: pooled.run(schedule(TWO_NODES), gates, lambda: True))
    gates.wait_started("ResetRebootOk(a)")
    gates.wait_started("ResetRebootOk(b)")  # while a's is still held
    assert ("start", "ReleaseSlot(a)") not in gates.log, "a's release ran before its reset"
    gates.gate("a").set()
    gates.wait_started("ReleaseSlot(a)")
    gates.gate("b").set()
    thread.join(WAIT)
    assert outcome == [Applied(4)]
    for node in "ab":
        assert gates.log.index(("end", f"ResetRebootOk({node})")) < gates.log.index(
            ("start", f"ReleaseSlot({node})"))


def test_after_an_error_the_running_changes_finish_and_nothing_else_starts(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cluo_coord.apply")
    error = KubeError("patching node 'a'", "conflict", kind="conflict", status=409)
    gates = Gates(fail={"ResetRebootOk(a)": error})
    gates.gate("c").set()
    runner = Pooled(2)  # c's reset waits for a free worker
    plan = [*TWO_NODES, ResetRebootOk("c", "3")]
    thread, outcome = run_in_thread(lambda: runner.run(schedule(plan), gates, lambda: True))
    gates.wait_started("ResetRebootOk(a)")
    gates.wait_started("ResetRebootOk(b)")
    gates.gate("a").set()  # a's reset fails while b's is running
    wait_for(lambda: "stopping the plan" in caplog.text, WAIT, "the runner to see the error")
    assert not outcome, "returned before the change still running finished"
    gates.gate("b").set()
    thread.join(WAIT)
    runner.close()
    assert outcome == [error]
    assert ("end", "ResetRebootOk(b)") in gates.log
    started = [name for what, name in gates.log if what == "start"]
    assert started.count("ReleaseSlot(a)") == 0, "released after its reset failed (rule 4)"
    assert started.count("ResetRebootOk(c)") == 0, "a change started after the plan's error"
    assert started.count("ReleaseSlot(b)") == 0, "a change started after the plan's error"


def test_a_plan_stops_when_leadership_is_lost(pooled: Pooled) -> None:
    gates = Gates()
    leader = threading.Event()
    leader.set()
    thread, outcome = run_in_thread(
        lambda: pooled.run(schedule(TWO_NODES), gates, leader.is_set))
    gates.wait_started("ResetRebootOk(a)")
    gates.wait_started("ResetRebootOk(b)")
    leader.clear()
    gates.gate("a").set()
    gates.gate("b").set()
    thread.join(WAIT)
    assert outcome == [Applied(2, cut_short=True)]
    assert not [name for what, name in gates.log if name.startswith("ReleaseSlot")]


def test_a_single_chain_runs_in_the_callers_thread(pooled: Pooled) -> None:
    gates = Gates()
    gates.gate("a").set()
    assert pooled.run(schedule([*TWO_NODES[:2], _event("a")]), gates,
                      lambda: True) == Applied(2)
    assert gates.threads == {threading.get_ident()}


def test_a_worker_goes_on_with_its_chain_and_not_behind_other_changes() -> None:
    gates = Gates()
    gates.gate("a").set()
    runner = Pooled(2)  # c's reset waits in the pool's queue while b's holds a worker
    plan = [*TWO_NODES[:3], ResetRebootOk("c", "3")]
    thread, outcome = run_in_thread(lambda: runner.run(schedule(plan), gates, lambda: True))
    # b's and c's resets still held: through the pool's queue a's release would wait
    # behind c's reset for a free worker.
    gates.wait_started("ReleaseSlot(a)")
    gates.gate("b").set()
    gates.gate("c").set()
    thread.join(WAIT)
    runner.close()
    assert outcome == [Applied(4)]
    ends = [name for what, name in gates.log if what == "end"]
    assert ends.index("ResetRebootOk(a)") < ends.index("ReleaseSlot(a)")


def test_in_order_applies_the_plan_in_its_order_and_stops_at_the_first_error() -> None:
    applied: list[Change] = []
    error = KubeError("releasing reboot slot 0", "unavailable", kind="unavailable")

    def apply(change: Change) -> bool:
        if isinstance(change, ReleaseSlot) and change.node == "a":
            raise error
        applied.append(change)
        return True

    with pytest.raises(KubeError) as raised:
        InOrder().run(schedule(TWO_NODES), apply, lambda: True)
    assert raised.value is error
    assert applied == TWO_NODES[:1]
    assert InOrder().run(schedule(TWO_NODES), lambda _: True, lambda: False) == Applied(
        0, cut_short=True)


# -- the Events after the writes --------------------------------------------------------

HAND_OVER: list[Change] = [
    ResetRebootOk("a", "1"),
    AcquireSlot(0, "b", "5", "boot", NOW, grant_follows=True, handed_from="a"), _event("a"),
    GrantRebootOk("b", 0, "2", "", after_acquire=True), _event("b"),
]


def started(gates: Gates) -> list[str]:
    return [name for what, name in gates.log if what == "start"]


def test_in_order_posts_the_givers_event_after_the_grant_also_when_the_grant_fails() -> None:
    gates = Gates()
    for node in "ab":
        gates.gate(node).set()
    assert InOrder().run(schedule(HAND_OVER), gates, lambda: True) == Applied(3)
    assert started(gates) == ["ResetRebootOk(a)", "AcquireSlot(b)", "GrantRebootOk(b)",
                              "EmitEvent(a)", "EmitEvent(b)"]

    error = KubeError("patching node 'b'", "conflict", kind="conflict", status=409)
    gates = Gates(fail={"GrantRebootOk(b)": error})
    for node in "ab":
        gates.gate(node).set()
    with pytest.raises(KubeError) as raised:
        InOrder().run(schedule(HAND_OVER), gates, lambda: True)
    assert raised.value is error
    assert started(gates) == ["ResetRebootOk(a)", "AcquireSlot(b)", "GrantRebootOk(b)",
                              "EmitEvent(a)"], "the Event of the applied hand-over was lost"


def test_the_pool_posts_the_givers_event_after_the_grant_also_when_the_grant_fails(
        pooled: Pooled) -> None:
    error = KubeError("patching node 'b'", "conflict", kind="conflict", status=409)
    gates = Gates(fail={"GrantRebootOk(b)": error})
    for node in "abc":
        gates.gate(node).set()
    granting, grant = threading.Event(), threading.Event()

    def apply(change: Change) -> bool:
        if isinstance(change, GrantRebootOk):  # the hand-over was applied
            granting.set()
            assert grant.wait(WAIT), "the grant was never let go"
        return gates(change)

    plan = [*HAND_OVER, ResetRebootOk("c", "3")]  # not one chain: the pool runs it
    thread, outcome = run_in_thread(lambda: pooled.run(schedule(plan), apply, lambda: True))
    assert granting.wait(WAIT), "the grant did not start"
    grant.set()
    thread.join(WAIT)
    assert outcome == [error]
    assert gates.log.index(("end", "GrantRebootOk(b)")) < gates.log.index(
        ("start", "EmitEvent(a)")), "the giver's Event ran beside the grant"
    assert "EmitEvent(b)" not in started(gates), "an Event of a change not applied"
    assert len(gates.threads) > 1


def test_the_held_events_are_not_posted_once_leadership_is_lost(pooled: Pooled) -> None:
    leader = threading.Event()
    leader.set()
    other = threading.Event()  # c's reset, in the pooled plan, was applied

    def apply(change: Change) -> bool:
        if isinstance(change, ResetRebootOk) and change.node == "c":
            other.set()
        if isinstance(change, GrantRebootOk):  # the last write: then leadership is lost
            assert other.wait(WAIT), "c's reset did not run"
            leader.clear()
        return not isinstance(change, EmitEvent)

    other.set()
    assert InOrder().run(schedule(HAND_OVER), apply, leader.is_set) == Applied(3)
    other.clear()
    posted: list[Change] = []
    leader.set()
    plan = [*HAND_OVER, ResetRebootOk("c", "3")]
    assert pooled.run(schedule(plan), lambda change: posted.append(change) or apply(change),
                      leader.is_set) == Applied(4)
    assert not [change for change in posted if isinstance(change, EmitEvent)]
