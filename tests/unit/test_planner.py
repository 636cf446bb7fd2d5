"""The coordinator's planning core: who gets a reboot slot, when, and what happens next."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from cluo.protocol import FALSE, NO_DRAIN_FAILURES, TRUE, DrainBackoff, Keys, NodeProtocolState
from cluo_coord.health import Health
from cluo_coord.planner import (
    QUEUED_LAST,
    SKIPPED_UNTIL_FIXED,
    AcquireSlot,
    EmitEvent,
    EventType,
    GrantRebootOk,
    LabelAfterReboot,
    LabelBeforeReboot,
    MarkStuck,
    NodeView,
    Plan,
    Policy,
    Reason,
    ReleaseSlot,
    ResetRebootOk,
    SlotLease,
    malformed_values,
    plan,
    queue_key,
    reboot_needed_since,
)
from cluo_coord.windows import parse_windows

KEYS = Keys()
NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)  # a Monday
BEFORE_HOOK = "hooks.example.com/before-check"
AFTER_HOOK = "hooks.example.com/after-check"
HOOKS = Policy(before_reboot_annotations=(BEFORE_HOOK,), after_reboot_annotations=(AFTER_HOOK,))

C = TypeVar("C")


def node(
    name: str,
    *,
    needed: bool = False,
    in_progress: bool = False,
    ok: bool = False,
    paused: bool = False,
    release: bool = False,
    before_label: bool = False,
    after_label: bool = False,
    blocked: str = "",
    boot: str = "boot-1",
    boot_before: str = "",
    ready: bool = True,
    ready_since: datetime | None = NOW - timedelta(hours=1),
    since: datetime | None = None,
    coordinator: bool = False,
    rv: str = "100",
    extra: Mapping[str, str] | None = None,
    cordoned: bool = False,
    marked: bool = False,
    uid: str = "uid-1",
    failures: int = 0,
    retry_at: datetime | None = None,
) -> NodeView:
    annotations = {
        KEYS.reboot_needed: str(needed).lower(),
        KEYS.reboot_in_progress: str(in_progress).lower(),
        KEYS.reboot_ok: str(ok).lower(),
    }
    if paused:
        annotations[KEYS.reboot_paused] = TRUE
    if release:
        annotations[KEYS.release_slot] = TRUE
    if blocked:
        annotations[KEYS.blocked_reason] = blocked
    if boot_before:
        annotations[KEYS.boot_id_before_reboot] = boot_before
    if marked:
        annotations[KEYS.agent_made_unschedulable] = TRUE
    if failures:
        annotations[KEYS.drain_failures] = str(failures)
    if retry_at is not None:
        annotations[KEYS.drain_retry_at] = retry_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    annotations.update(extra or {})
    labels = {}
    if before_label:
        labels[KEYS.before_reboot] = TRUE
    if after_label:
        labels[KEYS.after_reboot] = TRUE
    return NodeView(
        name=name,
        state=NodeProtocolState.from_metadata(KEYS, annotations, labels),
        resource_version=rv,
        uid=uid,
        ready=ready,
        ready_since=ready_since if ready else None,
        boot_id=boot,
        annotations=annotations,
        unschedulable=cordoned,
        runs_coordinator=coordinator,
        reboot_needed_since=since,
    )


def slot(
    index: int,
    holder: str | None = None,
    *,
    boot: str = "boot-1",
    acquired: datetime | None = NOW - timedelta(minutes=5),
    rv: str = "7",
    released_at: datetime | None = None,
    stuck: bool = False,
    uid: str = "uid-1",
) -> SlotLease:
    if holder is None:
        return SlotLease(index, resource_version=rv, released_at=released_at)
    return SlotLease(
        index, holder, resource_version=rv, acquired_at=acquired, holder_boot_id=boot,
        stuck=stuck, holder_uid=uid,
    )


def run(
    nodes: list[NodeView], leases: list[SlotLease] | None = None, *, now: datetime = NOW,
    **policy: Any,
) -> Plan:
    base = policy.pop("base", Policy())
    return plan(nodes, leases or [], now, replace(base, **policy))


def of(result: Plan, kind: type[C]) -> list[C]:
    return [change for change in result.changes if isinstance(change, kind)]


def acquired(result: Plan) -> list[tuple[int, str]]:
    return [(change.slot, change.node) for change in of(result, AcquireSlot)]


def reasons(result: Plan) -> list[Reason]:
    return [event.reason for event in of(result, EmitEvent)]


def kinds(result: Plan) -> list[str]:
    return [type(change).__name__ for change in result.changes]


# --------------------------------------------------------------------------- granting


def test_grants_one_node_at_a_time_by_default() -> None:
    result = run([node("a", needed=True), node("b", needed=True), node("c", needed=True)])
    assert acquired(result) == [(0, "a")]
    assert [grant.node for grant in of(result, GrantRebootOk)] == ["a"]
    assert result.queue == ("a", "b", "c")


def test_first_grant_creates_the_slot_lease_and_records_the_boot_id_and_uid() -> None:
    result = run([node("a", needed=True, boot="boot-A", uid="uid-A")])
    assert of(result, AcquireSlot) == [
        AcquireSlot(slot=0, node="a", expected_resource_version=None, holder_boot_id="boot-A",
                    at=NOW, holder_uid="uid-A", transitions=1, grant_follows=True)
    ]


def test_slot_is_taken_before_the_node_is_labelled() -> None:
    result = run([node("a", needed=True)], base=HOOKS)
    assert kinds(result) == ["AcquireSlot", "LabelBeforeReboot", "EmitEvent"]
    assert not of(result, AcquireSlot)[0].grant_follows


def test_without_hooks_the_grant_follows_the_slot_in_one_plan_without_the_label() -> None:
    result = run([node("a", needed=True), node("b", needed=True)], [slot(0, rv="42")])
    assert kinds(result) == ["AcquireSlot", "GrantRebootOk", "EmitEvent", "EmitEvent"]
    (acquire,) = of(result, AcquireSlot)
    assert acquire.grant_follows and acquire.expected_resource_version == "42"
    # Rule 3: the Lease version to expect is the one the acquisition's CAS returns.
    assert of(result, GrantRebootOk) == [GrantRebootOk(
        "a", 0, "100", "", (), after_acquire=True)]
    assert reasons(result) == [Reason.SLOT_ACQUIRED, Reason.REBOOT_APPROVED]


def test_the_acquisition_counts_the_lease_transitions_on() -> None:
    result = run([node("a", needed=True)], [replace(slot(0, rv="42"), transitions=6)])
    assert of(result, AcquireSlot)[0].transitions == 7


def test_max_concurrent_two_grants_two() -> None:
    result = run(
        [node("a", needed=True), node("b", needed=True), node("c", needed=True)],
        max_concurrent=2,
    )
    assert acquired(result) == [(0, "a"), (1, "b")]


def test_existing_free_slot_is_taken_by_compare_and_swap_on_its_version() -> None:
    result = run([node("a", needed=True)], [slot(0, rv="42")])
    assert of(result, AcquireSlot)[0].expected_resource_version == "42"


def test_does_not_take_a_slot_while_another_node_holds_it() -> None:
    result = run([node("a", needed=True, ok=True, in_progress=True), node("b", needed=True)],
                 [slot(0, "a")])
    assert acquired(result) == []
    assert result.in_flight == ("a",)
    assert result.queue == ("b",)


def test_second_slot_goes_to_the_next_node_while_the_first_is_busy() -> None:
    result = run(
        [node("a", needed=True, ok=True, in_progress=True), node("b", needed=True)],
        [slot(0, "a")],
        max_concurrent=2,
    )
    assert acquired(result) == [(1, "b")]


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (node("a", needed=True, paused=True), "paused by an admin"),
        (node("a", needed=True, ready=False), "not Ready"),
        (node("a", needed=True, boot=""), "no bootID to prove the reboot with"),
        (node("a", needed=True, release=True), "release-slot still set"),
        (node("a", needed=False), "no reboot needed"),
        (
            node("a", needed=True, extra={KEYS.reboot_paused: "yes"}),
            "an annotation that does not parse",
        ),
    ],
)
def test_node_that_cannot_take_a_slot_is_skipped(view: NodeView, why: str) -> None:
    result = run([view])
    assert acquired(result) == [], why
    assert result.queue == ()


def test_paused_node_is_skipped() -> None:
    result = run([
        node("a", needed=True, paused=True, since=NOW - timedelta(days=3)),
        node("b", needed=True, since=NOW - timedelta(days=1)),
    ])
    assert acquired(result) == [(0, "b")]


def test_global_pause_grants_nothing() -> None:
    result = run([node("a", needed=True)], paused=True)
    assert result.changes == ()
    assert result.recheck_after is None
    assert result.holds == ("paused: the roll is paused, no new reboot slots are granted",)


def test_closed_window_grants_nothing() -> None:
    windows = parse_windows("Mon 14:00 1h")
    result = run([node("a", needed=True)], windows=windows)
    assert acquired(result) == []
    assert result.recheck_after == timedelta(hours=2)  # opens at 14:00, it is 12:00
    assert result.holds == ("window: outside every reboot window",)


def test_open_window_grants() -> None:
    windows = parse_windows("Mon 11:00 2h")
    result = run([node("a", needed=True)], windows=windows)
    assert acquired(result) == [(0, "a")]
    assert result.holds == ()


def test_delay_between_reboots_rests_a_released_slot() -> None:
    leases = [slot(0, released_at=NOW - timedelta(minutes=1))]
    result = run([node("a", needed=True)], leases, delay_between_reboots=timedelta(minutes=5))
    assert acquired(result) == []
    assert result.recheck_after == timedelta(minutes=4)
    later = run([node("a", needed=True)], leases, now=NOW + timedelta(minutes=4),
                delay_between_reboots=timedelta(minutes=5))
    assert acquired(later) == [(0, "a")]


# --------------------------------------------------------------------------- ordering


@pytest.mark.parametrize(
    ("nodes", "order"),
    [
        pytest.param(
            [node("b", needed=True, since=NOW - timedelta(hours=1)),
             node("a", needed=True, since=NOW - timedelta(hours=5))],
            ["a", "b"], id="longest-waiting-first",
        ),
        pytest.param(
            [node("b", needed=True, since=NOW), node("a", needed=True, since=NOW)],
            ["a", "b"], id="name-breaks-ties",
        ),
        pytest.param(
            [node("a", needed=True), node("b", needed=True, since=NOW)],
            ["b", "a"], id="known-wait-before-unknown",
        ),
        pytest.param(
            [node("a", needed=True, coordinator=True, since=NOW - timedelta(days=9)),
             node("b", needed=True, since=NOW)],
            ["b", "a"], id="coordinator-node-last",
        ),
        pytest.param(
            [node("a", needed=True, blocked="PDB web blocks eviction",
                  since=NOW - timedelta(days=9)),
             node("b", needed=True, since=NOW)],
            ["b", "a"], id="aborted-node-at-the-back",
        ),
    ],
)
def test_queue_order(nodes: list[NodeView], order: list[str]) -> None:
    result = run(nodes)
    assert list(result.queue) == order
    assert acquired(result) == [(0, order[0])]
    assert sorted(nodes, key=queue_key) == sorted(nodes, key=lambda n: order.index(n.name))


def test_reboot_needed_since_reads_last_checked_time() -> None:
    state = NodeProtocolState.from_metadata(KEYS, {KEYS.last_checked_time: "1704110400"}, {})
    assert reboot_needed_since(state) == NOW
    for raw in ("", "0", "soon", "-5", "99999999999999999999"):
        state = NodeProtocolState.from_metadata(KEYS, {KEYS.last_checked_time: raw}, {})
        assert reboot_needed_since(state) is None


# --------------------------------------------------------------------------- malformed values


def test_malformed_boolean_is_named_with_its_value_and_the_node_gets_no_slot() -> None:
    view = node("a", needed=True, extra={KEYS.reboot_paused: "True"})
    (problem,) = malformed_values(view, KEYS)
    assert f"{KEYS.reboot_paused} must be 'true' or 'false', not 'True'" in problem
    assert problem.endswith(SKIPPED_UNTIL_FIXED)
    assert acquired(run([view])) == []


def test_malformed_last_checked_time_is_named_and_only_orders_the_node_last() -> None:
    odd = node("a", needed=True, extra={KEYS.last_checked_time: "soon"})
    (problem,) = malformed_values(odd, KEYS)
    assert f"{KEYS.last_checked_time} must be Unix seconds, not 'soon'" in problem
    assert problem.endswith(QUEUED_LAST)
    assert acquired(run([odd])) == [(0, "a")]


@pytest.mark.parametrize("raw", ["", "0", "1704110400"])
def test_well_formed_values_are_not_reported(raw: str) -> None:
    view = node("a", needed=True, paused=True, extra={KEYS.last_checked_time: raw})
    assert malformed_values(view, KEYS) == ()


# --------------------------------------------------------------------------- before reboot


def test_restart_between_slot_and_grant_continues_same_node() -> None:
    # The coordinator took slot 0 for "a" and died before labelling it. "b" has waited
    # longer, but the slot is a's: the plan labels a and grants nothing else.
    result = run(
        [node("a", needed=True, since=NOW),
         node("b", needed=True, since=NOW - timedelta(days=1))],
        [slot(0, "a")], base=HOOKS,
    )
    assert of(result, LabelBeforeReboot) == [LabelBeforeReboot("a", "100", (BEFORE_HOOK,))]
    assert acquired(result) == []


def test_without_hooks_a_restart_between_slot_and_grant_grants_at_the_lease_version() -> None:
    result = run(
        [node("a", needed=True, since=NOW),
         node("b", needed=True, since=NOW - timedelta(days=1))],
        [slot(0, "a", rv="8")],
    )
    assert of(result, LabelBeforeReboot) == []
    assert of(result, GrantRebootOk) == [GrantRebootOk("a", 0, "100", "8", ())]
    assert acquired(result) == []


def test_waits_for_before_reboot_hooks() -> None:
    leases = [slot(0, "a", rv="8")]
    waiting = run([node("a", needed=True, before_label=True,
                        extra={BEFORE_HOOK: FALSE})], leases, base=HOOKS)
    assert of(waiting, GrantRebootOk) == []
    done = run([node("a", needed=True, before_label=True, extra={BEFORE_HOOK: TRUE})],
               leases, base=HOOKS)
    assert of(done, GrantRebootOk) == [
        GrantRebootOk("a", slot=0, expected_resource_version="100",
                      expected_lease_resource_version="8", clear_annotations=(BEFORE_HOOK,))
    ]
    assert reasons(done) == [Reason.REBOOT_APPROVED]


def test_labelling_clears_hook_annotations_left_from_the_last_cycle() -> None:
    result = run([node("a", needed=True)], base=HOOKS)
    label = of(result, LabelBeforeReboot)[0]
    assert label.patch(KEYS).annotations == {BEFORE_HOOK: None}
    assert label.patch(KEYS).labels == {KEYS.before_reboot: TRUE}


def test_grant_without_hooks_follows_the_label() -> None:
    result = run([node("a", needed=True, before_label=True)], [slot(0, "a")])
    assert kinds(result) == ["GrantRebootOk", "EmitEvent"]


def test_grant_removes_the_label_and_a_blocked_reason_from_an_earlier_attempt() -> None:
    grant = GrantRebootOk("a", 0, "100", "8", (BEFORE_HOOK,))
    patch = grant.patch(KEYS)
    assert patch.labels == {KEYS.before_reboot: None}
    assert patch.annotations == {
        BEFORE_HOOK: None, KEYS.reboot_ok: TRUE, KEYS.blocked_reason: None,
    }


def test_in_flight_node_finishes_when_window_closes() -> None:
    closed = parse_windows("Sun 03:00 1h")
    before = run([node("a", needed=True, before_label=True)], [slot(0, "a")], windows=closed)
    assert [c.node for c in of(before, GrantRebootOk)] == ["a"]
    after = run([node("a", ok=True, boot="boot-2")], [slot(0, "a")], windows=closed)
    assert [c.node for c in of(after, ResetRebootOk)] == ["a"]


def test_global_pause_lets_a_holder_finish_its_cycle() -> None:
    result = run([node("a", needed=True, before_label=True)], [slot(0, "a")], paused=True)
    assert [c.node for c in of(result, GrantRebootOk)] == ["a"]


@pytest.mark.parametrize(
    "view",
    [
        node("a", needed=True, paused=True, before_label=True,
             extra={BEFORE_HOOK: TRUE}),
        node("a", needed=True, paused=True, ok=True),
    ],
    ids=["before-reboot-hooks", "granted-not-started"],
)
def test_paused_holder_has_its_grant_cancelled_and_the_slot_released(view: NodeView) -> None:
    result = run([view, node("b", needed=True)], [slot(0, "a", rv="9")], base=HOOKS)
    assert result.changes[:2] == (
        ResetRebootOk("a", "100", (BEFORE_HOOK, AFTER_HOOK)),
        ReleaseSlot(0, "a", "9", NOW),
    )
    patch = of(result, ResetRebootOk)[0].patch(KEYS)
    assert patch.labels[KEYS.before_reboot] is None and patch.annotations[BEFORE_HOOK] is None
    assert reasons(result) == [Reason.REBOOT_CANCELLED]
    assert of(result, GrantRebootOk) == []


def test_paused_holder_that_drains_is_withdrawn_and_keeps_its_slot_until_uncordoned() -> None:
    draining = node("a", needed=True, paused=True, ok=True, in_progress=True, cordoned=True,
                    marked=True)
    result = run([draining, node("b", needed=True)], [slot(0, "a")])
    assert kinds(result) == ["ResetRebootOk", "EmitEvent"]
    assert result.in_flight == ("a",)
    withdrawn = node("a", needed=True, paused=True, in_progress=True, cordoned=True,
                     marked=True)
    assert run([withdrawn], [slot(0, "a")]).changes == ()
    stopped = node("a", needed=True, paused=True, blocked="withdrawn", cordoned=True,
                   marked=True)
    assert run([stopped], [slot(0, "a")]).changes == ()
    uncordoned = node("a", needed=True, paused=True)
    released = run([uncordoned], [slot(0, "a")])
    assert kinds(released) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    assert reasons(released) == [Reason.REBOOT_CANCELLED]


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (node("a", needed=True, paused=True, ok=True, in_progress=True, boot_before="boot-1",
              cordoned=True, marked=True), "drained; the agent is asking logind to reboot"),
        (node("a", needed=True, paused=True, ok=True, in_progress=True, boot="boot-2"),
         "rebooted; the agent has not reported yet"),
        (node("a", paused=True, ok=True, boot="boot-2"), "rebooted and reported"),
        (node("a", paused=True, ok=True, after_label=True, boot="boot-2"), "after-reboot hooks"),
    ],
)
def test_paused_holder_whose_reboot_has_begun_finishes_its_cycle(view: NodeView, why: str
                                                                  ) -> None:
    result = run([view], [slot(0, "a", boot="boot-1")])
    assert Reason.REBOOT_CANCELLED not in reasons(result), why
    assert of(result, ReleaseSlot) == [] or Reason.REBOOT_FINISHED in reasons(result), why


def test_request_withdrawn_before_the_grant_releases_the_slot() -> None:
    result = run([node("a", needed=False, before_label=True)], [slot(0, "a")], base=HOOKS)
    assert kinds(result) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    assert reasons(result) == [Reason.REBOOT_CANCELLED]


# --------------------------------------------------------------------------- after reboot


def test_labels_after_reboot_once_the_reboot_is_proven() -> None:
    result = run([node("a", ok=True, boot="boot-2", boot_before="boot-1")],
                 [slot(0, "a", boot="boot-1")], base=HOOKS)
    assert of(result, LabelAfterReboot) == [LabelAfterReboot("a", "100", (AFTER_HOOK,))]
    assert reasons(result) == [Reason.REBOOT_VERIFIED]


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (node("a", ok=True, needed=True, boot="boot-2"), "agent still says reboot-needed"),
        (node("a", ok=True, in_progress=True, boot="boot-2"), "agent still in progress"),
        (node("a", ok=True, boot="boot-2", ready=False), "node not Ready"),
        (node("a", ok=True, boot="boot-1"), "kubelet bootID same as at grant"),
        (node("a", ok=True, boot="boot-3", boot_before="boot-3"),
         "kubelet bootID same as the agent recorded before rebooting"),
        (node("a", ok=True, boot=""), "kubelet reports no bootID"),
    ],
)
def test_reboot_is_not_done_until_proven(view: NodeView, why: str) -> None:
    result = run([view], [slot(0, "a", boot="boot-1")])
    assert of(result, LabelAfterReboot) == [], why
    assert of(result, ReleaseSlot) == [], why


def test_min_ready_waits_and_says_when_to_look_again() -> None:
    view = node("a", ok=True, boot="boot-2", ready_since=NOW - timedelta(seconds=20))
    result = run([view], [slot(0, "a")], min_ready=timedelta(seconds=60))
    assert of(result, ResetRebootOk) == []
    assert result.recheck_after == timedelta(seconds=40)
    later = run([view], [slot(0, "a")], now=NOW + timedelta(seconds=40),
                min_ready=timedelta(seconds=60))
    assert [c.node for c in of(later, ResetRebootOk)] == ["a"]


def test_without_after_reboot_hooks_the_proof_ends_the_cycle_in_one_plan() -> None:
    # No after-reboot label to write or wait on: the reset (which uncordons the node the
    # agent cordoned) and the hand-over follow the proof, which is reported first.
    back = node("a", ok=True, boot="boot-2", cordoned=True, marked=True)
    result = run([back, node("b", needed=True)], [slot(0, "a", rv="9")])
    assert of(result, LabelAfterReboot) == []
    assert kinds(result)[:3] == ["ResetRebootOk", "EmitEvent", "AcquireSlot"]
    assert of(result, ResetRebootOk)[0].uncordon
    assert [(c.node, c.handed_from) for c in of(result, AcquireSlot)] == [("b", "a")]
    assert reasons(result)[:2] == [Reason.REBOOT_VERIFIED, Reason.REBOOT_FINISHED]
    assert "no after-reboot hooks" in of(result, EmitEvent)[0].message


def test_without_after_reboot_hooks_a_closed_health_gate_keeps_the_slot_after_the_reset(
) -> None:
    back = node("a", ok=True, boot="boot-2")
    held = plan([back], [slot(0, "a", rv="9")], NOW, Policy(),
                health=Health(closed_gates={"a": "web: 1/2 ready"}))
    assert kinds(held) == ["ResetRebootOk", "EmitEvent"]  # proven once, reported once
    assert reasons(held) == [Reason.REBOOT_VERIFIED]
    reset = node("a", boot="boot-2")
    waiting = plan([reset], [slot(0, "a", rv="9")], NOW, Policy(),
                   health=Health(closed_gates={"a": "web: 1/2 ready"}))
    assert waiting.changes == ()
    released = run([reset], [slot(0, "a", rv="9")])
    assert kinds(released) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]


def test_waits_for_after_reboot_hooks_then_resets_before_releasing() -> None:
    leases = [slot(0, "a", rv="9")]
    waiting = run([node("a", ok=True, after_label=True, boot="boot-2")], leases, base=HOOKS)
    assert of(waiting, ResetRebootOk) == []
    done = run([node("a", ok=True, after_label=True, boot="boot-2",
                     extra={AFTER_HOOK: TRUE})], leases, base=HOOKS)
    assert done.changes[:2] == (
        ResetRebootOk("a", "100", (BEFORE_HOOK, AFTER_HOOK), finished=True),
        ReleaseSlot(0, "a", "9", NOW),
    )
    assert reasons(done) == [Reason.REBOOT_FINISHED]


def test_reset_of_a_proven_reboot_uncordons_the_node_and_hands_its_slot_over() -> None:
    # Rule 10: the node the agent cordoned is uncordoned by the reset itself (one write,
    # the mark removed with it), so the slot goes to the next node in the same plan.
    leases = [slot(0, "a", rv="9")]
    done = run([node("a", ok=True, after_label=True, boot="boot-2", cordoned=True, marked=True,
                     extra={AFTER_HOOK: TRUE}), node("b", needed=True)], leases, base=HOOKS)
    assert kinds(done)[:2] == ["ResetRebootOk", "AcquireSlot"]
    (reset,) = of(done, ResetRebootOk)
    assert reset.uncordon
    assert reset.patch(KEYS).annotations[KEYS.agent_made_unschedulable] is None
    # The cycle is over: the agent's boot id goes too, so the agent writes nothing more.
    assert reset.patch(KEYS).annotations[KEYS.boot_id_before_reboot] is None
    assert [(c.node, c.handed_from) for c in of(done, AcquireSlot)] == [("b", "a")]
    message = next(e.message for e in of(done, EmitEvent) if e.reason is Reason.REBOOT_FINISHED)
    assert "node uncordoned" in message


def test_reset_uncordons_while_the_health_gate_holds_the_slot() -> None:
    # The workloads may need the node back to recover: the reset uncordons it now, the
    # slot waits for the gate.
    leases = [slot(0, "a", rv="9")]
    cordoned = node("a", ok=True, after_label=True, boot="boot-2", cordoned=True, marked=True,
                    extra={AFTER_HOOK: TRUE})
    held = plan([cordoned, node("b", needed=True)], leases, NOW, HOOKS,
                health=Health(closed_gates={"a": "web: 1/2 ready"}))
    assert kinds(held) == ["ResetRebootOk"]
    assert of(held, ResetRebootOk)[0].uncordon
    assert of(held, ResetRebootOk)[0].finished
    schedulable = node("a", ok=True, after_label=True, boot="boot-2", extra={AFTER_HOOK: TRUE})
    waiting = plan([schedulable], leases, NOW, HOOKS,
                   health=Health(closed_gates={"a": "web: 1/2 ready"}))
    assert waiting.changes == ()


def test_slot_waits_until_the_agent_has_uncordoned_the_node() -> None:
    # A node reset without the uncordon (an older coordinator's reset, an aborted or
    # withdrawn cycle): the agent uncordons it, and only then is the slot released.
    leases = [slot(0, "a", rv="9")]
    reset = node("a", boot="boot-2", cordoned=True, marked=True)
    waiting = run([reset, node("b", needed=True)], leases, base=HOOKS)
    assert waiting.changes == ()
    assert waiting.in_flight == ("a",)
    assert waiting.recheck_after == timedelta(minutes=55)  # the reboot timeout

    uncordoned = node("a", boot="boot-2", marked=True)  # uncordoned, the mark not cleared yet
    released = run([uncordoned], leases, base=HOOKS)
    assert kinds(released) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    assert not of(released, ResetRebootOk)[0].uncordon
    assert reasons(released) == [Reason.REBOOT_FINISHED]
    handed = run([uncordoned, node("b", needed=True)], leases, base=HOOKS)
    assert [(c.node, c.handed_from) for c in of(handed, AcquireSlot)] == [("b", "a")]


def test_holder_cordoned_by_an_admin_is_released_with_its_reset() -> None:
    # No agent-made-unschedulable: cluo will not uncordon it, so nothing to wait for.
    done = run([node("a", ok=True, after_label=True, boot="boot-2", cordoned=True,
                     extra={AFTER_HOOK: TRUE})], [slot(0, "a")], base=HOOKS)
    assert kinds(done) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    assert not of(done, ResetRebootOk)[0].uncordon


def test_node_cordoned_by_cluo_without_a_slot_counts_in_flight() -> None:
    result = run([node("a", boot="boot-2", cordoned=True, marked=True),
                  node("b", needed=True)])
    assert result.in_flight == ("a",)
    assert acquired(result) == []
    marked_only = run([node("a", marked=True), node("b", needed=True)])
    assert acquired(marked_only) == [(0, "b")]


@pytest.mark.parametrize("holds_slot", [True, False], ids=["slot-holder", "stale-grant"])
def test_cycle_does_not_finish_while_the_agent_drains_again(holds_slot: bool) -> None:
    # A new update arrived during the after-reboot phase and the agent acted on the grant
    # that is still out: reboot-ok=false now would leave a draining node without a slot.
    draining = node("a", ok=True, needed=True, in_progress=True, after_label=True,
                    boot="boot-2")
    result = run([draining], [slot(0, "a")] if holds_slot else [])
    assert of(result, ResetRebootOk) == []
    assert of(result, ReleaseSlot) == []
    assert result.in_flight == ("a",)


def test_reset_sets_reboot_ok_false_and_removes_labels_and_hook_annotations() -> None:
    patch = ResetRebootOk("a", "1", (BEFORE_HOOK, AFTER_HOOK), clear_release_slot=True).patch(KEYS)
    assert patch.labels == {KEYS.before_reboot: None, KEYS.after_reboot: None}
    assert patch.annotations == {
        BEFORE_HOOK: None, AFTER_HOOK: None, KEYS.reboot_ok: FALSE, KEYS.release_slot: None,
    }


def test_finished_holder_hands_its_slot_to_the_next_node_in_one_write() -> None:
    # No ReleaseSlot: the take of a's slot for b, at the version naming a, is its release
    # (tests/unit/test_planner_handover.py).
    result = run(
        [node("a", ok=True, after_label=True, boot="boot-2"), node("b", needed=True)],
        [slot(0, "a")],
    )
    assert of(result, ReleaseSlot) == []
    assert [(c.node, c.handed_from) for c in of(result, AcquireSlot)] == [("b", "a")]


def test_restart_between_reset_and_release_releases_the_slot() -> None:
    result = run([node("a", boot="boot-2")], [slot(0, "a", boot="boot-1")])
    assert kinds(result) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    assert reasons(result) == [Reason.REBOOT_FINISHED]


# --------------------------------------------------------------------------- aborts


def test_aborted_drain_resets_the_grant_and_releases_the_slot() -> None:
    result = run(
        [node("a", ok=True, needed=True, blocked="PDB web allows 0 disruptions"),
         node("b", needed=True)],
        [slot(0, "a")],
    )
    assert kinds(result) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    event = of(result, EmitEvent)[0]
    assert (event.type, event.reason) == (EventType.WARNING, Reason.DRAIN_BLOCKED)
    assert "PDB web allows 0 disruptions" in event.message
    # The cycle is not over: what the agent recorded stays for the agent to clear.
    assert KEYS.boot_id_before_reboot not in of(result, ResetRebootOk)[0].patch(KEYS).annotations


# --------------------------------------------------------------------------- drain backoff

BACKOFF = Policy(drain_backoff=timedelta(minutes=10), drain_backoff_max=timedelta(minutes=30),
                 max_drain_attempts=4)


@pytest.mark.parametrize(
    ("failures_before", "retry_in"),
    [(0, timedelta(minutes=10)), (1, timedelta(minutes=20)), (2, timedelta(minutes=30))],
)
def test_failed_drain_records_the_attempt_and_a_growing_capped_backoff(
    failures_before: int, retry_in: timedelta
) -> None:
    aborted = node("a", ok=True, needed=True, blocked="PDB web allows 0 disruptions",
                   failures=failures_before)
    result = run([aborted], [slot(0, "a")], base=BACKOFF)
    (reset,) = of(result, ResetRebootOk)
    assert reset.drain_backoff == DrainBackoff(failures_before + 1, NOW + retry_in)
    assert reset.patch(KEYS).annotations[KEYS.drain_failures] == str(failures_before + 1)
    assert reset.patch(KEYS).annotations[KEYS.drain_retry_at] == (
        (NOW + retry_in).strftime("%Y-%m-%dT%H:%M:%SZ"))
    (event,) = of(result, EmitEvent)
    assert (event.type, event.reason) == (EventType.WARNING, Reason.DRAIN_BLOCKED)
    assert f"Drain attempt {failures_before + 1} of 4 failed" in event.message
    assert "PDB web allows 0 disruptions" in event.message
    assert (NOW + retry_in).strftime("%Y-%m-%dT%H:%M:%SZ") in event.message


def test_last_failed_drain_takes_the_node_out_of_the_roll_naming_the_way_back() -> None:
    aborted = node("a", ok=True, needed=True, blocked="bare pod default/debug", failures=3)
    result = run([aborted], [slot(0, "a")], base=BACKOFF)
    (reset,) = of(result, ResetRebootOk)
    assert reset.drain_backoff == DrainBackoff(4, None)
    assert reset.patch(KEYS).annotations[KEYS.drain_retry_at] is None
    (event,) = of(result, EmitEvent)
    assert "Drain attempt 4 of 4 failed" in event.message
    assert "cluo-coord retry a" in event.message


def test_waiting_node_is_granted_ahead_of_a_node_in_drain_backoff() -> None:
    result = run(
        [node("a", needed=True, since=NOW - timedelta(days=9), failures=1,
              retry_at=NOW + timedelta(minutes=5)),
         node("b", needed=True, since=NOW)],
        base=BACKOFF,
    )
    assert acquired(result) == [(0, "b")]
    assert result.queue == ("b",)
    assert result.drain_backoff == ("a",)


def test_node_in_drain_backoff_alone_waits_until_its_retry_time() -> None:
    retry_at = NOW + timedelta(minutes=5)
    result = run([node("a", needed=True, failures=1, retry_at=retry_at)], base=BACKOFF)
    assert acquired(result) == []
    assert result.recheck_after == timedelta(minutes=5)
    later = run([node("a", needed=True, failures=1, retry_at=retry_at)], base=BACKOFF,
                now=retry_at)
    assert acquired(later) == [(0, "a")]
    assert later.drain_backoff == ()


def test_after_its_backoff_a_node_queues_behind_nodes_with_fewer_failed_drains() -> None:
    past = NOW - timedelta(minutes=1)
    result = run(
        [node("a", needed=True, since=NOW - timedelta(days=9), failures=2, retry_at=past),
         node("b", needed=True, since=NOW - timedelta(days=1), failures=1, retry_at=past),
         node("c", needed=True, since=NOW)],
        base=BACKOFF,
    )
    assert result.queue == ("c", "b", "a")


def test_node_out_of_the_roll_gets_no_slot_and_no_wake_up() -> None:
    result = run([node("a", needed=True, failures=4), node("b")], base=BACKOFF)
    assert result.changes == ()
    assert result.recheck_after is None
    assert result.out_of_roll == ("a",)
    assert result.queue == ()


def test_a_finished_reboot_clears_the_drain_failures() -> None:
    result = run([node("a", boot="boot-2", failures=2, retry_at=NOW - timedelta(hours=1))],
                 [slot(0, "a", boot="boot-1")], base=BACKOFF)
    (reset,) = of(result, ResetRebootOk)
    assert reset.drain_backoff == NO_DRAIN_FAILURES
    assert reset.patch(KEYS).annotations[KEYS.drain_failures] is None
    assert reset.patch(KEYS).annotations[KEYS.drain_retry_at] is None
    assert reasons(result) == [Reason.REBOOT_FINISHED]


def test_drain_failures_of_a_node_that_no_longer_needs_a_reboot_are_cleared() -> None:
    result = run([node("a", failures=4)], base=BACKOFF)
    (reset,) = of(result, ResetRebootOk)
    assert reset.drain_backoff == NO_DRAIN_FAILURES


def test_restart_between_the_reset_of_a_failed_drain_and_its_release_frees_the_slot() -> None:
    # The reset recorded the failure; the slot still names the node: it goes on to the
    # next node instead of granting the node in backoff again.
    in_backoff = node("a", needed=True, failures=1, retry_at=NOW + timedelta(minutes=10))
    result = run([in_backoff, node("b", needed=True)], [slot(0, "a")], base=BACKOFF)
    assert kinds(result) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]
    assert of(result, LabelBeforeReboot) == []


def test_malformed_drain_failures_are_reported_and_keep_the_node_out() -> None:
    view = node("a", needed=True, extra={KEYS.drain_failures: "two",
                                         KEYS.drain_retry_at: "soon"})
    assert acquired(run([view])) == []
    problems = malformed_values(view, KEYS)
    assert any("drain-failures must be a count" in p and "'two'" in p for p in problems)
    assert any("drain-retry-at must be an RFC 3339 time" in p for p in problems)


def test_aborted_drain_keeps_the_grant_until_the_agent_has_uncordoned() -> None:
    aborted = node("a", ok=True, needed=True, blocked="PDB web", cordoned=True, marked=True)
    result = run([aborted, node("b", needed=True)], [slot(0, "a")])
    assert result.changes == ()
    assert result.in_flight == ("a",)


def test_granted_node_that_has_not_started_yet_is_not_an_abort() -> None:
    result = run([node("a", ok=True, needed=True)], [slot(0, "a")])
    assert result.changes == ()


def test_drain_blocked_but_still_in_progress_keeps_its_slot() -> None:
    result = run([node("a", ok=True, needed=True, in_progress=True, blocked="PDB web")],
                 [slot(0, "a")])
    assert result.changes == ()


# --------------------------------------------------------------------------- stuck holders


def test_keeps_slot_when_node_does_not_come_back() -> None:
    late = NOW - timedelta(hours=2)
    result = run(
        [node("a", ok=True, needed=True, in_progress=True, ready=False), node("b", needed=True)],
        [slot(0, "a", acquired=late, rv="9")],
    )
    assert of(result, ReleaseSlot) == []
    assert acquired(result) == []
    assert of(result, MarkStuck) == [MarkStuck(0, "a", "9")]
    event = of(result, EmitEvent)[0]
    assert (event.type, event.reason) == (EventType.WARNING, Reason.REBOOT_TIMED_OUT)
    assert f"kubectl annotate node a {KEYS.release_slot}=true" in event.message


def test_stuck_holder_is_reported_once() -> None:
    result = run([node("a", ok=True, in_progress=True, ready=False)],
                 [slot(0, "a", acquired=NOW - timedelta(hours=2), stuck=True)])
    assert result.changes == ()
    assert result.recheck_after is None


def test_reboot_timeout_says_when_to_look_again() -> None:
    result = run([node("a", ok=True, in_progress=True)],
                 [slot(0, "a", acquired=NOW - timedelta(minutes=50))])
    assert result.recheck_after == timedelta(minutes=10)


def test_stuck_node_that_comes_back_finishes_normally() -> None:
    result = run([node("a", ok=True, boot="boot-2")],
                 [slot(0, "a", acquired=NOW - timedelta(hours=3), stuck=True)])
    assert [c.node for c in of(result, ResetRebootOk)] == ["a"]


def test_holder_whose_node_is_gone_frees_its_slot_for_the_next_node() -> None:
    result = run([node("b", needed=True)], [slot(0, "gone", rv="9")])
    assert of(result, ReleaseSlot) == [ReleaseSlot(0, "gone", "9", NOW, holder_gone=True)]
    assert of(result, ResetRebootOk) == []  # nothing to reset: the one exception to rule 4
    (event,) = of(result, EmitEvent)
    assert (event.type, event.reason, event.slot) == (EventType.WARNING, Reason.HOLDER_GONE, 0)
    assert "gone" in event.message
    assert acquired(result) == []  # released this plan, handed on the next
    after = run([node("b", needed=True)], [slot(0, rv="10")])
    assert acquired(after) == [(0, "b")]


def test_gone_holder_of_two_slots_frees_both() -> None:
    result = run([], [slot(0, "gone", rv="9"), slot(1, "gone", rv="11")], max_concurrent=2)
    assert [(c.slot, c.holder_gone) for c in of(result, ReleaseSlot)] == [(0, True), (1, True)]
    assert len(of(result, EmitEvent)) == 1


def test_recreated_node_is_not_released_as_back_while_not_ready() -> None:
    fresh = node("a", ready=False, uid="uid-2")  # registered again: no annotations
    result = run([fresh, node("b", needed=True)], [slot(0, "a", uid="uid-1")], base=HOOKS)
    assert of(result, ReleaseSlot) == []
    assert of(result, ResetRebootOk) == []
    assert result.in_flight == ("a",)

    ready = run([node("a", uid="uid-2", ready_since=NOW - timedelta(seconds=10))],
                [slot(0, "a", uid="uid-1", rv="9")], base=HOOKS, min_ready=timedelta(minutes=1))
    assert of(ready, ReleaseSlot) == []
    assert ready.recheck_after == timedelta(seconds=50)

    back = run([node("a", uid="uid-2")], [slot(0, "a", uid="uid-1", rv="9")], base=HOOKS)
    assert back.changes[:2] == (
        ResetRebootOk("a", "100", (BEFORE_HOOK, AFTER_HOOK)),
        ReleaseSlot(0, "a", "9", NOW),
    )
    (event,) = of(back, EmitEvent)
    assert (event.type, event.reason) == (EventType.WARNING, Reason.HOLDER_REPLACED)
    assert "uid-1 -> uid-2" in event.message


def test_recreated_node_that_looks_rebooted_is_not_released_as_back() -> None:
    # New boot id, Ready, agent done: would prove a reboot -- but it is another node.
    fresh = node("a", ok=True, boot="boot-2", boot_before="boot-1", uid="uid-2", ready=False)
    result = run([fresh], [slot(0, "a", uid="uid-1")])
    assert of(result, LabelAfterReboot) == []
    assert of(result, ReleaseSlot) == []


def test_slot_without_a_recorded_uid_is_not_released_while_the_node_is_not_ready() -> None:
    # A slot an older coordinator took: a re-created Node is not told apart, but it is
    # still not released as back while NotReady.
    result = run([node("a", boot="boot-2", ready=False)], [slot(0, "a", uid="")])
    assert of(result, ReleaseSlot) == []


def test_admin_release_frees_stuck_slot() -> None:
    dead = node("a", ok=True, needed=True, in_progress=True, ready=False, release=True)
    leases = [slot(0, "a", acquired=NOW - timedelta(hours=5), stuck=True, rv="9")]
    result = run([dead, node("b", needed=True)], leases)
    assert result.changes[:2] == (
        ResetRebootOk("a", "100", (), clear_release_slot=False),
        ReleaseSlot(0, "a", "9", NOW),
    )
    assert reasons(result) == [Reason.RELEASED_BY_ADMIN]

    # After those writes: a is still "in progress" (it is dead) but released by the admin,
    # so it does not count, and b gets the slot.
    released = node("a", needed=True, in_progress=True, ready=False, release=True)
    after = run([released, node("b", needed=True)], [slot(0, rv="10")])
    assert acquired(after) == [(0, "b")]
    assert "a" not in after.in_flight
    assert of(after, ResetRebootOk) == []  # release-slot stays while a is in progress


def test_admin_release_annotation_is_cleared_once_nothing_is_in_progress() -> None:
    result = run([node("a", needed=True, release=True, blocked="gave up")])
    assert of(result, ResetRebootOk) == [ResetRebootOk("a", "100", (), clear_release_slot=True)]
    assert acquired(result) == []


def test_admin_release_annotation_stays_until_the_agent_has_uncordoned() -> None:
    # Cleared earlier, the node would count in flight again (cordoned by cluo) and hold
    # up the roll it was released from.
    result = run([node("a", needed=True, release=True, cordoned=True, marked=True),
                  node("b", needed=True)])
    assert of(result, ResetRebootOk) == []
    assert acquired(result) == [(0, "b")]


# --------------------------------------------------------------------------- stale views


def test_stale_reboot_ok_without_a_slot_counts_against_the_limit() -> None:
    result = run([node("old", ok=True, needed=True), node("a", needed=True)])
    assert acquired(result) == []
    assert result.in_flight == ("old",)


def test_stale_reboot_in_progress_without_a_slot_counts_against_the_limit() -> None:
    result = run([node("old", needed=True, in_progress=True), node("a", needed=True)])
    assert acquired(result) == []
    assert result.in_flight == ("old",)


def test_stale_grant_is_finished_the_cluo_way_without_a_slot() -> None:
    came_back = run([node("old", ok=True, boot="boot-9")])
    assert kinds(came_back) == ["LabelAfterReboot"]
    hooks_done = run([node("old", ok=True, after_label=True)])
    assert kinds(hooks_done) == ["ResetRebootOk", "EmitEvent"]
    assert of(hooks_done, ReleaseSlot) == []


def test_stale_grant_that_aborted_is_withdrawn() -> None:
    result = run([node("old", ok=True, needed=True, blocked="drain timed out")])
    assert kinds(result) == ["ResetRebootOk", "EmitEvent"]


@pytest.mark.parametrize("label", ["before_label", "after_label"])
def test_leftover_phase_label_without_a_slot_is_removed(label: str) -> None:
    result = run([node("a", needed=True, **{label: True})])
    assert kinds(result) == ["ResetRebootOk"]
    assert acquired(result) == []  # it queues on the next plan, once the label is gone


def test_node_named_by_two_slots_keeps_both_until_it_finishes() -> None:
    leases = [
        slot(0, "a", acquired=NOW - timedelta(minutes=3), rv="7"),
        slot(1, "a", acquired=NOW - timedelta(minutes=9), rv="8"),
    ]
    labelled = run([node("a", needed=True, before_label=True), node("b", needed=True)], leases,
                   max_concurrent=2)
    assert [(c.slot, c.node) for c in of(labelled, GrantRebootOk)] == [(1, "a")]  # primary
    assert acquired(labelled) == []
    finished = run([node("a", ok=True, after_label=True, boot="boot-2")], leases,
                   max_concurrent=2)
    assert [c.slot for c in of(finished, ReleaseSlot)] == [1, 0]


def test_slot_beyond_a_lowered_limit_finishes_but_is_not_reused() -> None:
    result = run([node("a", ok=True, after_label=True, boot="boot-2"), node("b", needed=True)],
                 [slot(3, "a")])
    assert [c.slot for c in of(result, ReleaseSlot)] == [3]
    free_again = run([node("b", needed=True)], [slot(3)])
    assert acquired(free_again) == [(0, "b")]


# --------------------------------------------------------------------------- contract


def test_no_plan_writes_the_same_object_twice() -> None:
    result = run(
        [
            node("a", ok=True, after_label=True, boot="boot-2"),
            node("b", needed=True, release=True, ok=True),
            node("c", needed=True, before_label=True),
            node("d", needed=True),
            node("e", needed=True),
        ],
        [slot(0, "a"), slot(1, "c")],
        max_concurrent=4,
    )
    targets: list[tuple[str, str | int]] = []
    for change in result.changes:
        if isinstance(change, (AcquireSlot, ReleaseSlot, MarkStuck)):
            targets.append(("lease", change.slot))
        elif not isinstance(change, EmitEvent):
            targets.append(("node", change.node))
    assert len(targets) == len(set(targets)), targets


def test_same_input_same_plan() -> None:
    nodes = [node(name, needed=True) for name in "zyxw"]
    assert run(nodes) == run(list(reversed(nodes)))


@pytest.mark.parametrize(
    ("nodes", "leases", "complaint"),
    [
        ([node("a"), node("a")], [], "node 'a' appears twice"),
        ([], [slot(0), slot(0)], "slot 0 appears twice"),
        ([], [SlotLease(0, "a")], "slot 0 names 'a' but has no resource version"),
    ],
)
def test_inconsistent_input_is_refused(
    nodes: list[NodeView], leases: list[SlotLease], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        plan(nodes, leases, NOW, Policy())


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan([], [], datetime(2024, 1, 1), Policy())


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"max_concurrent": 0}, "max_concurrent must be at least 1"),
        ({"reboot_timeout": timedelta(0)}, "reboot_timeout must be positive"),
        ({"min_ready": timedelta(seconds=-1)}, "min_ready must not be negative"),
    ],
)
def test_bad_policy_is_refused(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        Policy(**fields)
