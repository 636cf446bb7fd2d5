"""How the driver applies a plan: in order, stopping at the first error, guarded.

The real ``Coordinator`` loop on fakes and fake time (tests/unit/coord_fakes.py). Each
test names the ordering guard it checks (planner rules 3 and 4, the re-list after a
conflict, the backoff) and fails when that guard is removed from the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from cluo.errors import KubeError
from cluo.protocol import TRUE
from cluo_coord.coordinator import DEADLINE_SLACK, RECONCILE_BACKOFF
from cluo_coord.planner import Policy
from tests.unit.coord_fakes import (
    KEYS,
    T0,
    Cluster,
    CoordRig,
    Switch,
    annotations_of,
    conflict,
    patched,
    unavailable,
)

BEFORE_HOOK = "hooks.example.com/before-check"


def rebooted_holder(rig: CoordRig) -> None:
    """Node a holds slot 0 and no longer needs a reboot (with a new boot id): the plan is
    ResetRebootOk(a), ReleaseSlot(0), then the RebootFinished Event."""
    rig.cluster.add_node("a", **{KEYS.reboot_needed: "false"})
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5), holder_boot_id="boot-old")


# -- rule 4: the first error stops the plan ------------------------------------------


def test_a_failed_reset_stops_the_plan_so_the_slot_is_not_released_without_it() -> None:
    rig = CoordRig()
    rebooted_holder(rig)
    rig.cluster.fail("patch_node", *[unavailable("patching node 'a'")] * 3)
    journal = rig.run(until=30)
    (reset,) = patched(journal.entries, KEYS.reboot_ok)
    (release,) = journal.of("release")
    assert len(journal.of("patch_node", ok=False)) == 3
    # Released once, and only after the reset it follows was written.
    assert journal.index(reset) < journal.index(release)
    assert rig.cluster.nodes["a"].annotations[KEYS.reboot_ok] == "false"
    assert rig.cluster.slots[0].holder is None


def test_an_event_is_posted_only_once_the_change_it_reports_was_applied() -> None:
    rig = CoordRig()
    rebooted_holder(rig)
    rig.cluster.fail("release", unavailable("releasing reboot slot 0"))
    journal = rig.run(until=30)
    (failed,) = journal.of("release", ok=False)
    (release,) = journal.of("release", ok=True)
    (finished,) = [e for e in journal.of("event") if e.detail == "RebootFinished"]
    assert journal.index(failed) < journal.index(release) < journal.index(finished)


def test_the_givers_event_follows_the_takers_grant_and_survives_its_failure() -> None:
    rig = CoordRig()
    rebooted_holder(rig)
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    # The hand-over of a's slot to b is applied; b's grant fails once.
    rig.cluster.after("acquire", lambda: rig.cluster.fail(
        "patch_node", unavailable("patching node 'b'")))
    journal = rig.run(until=30)
    (failed,) = journal.of("patch_node", ok=False)
    (finished,) = [e for e in journal.of("event") if e.detail == "RebootFinished"]
    assert journal.index(failed) < journal.index(finished), "posted between the writes"
    assert rig.cluster.nodes["b"].annotations[KEYS.reboot_ok] == TRUE  # granted next plan


def reset_holder(rig: CoordRig) -> None:
    """Node a holds slot 0, back and uncordoned with nothing left to reset (its agent
    cleared its marks, reboot-ok is already false); node b waits for the slot. The plan
    is ResetRebootOk(a), a no-op, then the hand-over of slot 0 to b and b's grant."""
    rig.cluster.add_node("a", **{KEYS.reboot_needed: "false", KEYS.reboot_ok: "false"})
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5), holder_boot_id="boot-old")
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})


def test_a_reset_that_changes_nothing_reads_the_node_instead_of_writing_it() -> None:
    rig = CoordRig()
    reset_holder(rig)
    seen = str(rig.cluster.nodes["a"].version)
    journal = rig.run(until=30)
    (checked,) = journal.of("check_node")
    assert (checked.node, checked.detail) == ("a", seen), "at the version the planner saw"
    assert not [e for e in journal.of("patch_node") if e.node == "a"]
    (handed,) = journal.of("acquire")
    (grant,) = patched(journal.entries, KEYS.reboot_ok)
    assert journal.index(checked) < journal.index(handed) < journal.index(grant)
    assert rig.cluster.slots[0].holder == "b"


def test_a_node_changed_since_the_plan_fails_the_no_op_reset_as_a_conflict() -> None:
    rig = CoordRig()
    reset_holder(rig)
    rig.cache.lag()  # the cache has not seen a's change below yet
    rig.cluster.annotate("a", **{KEYS.last_checked_time: "1700000000"})
    journal = rig.run(until=30)
    (stale,) = journal.of("check_node", ok=False)
    assert stale.failed == "conflict"
    refresh = journal.of("refresh")[0]
    before_relist = journal.entries[:journal.index(refresh)]
    assert journal.index(stale) < journal.index(refresh)
    assert not [e for e in before_relist if e.call in ("acquire", "release", "patch_node")]
    assert rig.cluster.slots[0].holder == "b"  # planned again, from the fresh list


def test_a_reset_with_something_to_change_still_writes() -> None:
    rig = CoordRig()
    reset_holder(rig)
    rig.cluster.nodes["a"].labels[KEYS.after_reboot] = TRUE  # the after-reboot hooks' label
    journal = rig.run(until=30)
    assert not journal.of("check_node")
    (reset,) = [e for e in journal.of("patch_node", ok=True) if e.node == "a"]
    assert journal.index(reset) < journal.index(journal.of("acquire")[0])
    assert KEYS.after_reboot not in rig.cluster.nodes["a"].labels


def test_a_plan_stops_when_leadership_is_lost_midway() -> None:
    leadership = Switch()
    rig = CoordRig(Policy(before_reboot_annotations=(BEFORE_HOOK,)), leadership=leadership)
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    # Another replica takes over while the slot is being taken.
    rig.cluster.after("acquire", lambda: setattr(leadership, "leader", False))
    journal = rig.run(until=30)
    assert journal.times("acquire") == [0]
    assert not journal.of("patch_node"), "the rest of the plan is the new leader's"
    assert not journal.of("event")


# -- rule 3: a grant only while the slot Lease is as the planner saw it ---------------


def moved_on(cluster: Cluster) -> None:
    """The slot was released and taken by another node (another coordinator, a stale
    view): its resourceVersion moved on."""
    cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    cluster.hold(0, "b", acquired_at=T0)


def deleted(cluster: Cluster) -> None:
    """An admin deleted the slot Lease to free it."""
    del cluster.slots[0]


@pytest.mark.parametrize("change", [moved_on, deleted], ids=["moved-on", "deleted"])
def test_a_grant_is_refused_when_the_slot_lease_changed_since_the_plan(
    change: Callable[[Cluster], None],
) -> None:
    rig = CoordRig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    rig.cluster.nodes["a"].labels[KEYS.before_reboot] = TRUE  # hooks done: next, the grant
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=1))
    rig.cache.lag()  # the cache has not seen the slot change below yet
    change(rig.cluster)
    journal = rig.run(until=30)
    (read,) = journal.of("read_lease")[:1]
    assert read.t == 0, "the grant read the slot Lease, uncached"
    assert not rig.cluster.unbacked_grants, "reboot-ok=true while no slot Lease named the node"
    refresh = journal.of("refresh")[0]  # the refused grant counts as a conflict: re-listed
    assert not [e for e in patched(journal.entries[:journal.index(refresh)], KEYS.reboot_ok)]
    assert not [e for e in journal.entries[:journal.index(refresh)] if e.call == "event"]


# -- conflicts: re-list before planning again -----------------------------------------


def test_a_conflict_relists_before_planning_again() -> None:
    rig = CoordRig(Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    rig.cache.lag()
    rig.cluster.annotate("a", **{KEYS.last_checked_time: "1700000000"})  # unseen by the cache
    journal = rig.run(until=30)
    (stale,) = journal.of("patch_node", ok=False)
    assert stale.failed == "conflict"
    (label,) = patched(journal.entries, KEYS.before_reboot)
    refresh = journal.of("refresh")[0]
    # A plan's "plan" entry comes once its writes are done (the gauges).
    replan = next(e for e in journal.entries[journal.index(refresh):] if e.call == "plan")
    assert journal.index(stale) < journal.index(refresh) < journal.index(label)
    assert journal.index(label) < journal.index(replan)
    assert label.t == 0, "a conflict re-plans at once, with no backoff"


def test_a_writer_that_keeps_winning_is_backed_off_from() -> None:
    rig = CoordRig()
    rebooted_holder(rig)
    rig.cluster.fail("patch_node", *[conflict("patching node 'a'")] * 6)
    journal = rig.run(until=60)
    # The first three conflicts re-list and re-plan at once; from the fourth in a row on,
    # each waits a little longer first (0.2 s more each time).
    assert journal.times("patch_node") == pytest.approx([0, 0, 0, 0, 0.8, 1.8, 3.0])
    assert len(journal.of("refresh")) == 6
    assert rig.cluster.slots[0].holder is None


# -- errors back off, and the backoff resets after a success --------------------------


def test_errors_back_off_exponentially_and_the_backoff_resets_after_success() -> None:
    rig = CoordRig(Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    rig.cluster.fail("patch_node", *[unavailable("patching node 'a'")] * 4)

    def hook_done_and_server_down(cluster: Cluster) -> None:
        cluster.annotate("a", **{BEFORE_HOOK: TRUE})
        cluster.fail("patch_node", *[unavailable("patching node 'a'")] * 2)

    rig.event_at(100, hook_done_and_server_down)
    journal = rig.run(until=200)
    b = RECONCILE_BACKOFF.initial
    assert journal.times("patch_node") == pytest.approx([
        0, b, b + 2 * b, b + 2 * b + 4 * b, b + 2 * b + 4 * b + 8 * b,  # the label
        100, 100 + b, 100 + b + 2 * b,  # the grant: back to the first step
    ])
    assert len(journal.of("patch_node", ok=True)) == 2
    assert rig.cluster.nodes["a"].annotations[KEYS.reboot_ok] == TRUE


def test_an_error_with_retry_after_backs_off_at_least_that_long() -> None:
    rig = CoordRig()
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    throttled = KubeError("patching node 'a'", "too many requests", kind="blocked",
                          status=429, retry_after=5.0)
    rig.cluster.fail("patch_node", throttled, throttled)
    journal = rig.run(until=60)
    b = RECONCILE_BACKOFF.initial
    assert 2 * b < 5.0
    assert journal.times("patch_node")[:3] == pytest.approx([0, 5.0, 10.0])


# -- rule 11: a slot is freed for a gone holder only if the Node really is gone ---------


def test_the_slot_of_a_deleted_node_is_freed_after_an_uncached_read_and_reported() -> None:
    rig = CoordRig()
    rig.cluster.hold(0, "gone", acquired_at=T0 - timedelta(minutes=5))
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    journal = rig.run(until=5)
    (checked,) = journal.of("node_exists")
    (release,) = journal.of("release")
    (reported,) = journal.of("slot_event")
    assert journal.index(checked) < journal.index(release) < journal.index(reported)
    assert reported.detail == "0 RebootSlotHolderGone"
    assert rig.cluster.slots[0].holder == "b"  # the roll goes on
    metrics = rig.coordinator._metrics
    assert metrics.events.labels(type="Warning", reason="RebootSlotHolderGone")._value.get() == 1


def test_a_holder_outside_the_node_selector_is_not_gone_and_keeps_its_slot() -> None:
    rig = CoordRig()
    rig.cluster.hold(0, "elsewhere", acquired_at=T0 - timedelta(minutes=5))
    rig.cluster.hidden_nodes.add("elsewhere")
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    journal = rig.run(until=30)
    assert len(journal.of("node_exists")) > 1  # tried again, with backoff
    assert not journal.of("release")
    assert not journal.of("slot_event")
    assert rig.cluster.slots[0].holder == "elsewhere"


# -- rule 13: a failed drain backs off, and the driver wakes when the backoff is over --


def aborted_holder(rig: CoordRig) -> None:
    """Node a holds slot 0 and its agent handed the grant back: the drain timed out."""
    rig.cluster.add_node("a", **{KEYS.reboot_needed: TRUE, KEYS.reboot_ok: TRUE,
                                 KEYS.blocked_reason: "drain timed out after 5s"})
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5))


def agent_clears_blocked_reason(cluster: Cluster) -> None:
    cluster.annotate("a", **{KEYS.blocked_reason: None})


DRAIN_BACKOFF = Policy(drain_backoff=timedelta(seconds=60), max_drain_attempts=3)


def test_a_failed_drain_is_recorded_with_its_reset_and_the_waiting_node_goes_next() -> None:
    rig = CoordRig(DRAIN_BACKOFF)
    aborted_holder(rig)
    rig.cluster.add_node("b", **{KEYS.reboot_needed: TRUE})
    rig.event_at(1, agent_clears_blocked_reason)
    journal = rig.run(until=30)
    (reset,) = patched(journal.entries, KEYS.drain_failures)
    assert f"{KEYS.reboot_ok}=false" in reset.detail
    assert f"{KEYS.drain_retry_at}=2026-03-02T09:01:00Z" in reset.detail
    assert annotations_of(rig.cluster, "a")[KEYS.drain_failures] == "1"
    assert rig.cluster.slots[0].holder == "b"
    (blocked,) = [e for e in journal.of("event") if e.detail == "DrainBlocked"]
    assert blocked.node == "a"
    metrics = rig.coordinator._metrics
    assert metrics.events.labels(type="Warning", reason="DrainBlocked")._value.get() == 1
    assert metrics.nodes_in_drain_backoff._value.get() == 1


def test_the_driver_plans_again_when_the_drain_backoff_is_over() -> None:
    rig = CoordRig(DRAIN_BACKOFF)
    aborted_holder(rig)
    rig.event_at(1, agent_clears_blocked_reason)
    journal = rig.run(until=90)
    # No event after t=1: only the backoff's deadline can bring the node back.
    assert journal.times("acquire") == pytest.approx([60 + DEADLINE_SLACK], abs=0.1)
    assert rig.coordinator._metrics.nodes_in_drain_backoff._value.get() == 0


def test_a_node_out_of_the_roll_is_counted_and_gets_no_slot() -> None:
    rig = CoordRig(DRAIN_BACKOFF)
    aborted_holder(rig)
    rig.cluster.annotate("a", **{KEYS.drain_failures: "2"})
    rig.event_at(1, agent_clears_blocked_reason)
    journal = rig.run(until=600)
    assert annotations_of(rig.cluster, "a")[KEYS.drain_failures] == "3"
    assert KEYS.drain_retry_at not in annotations_of(rig.cluster, "a")
    assert not journal.of("acquire")
    metrics = rig.coordinator._metrics
    assert metrics.nodes_out_of_roll._value.get() == 1
    assert metrics.nodes_in_drain_backoff._value.get() == 0
