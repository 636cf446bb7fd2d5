"""The hand-over: a finished holder's slot goes to the next node in one compare-and-swap.

The plan that resets a holder whose cycle is done (it no longer needs a reboot, is not
rebooting and not cordoned by cluo) takes its global slot for the head of the queue in one
write at the version naming the holder, instead of releasing it and leaving the take to
the next plan; only where the next plan would give that slot to that node anyway.
"""

from __future__ import annotations

from datetime import timedelta

from cluo_coord.groups import Budget
from cluo_coord.planner import (
    AcquireSlot,
    EmitEvent,
    GrantRebootOk,
    LabelBeforeReboot,
    ReleaseSlot,
    ResetRebootOk,
    plan,
)
from tests.unit.test_planner import HOOKS, NOW, acquired, kinds, node, of, reasons, run, slot

# a after its cycle, reset state not yet written: the plan resets it and frees its slot
DONE = node("a", ok=True, after_label=True, boot="boot-2", rv="40")
HELD = slot(0, "a", rv="9")


def test_hand_over_follows_the_reset_and_carries_the_holders_lease_version() -> None:
    result = run([DONE, node("b", needed=True, rv="50")], [HELD])
    assert kinds(result) == ["ResetRebootOk", "AcquireSlot", "EmitEvent", "GrantRebootOk",
                             "EmitEvent", "EmitEvent"]
    reset, handover = result.changes[0], result.changes[1]
    assert isinstance(reset, ResetRebootOk) and reset.node == "a"
    assert handover == AcquireSlot(0, "b", "9", "boot-1", NOW, "uid-1", transitions=1,
                                   grant_follows=True, handed_from="a")
    finished = result.changes[2]  # a's Event follows the write that released its slot
    assert isinstance(finished, EmitEvent) and finished.node == "a"
    grant = result.changes[3]
    assert isinstance(grant, GrantRebootOk) and grant.node == "b" and grant.after_acquire


def test_hand_over_with_hooks_labels_the_taker_and_waits_for_its_hooks() -> None:
    finished = node("a", boot="boot-2", marked=True)  # reset, uncordoned by the agent
    result = run([finished, node("b", needed=True)], [HELD], base=HOOKS)
    assert kinds(result) == ["ResetRebootOk", "AcquireSlot", "EmitEvent",
                             "LabelBeforeReboot", "EmitEvent"]
    assert [c.handed_from for c in of(result, AcquireSlot)] == ["a"]
    assert of(result, GrantRebootOk) == []
    assert [c.node for c in of(result, LabelBeforeReboot)] == ["b"]


def test_nobody_queued_means_a_plain_release() -> None:
    result = run([DONE], [HELD])
    assert kinds(result) == ["ResetRebootOk", "ReleaseSlot", "EmitEvent"]


def test_a_slot_that_must_rest_is_released_and_taken_later() -> None:
    result = run([DONE, node("b", needed=True)], [HELD],
                 delay_between_reboots=timedelta(minutes=5))
    assert [c.node for c in of(result, ReleaseSlot)] == ["a"]
    assert acquired(result) == []


def test_a_holder_that_still_needs_a_reboot_releases_its_slot() -> None:
    # A new update during the after-reboot phase: a queues again, so the next plan might
    # not give the slot to b; and an aborted drain keeps a out of the roll for a while.
    again = node("a", ok=True, after_label=True, boot="boot-2", needed=True)
    aborted = node("a", ok=True, needed=True, blocked="PDB web allows 0 disruptions")
    for holder in (again, aborted):
        result = run([holder, node("b", needed=True)], [HELD])
        assert [c.node for c in of(result, ReleaseSlot)] == ["a"]
        assert [c.handed_from for c in of(result, AcquireSlot)] == []


def test_a_paused_roll_releases_the_slot_and_hands_nothing_over() -> None:
    result = run([DONE, node("b", needed=True)], [HELD], paused=True)
    assert [c.node for c in of(result, ReleaseSlot)] == ["a"]
    assert acquired(result) == []


def test_the_finished_holders_place_goes_only_to_its_own_slot() -> None:
    # c (cordoned by cluo, no slot: a stale view) still counts, so with two slots there
    # is no room but a's: b takes slot 0 from a, never the free slot 1 beside it.
    stale = node("c", boot="boot-2", cordoned=True, marked=True)
    result = run([DONE, node("b", needed=True), stale], [HELD], max_concurrent=2)
    assert [(c.slot, c.node, c.handed_from) for c in of(result, AcquireSlot)] == [
        (0, "b", "a")]


def test_with_room_beside_it_the_next_nodes_take_free_slots_after_the_hand_over() -> None:
    result = run([DONE, node("b", needed=True), node("c", needed=True)], [HELD],
                 max_concurrent=2)
    assert [(c.slot, c.node, c.handed_from) for c in of(result, AcquireSlot)] == [
        (0, "b", "a"), (1, "c", "")]


def test_max_unavailable_counts_the_taker_in_place_of_the_holder() -> None:
    result = run([DONE, node("b", needed=True), node("c")], [HELD],
                 max_unavailable=Budget(1))
    assert [c.handed_from for c in of(result, AcquireSlot)] == ["a"]
    assert result.holds == ()


def test_a_holder_unavailable_for_a_reason_of_its_own_still_counts() -> None:
    # a is cordoned by an admin: after the reset it stays unavailable, so b waits.
    cordoned = node("a", ok=True, after_label=True, boot="boot-2", cordoned=True)
    result = run([cordoned, node("b", needed=True)], [HELD], max_unavailable=Budget(1))
    assert [c.node for c in of(result, ReleaseSlot)] == ["a"]
    assert acquired(result) == []


def test_a_crash_before_the_hand_over_resumes_with_it() -> None:
    # a's reset was written, the hand-over was not: the slot still names a.
    reset = node("a", boot="boot-2", rv="41")
    result = run([reset, node("b", needed=True)], [HELD])
    assert kinds(result)[:2] == ["ResetRebootOk", "AcquireSlot"]
    assert [(c.node, c.handed_from) for c in of(result, AcquireSlot)] == [("b", "a")]
    assert reasons(result)[0].value == "RebootFinished"


def test_a_crash_after_the_hand_over_resumes_with_the_grant() -> None:
    taken = slot(0, "b", rv="10")
    result = run([node("a", boot="boot-2"), node("b", needed=True)], [taken])
    assert kinds(result)[:1] == ["GrantRebootOk"]
    grant = of(result, GrantRebootOk)[0]
    assert (grant.node, grant.expected_lease_resource_version) == ("b", "10")


def test_a_conflict_on_the_hand_over_leaves_the_next_plan_to_the_cluster() -> None:
    # The hand-over failed (the Lease changed): no grant was written, and a plan from the
    # cluster's state -- here: someone else took the slot -- gives b nothing.
    other = slot(0, "x", rv="11")
    result = plan([node("a", boot="boot-2"), node("b", needed=True),
                   node("x", needed=True)], [other], NOW, HOOKS)
    assert acquired(result) == []
    assert of(result, GrantRebootOk) == []
