"""The hand-over: a finished holder's slot goes to the next node in one compare-and-swap.

The plan that resets a holder whose cycle is done (it no longer needs a reboot, is not
rebooting and not cordoned by cluo) takes its global slot for the head of the queue in one
write at the version naming the holder, instead of releasing it and leaving the take to
the next plan; only where the next plan would give that slot to that node anyway.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from cluo_coord.apply import schedule
from cluo_coord.groups import CONTROL_PLANE_SLOTS, Budget, Groups
from cluo_coord.planner import (
    AcquireSlot,
    Change,
    EmitEvent,
    GrantRebootOk,
    LabelBeforeReboot,
    Plan,
    Policy,
    ReleaseSlot,
    ResetRebootOk,
    plan,
)
from tests.unit.test_planner import HOOKS, NOW, acquired, kinds, node, of, reasons, run, slot
from tests.unit.test_planner_groups import group_slot, member

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


# --------------------------------------------------------------------------- with groups
# A holder of a global slot and of its group's slot (rule 15) hands both over to a taker
# of its group, each at the version naming it, after its reset; to a taker of another
# group the global slot only, its group slot released and the taker's own taken fresh.

GROUPED = Policy(max_concurrent=2, groups=Groups(max_concurrent=1))
G_DONE = member("a", "g", ok=True, after_label=True, boot="boot-2", rv="40")
G_HELD = [slot(0, "a", rv="9"), group_slot("g", 0, "a", rv="19")]


def acquisitions(result: Plan) -> list[tuple[str, str, int, str, str | None]]:
    """(node, group, index, handed_from, expected version) of each AcquireSlot."""
    return [(c.node, c.group, c.slot, c.handed_from, c.expected_resource_version)
            for c in of(result, AcquireSlot)]


def waits_for(result: Plan, later: Change, earlier: Change) -> bool:
    """Whether the driver applies ``later`` only after ``earlier`` (cluo_coord.apply)."""
    steps = schedule(result.changes)
    by_index = {step.index: step for step in steps}
    first = result.changes.index(earlier)
    todo, seen = [result.changes.index(later)], set()
    while todo:
        step = by_index[todo.pop()]
        if first in step.after:
            return True
        todo += [index for index in step.after if index not in seen]
        seen.update(step.after)
    return False


def test_a_taker_of_its_group_gets_both_slots_after_the_holders_reset() -> None:
    result = plan([G_DONE, member("b", "g", needed=True, rv="50")], G_HELD, NOW, GROUPED)
    assert acquisitions(result) == [("b", "g", 0, "a", "19"), ("b", "", 0, "a", "9")]
    assert of(result, ReleaseSlot) == []
    reset = of(result, ResetRebootOk)[0]
    group_take, global_take = of(result, AcquireSlot)
    assert reset.node == "a"
    assert waits_for(result, group_take, reset) and waits_for(result, global_take, reset)
    grant = of(result, GrantRebootOk)[0]  # no hooks: b's grant follows both
    assert grant.node == "b" and grant.after_acquire
    assert grant.group_slots == (("g", 0, ""),)  # the group take's CAS is its check
    assert group_take.grant_follows and global_take.grant_follows
    assert waits_for(result, grant, global_take) and waits_for(result, grant, group_take)
    finished = [e for e in of(result, EmitEvent) if e.node == "a"]
    assert [e.reason.value for e in finished] == ["RebootFinished"]
    assert result.changes.index(finished[0]) > result.changes.index(global_take)
    assert result.holds == ()


def test_without_the_hand_over_the_full_group_holds_the_taker() -> None:
    # The same cluster, but the slot must rest: a releases both, b waits for the next plan.
    result = plan([G_DONE, member("b", "g", needed=True)], G_HELD, NOW,
                  replace(GROUPED, delay_between_reboots=timedelta(minutes=1)))
    assert acquisitions(result) == []
    assert [(c.group, c.slot) for c in of(result, ReleaseSlot)] == [("", 0), ("g", 0)]


def test_a_taker_of_another_group_gets_the_global_slot_and_its_own_group_slot() -> None:
    result = plan([G_DONE, member("b", "h", needed=True)], G_HELD, NOW, GROUPED)
    assert acquisitions(result) == [("b", "h", 0, "", None), ("b", "", 0, "a", "9")]
    assert [(c.node, c.group, c.slot) for c in of(result, ReleaseSlot)] == [("a", "g", 0)]
    reset, release = of(result, ResetRebootOk)[0], of(result, ReleaseSlot)[0]
    assert waits_for(result, release, reset)


def test_the_finisher_of_the_takers_group_hands_over_before_the_first_finisher() -> None:
    # a (group g) and c (group h) finish; b of group h is first in the queue: it takes
    # c's two slots, d of group g a's, in queue order, nothing released.
    c_done = member("c", "h", ok=True, after_label=True, boot="boot-2", rv="41")
    leases = [*G_HELD, slot(1, "c", rv="10"), group_slot("h", 0, "c", rv="20")]
    queued = [member("b", "h", needed=True, since=NOW - timedelta(hours=2)),
              member("d", "g", needed=True, since=NOW - timedelta(hours=1))]
    result = plan([G_DONE, c_done, *queued], leases, NOW, GROUPED)
    assert acquisitions(result) == [("b", "h", 0, "c", "20"), ("b", "", 1, "c", "10"),
                                    ("d", "g", 0, "a", "19"), ("d", "", 0, "a", "9")]
    assert of(result, ReleaseSlot) == []


def test_a_group_budget_counts_the_taker_in_place_of_the_holder() -> None:
    policy = replace(GROUPED, groups=Groups(max_unavailable=Budget(1)))
    result = plan([G_DONE, member("b", "g", needed=True), member("c", "g")], G_HELD, NOW,
                  policy)
    assert [(c.group, c.handed_from) for c in of(result, AcquireSlot)] == [("g", "a"),
                                                                          ("", "a")]


def test_a_control_plane_holder_hands_its_control_plane_slot_to_the_next_one() -> None:
    done = member("cp1", cp=True, ok=True, after_label=True, boot="boot-2")
    leases = [slot(0, "cp1", rv="9"), group_slot(CONTROL_PLANE_SLOTS, 0, "cp1", rv="19")]
    result = plan([done, member("cp2", cp=True, needed=True)], leases, NOW,
                  Policy(max_concurrent=2))
    assert acquisitions(result) == [("cp2", CONTROL_PLANE_SLOTS, 0, "cp1", "19"),
                                    ("cp2", "", 0, "cp1", "9")]


def test_the_last_canary_node_releases_its_slots_and_the_others_wait_out_the_soak() -> None:
    done = member("c1", "canary", ok=True, after_label=True, boot="boot-2")
    leases = [slot(0, "c1"), group_slot("canary", 0, "c1")]
    policy = Policy(max_concurrent=2, groups=Groups(canary="canary"),
                    canary_soak=timedelta(minutes=30))
    result = plan([done, member("w1", "workers", needed=True)], leases, NOW, policy)
    assert acquisitions(result) == []
    assert [(c.group, c.slot) for c in of(result, ReleaseSlot)] == [("", 0), ("canary", 0)]


def test_a_holder_named_by_two_slots_of_its_group_releases_them_all() -> None:
    # Possible only after a stale view (rule 9); b takes its slots in the next plan.
    leases = [*G_HELD, group_slot("g", 1, "a", rv="21")]
    result = plan([G_DONE, member("b", "g", needed=True)], leases, NOW,
                  replace(GROUPED, groups=Groups(max_concurrent=2)))
    assert acquisitions(result) == []
    assert [(c.group, c.slot) for c in of(result, ReleaseSlot)] == [
        ("", 0), ("g", 0), ("g", 1)]


# Crash points: the coordinator killed after the reset, after the group slot's hand-over,
# after the group slot's release (taker of another group), after the taker's fresh take.

def test_a_crash_after_the_reset_resumes_with_both_hand_overs() -> None:
    reset = member("a", "g", boot="boot-2", rv="41")
    result = plan([reset, member("b", "g", needed=True)], G_HELD, NOW, GROUPED)
    assert acquisitions(result) == [("b", "g", 0, "a", "19"), ("b", "", 0, "a", "9")]


def test_a_crash_after_the_group_hand_over_resumes_with_the_global_one_and_the_grant(
) -> None:
    reset = member("a", "g", boot="boot-2", rv="41")
    leases = [slot(0, "a", rv="9"), group_slot("g", 0, "b", rv="22")]
    result = plan([reset, member("b", "g", needed=True)], leases, NOW, GROUPED)
    assert acquisitions(result) == [("b", "", 0, "a", "9")]
    grant = of(result, GrantRebootOk)[0]
    assert grant.node == "b" and grant.after_acquire
    assert grant.group_slots == (("g", 0, "22"),)
    assert waits_for(result, grant, of(result, AcquireSlot)[0])


def test_a_crash_after_both_hand_overs_resumes_with_the_grant() -> None:
    reset = member("a", "g", boot="boot-2", rv="41")
    leases = [slot(0, "b", rv="10"), group_slot("g", 0, "b", rv="22")]
    result = plan([reset, member("b", "g", needed=True)], leases, NOW, GROUPED)
    assert kinds(result)[:1] == ["GrantRebootOk"]
    assert of(result, GrantRebootOk)[0].group_slots == (("g", 0, "22"),)


def test_a_crash_after_the_group_release_resumes_with_the_global_hand_over() -> None:
    reset = member("a", "g", boot="boot-2", rv="41")
    leases = [slot(0, "a", rv="9"), group_slot("g", 0, rv="23"), group_slot("h", 0, "b")]
    result = plan([reset, member("b", "h", needed=True)], leases, NOW, GROUPED)
    assert acquisitions(result) == [("b", "", 0, "a", "9")]


def test_a_crash_after_the_takers_fresh_take_keeps_the_group_limits() -> None:
    # b took its group slot; a was never reset: a's reset, then the hand-over of its
    # global slot, its group slot released; c of group h finds h full.
    leases = [*G_HELD, group_slot("h", 0, "b", rv="24")]
    result = plan([G_DONE, member("b", "h", needed=True), member("c", "h", needed=True)],
                  leases, NOW, GROUPED)
    assert acquisitions(result) == [("b", "", 0, "a", "9")]
    assert [(c.group, c.slot) for c in of(result, ReleaseSlot)] == [("g", 0)]
    assert "max-concurrent: group h has 1 node(s) in flight, its max-concurrent 1" in (
        result.holds)
