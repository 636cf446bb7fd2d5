"""The reconcile driver: read the cached cluster, ``plan()``, apply the changes in order.

The loop plans on every watch event, when a deadline passes, and at once after it
applied changes (so the next node gets its slot right after a release); otherwise it does
not plan at all. The deadlines are the planner's ``Plan.recheck_after`` (a reboot
timeout, ``min_ready``, a window opening, ``delay_between_reboots``, the end of a drain
backoff: every rule that depends on time alone says when) and the cache's
``ClusterSnapshot.expires_in``. The loop
still ticks every ``IDLE_TICK`` for /healthz; a tick also checks the deadline against the
(injected) wall clock, so a clock step forward is noticed within a tick. It honours the
planner's safety rules (see cluo_coord.planner):

- every node write is a JSON merge patch carrying the resourceVersion the planner saw,
  every Lease write a KubeSlots compare-and-swap (rule 2); a ``ResetRebootOk`` that would
  change nothing on the cached Node the planner saw is an uncached read of the node
  instead, which fails as the write would if the node moved on (rule 4);
- before ``reboot-ok=true`` the slot Lease is read again, uncached, and the grant is
  refused unless it is still at the resourceVersion the planner saw and names the node
  (rule 3); or, instead of that read, it was written right before by a compare-and-swap
  (the health gate's record, or the acquisition the grant follows in the same plan);
- each node's changes are applied in the planner's order and the first error stops the
  plan, so a ``ReleaseSlot`` never runs without the ``ResetRebootOk`` before it (rule 4),
  and an Event is posted only when the change it reports was applied. Changes of
  different nodes may be applied at the same time (cluo_coord.apply: which change waits
  for which, and the pool); after an error no change starts, the ones running finish.

A conflict means the view was stale: both collections are re-listed (uncached) before
planning again, so a stale cache cannot loop. Other errors back off exponentially.
Only the leader plans and writes; a standby keeps its caches warm.

The driver depends only on the small Protocols below (the cache view, the node writer,
the slot store, the event sink, leadership) and on injected clocks: the wall clock the
planner reads, the monotonic clock its waits are measured on, and the ``Waiter`` it
sleeps on. Tests drive the whole loop on fakes in one thread with fake time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cluo.backoff import Backoff
from cluo.errors import CluoError, KubeError
from cluo.kube.nodes import EventType as KubeEventType
from cluo.kube.nodes import KubeNodes
from cluo.protocol import MetadataPatch
from cluo_coord.apply import InOrder, Runner, schedule
from cluo_coord.blockers import BlockerWatch
from cluo_coord.brake import FailedReboot, RollState
from cluo_coord.cluster import ClusterCache, ClusterSnapshot, ClusterWriter
from cluo_coord.health import (
    ALL_CLEAR,
    GATE_EVENT_REASON,
    HOLD_EVENT_REASON,
    Health,
    hold_changes,
    hold_kind,
)
from cluo_coord.leader import KubeRollState
from cluo_coord.leases import KubeSlots, lease_name, slot_from_object
from cluo_coord.metrics import CoordMetrics
from cluo_coord.planner import (
    AcquireSlot,
    Change,
    EmitEvent,
    GrantRebootOk,
    LabelAfterReboot,
    LabelBeforeReboot,
    MarkStuck,
    NodeIndex,
    NodeView,
    PauseRoll,
    Plan,
    Policy,
    Reason,
    RecordFailedReboot,
    ReleaseSlot,
    ResetRebootOk,
    SlotLease,
    counts_every_node,
    ignored_while_unslotted,
    malformed_values,
    plan,
)
from cluo_coord.roll_events import NoNotifier, RollNotifier
from cluo_coord.workloads import GATE_RECHECK, WorkloadGates

log = logging.getLogger(__name__)

COMPONENT = "cluo-coord"
IDLE_TICK = 2.0  # the loop wakes at least this often (for /healthz), planning or not
STOP_CHECK = 0.5  # s: the longest a wait goes without looking at the stop flag
DEADLINE_SLACK = 0.01  # s past a deadline before the monotonic wake-up (clock granularity)
# Reconcile errors other than conflicts: 0.2 s doubling to 30 s.
RECONCILE_BACKOFF = Backoff(initial=0.2, maximum=30.0)
# Conflict after conflict (another writer keeps winning): 0.2 s more each time, up to 2 s.
CONFLICT_PAUSE_STEP = 0.2
CONFLICT_PAUSE_MAX = 2.0
# After a re-list that failed, before planning again.
RELIST_RETRY = 1.0
MAX_PLANS_WITHOUT_PAUSE = 50


Obj = dict[str, Any]


class ClusterView(Protocol):
    """The cached cluster (``ClusterCache``): the planner's input, and the objects the
    driver just wrote, put back so the next plan sees them before the watch does."""

    @property
    def synced(self) -> bool: ...

    def snapshot(self) -> ClusterSnapshot: ...

    def refresh(self) -> None:
        """Re-list everything now, uncached (after a conflict)."""

    def put_node(self, obj: Obj) -> None: ...

    def put_slot(self, slot: SlotLease) -> None: ...

    def node(self, name: str) -> Obj | None:
        """The cached Node, its labels and annotations whole; None if not cached."""


class NodeWriter(Protocol):
    """Node writes with compare-and-swap, and the uncached slot Lease read that guards
    every grant (rule 3) (``ClusterWriter``)."""

    def patch_node(self, name: str, patch: MetadataPatch, resource_version: str, *,
                   unschedulable: bool | None = None) -> Obj: ...

    def read_lease(self, name: str) -> Obj | None: ...

    def check_node(self, name: str, resource_version: str) -> None:
        """Uncached: fails as ``patch_node`` would if the node is no longer at
        ``resource_version`` (instead of a write that would change nothing, rule 4)."""

    def node_exists(self, name: str) -> bool:
        """Uncached: before a slot whose holder is gone is freed (planner rule 11)."""


class SlotStore(Protocol):
    """The slot Leases, every write a compare-and-swap (``KubeSlots``), and Events
    about them (posting one never raises)."""

    def acquire(self, change: AcquireSlot, workloads: str | None = None) -> SlotLease:
        """``workloads``: the health gate's record, written in the same CAS."""

    def release(self, change: ReleaseSlot) -> SlotLease: ...

    def mark_stuck(self, change: MarkStuck) -> SlotLease: ...

    def emit_event(self, index: int, reason: str, message: str, *, type: str,
                   component: str) -> None: ...


class EventSink(Protocol):
    """Kubernetes Events about nodes (``KubeNodes``); posting one never raises."""

    def emit_event(
        self,
        node_name: str,
        reason: str,
        message: str,
        *,
        type: KubeEventType,
        component: str,
    ) -> None: ...


class RollStore(Protocol):
    """The brake's writes on the leader Lease (``KubeRollState``), compare-and-swap."""

    def record_failed_reboot(self, failure: FailedReboot) -> RollState: ...

    def pause(self, reason: str, at: datetime) -> RollState: ...


class StatusSink(Protocol):
    """Takes each plan for the status view (``cluo_coord.status.StatusPublisher``); it
    must return at once and never raise: publishing is not on the grant's path."""

    def offer(self, plan: Plan, snapshot: ClusterSnapshot, at: datetime) -> None: ...


class HealthGates(Protocol):
    """The health gate (``cluo_coord.workloads.WorkloadGates``): records a node's
    workloads on its slot Lease at the grant, and says which finished holders wait."""

    def record_grant(self, node: str, slot: int, expected_lease_version: str) -> SlotLease:
        """A compare-and-swap on the slot Lease, right before rule 3's check (which then
        expects the version it wrote): it fails (conflict) if the Lease moved."""

    def grant_record(self, node: str) -> str:
        """The record (JSON) for a grant that follows its acquisition in one plan: the
        acquisition's compare-and-swap writes it (read ahead if fresh, else now)."""

    def prefetch(self, queue: tuple[str, ...]) -> None:
        """Read ahead the records of the queue's head(s), off the grant's path."""

    def closed(self, nodes: Iterable[NodeView], slots: Iterable[SlotLease]
               ) -> dict[str, str]: ...


class Blockers(Protocol):
    """What fires now (``cluo_coord.blockers.BlockerWatch``, its own thread);
    ``version`` moves whenever that changes."""

    def firing(self) -> tuple[str, ...]: ...

    @property
    def version(self) -> int: ...


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...


class Waiter(Protocol):
    """What the loop sleeps on: ``wake()`` sets it, the loop waits on it with a timeout
    and clears it. ``threading.Event`` in production; tests pass one that advances fake
    time instead of sleeping."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class AlwaysLeader:
    """Leader election off: this process always acts."""

    @property
    def is_leader(self) -> bool:
        return True


@dataclass(frozen=True)
class Deadline:
    """When to plan again without an event, on both clocks: the loop sleeps on the
    monotonic one, and a tick also compares the wall clock (the planner's time)."""

    monotonic: float
    wall: datetime

    @classmethod
    def after(cls, delay: timedelta, *, monotonic_now: float, wall_now: datetime) -> Deadline:
        return cls(monotonic_now + delay.total_seconds() + DEADLINE_SLACK, wall_now + delay)

    def passed(self, *, monotonic_now: float, wall_now: datetime) -> bool:
        return monotonic_now >= self.monotonic or wall_now >= self.wall

    def seconds_left(self, monotonic_now: float) -> float:
        return max(self.monotonic - monotonic_now, 0.0)


@dataclass(frozen=True)
class Reconciled:
    """One pass of the loop: the plan, how many writes were made, and when time alone
    could change the next plan (None: only an event can)."""

    plan: Plan
    writes: int
    deadline: Deadline | None


class Coordinator:
    """Drives ``plan()`` from the cluster cache and applies its changes."""

    def __init__(
        self,
        cache: ClusterView,
        *,
        writer: NodeWriter,
        slots: SlotStore,
        nodes: EventSink,
        policy: Policy,
        metrics: CoordMetrics,
        leadership: Leadership | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        waiter: Waiter | None = None,
        tick: float = IDLE_TICK,
        gates: HealthGates | None = None,
        blockers: Blockers | None = None,
        roll: RollStore | None = None,
        status: StatusSink | None = None,
        notifier: RollNotifier | None = None,
        runner: Runner | None = None,
    ) -> None:
        """``clock`` is the planner's (wall) time; ``monotonic`` measures the waits,
        which go through ``waiter`` (a fresh ``threading.Event`` by default).
        ``runner`` applies a plan's changes (cluo_coord.apply): ``InOrder`` by default,
        ``Pooled`` in cluo-coord."""
        self._cache = cache
        self._writer = writer
        self._slots = slots
        self._nodes = nodes
        self._policy = policy
        self._metrics = metrics
        self._leadership = leadership or AlwaysLeader()
        self._clock = clock
        self._monotonic = monotonic
        self._wake: Waiter = waiter if waiter is not None else threading.Event()
        self._tick = tick
        self._gates = gates  # None: the health gate is off
        self._blockers = blockers  # None: no blocker configured
        self._blockers_planned = -1  # the blockers' version the last plan saw
        self._holds: tuple[str, ...] = ()  # the last plan's (to log and post changes)
        self._closed_gates: frozenset[str] = frozenset()
        self._roll = roll
        self._status = status
        self._notifier: RollNotifier = notifier or NoNotifier()  # webhooks
        self._runner: Runner = runner or InOrder()
        self._last_tick = monotonic()
        self._plan_due = True  # plan at the next tick whatever the deadline
        self._deadline: Deadline | None = None
        # The snapshot of the last plan that changed nothing, kept up to date with the
        # snapshots found to give the same plan; None: plan on the next event.
        self._baseline: ClusterSnapshot | None = None
        self.plans = 0  # plans made so far (tests and profiles read it)
        # slot -> monotonic time of its release; a slot's entry is touched only by the
        # changes of that slot, which cluo_coord.apply runs one at a time
        self._released_at: dict[int, float] = {}
        # (group, slot) -> the Lease as this plan's AcquireSlot wrote it, for the grant that
        # follows it (GrantRebootOk.after_acquire); touched only by that slot's changes
        self._taken: dict[tuple[str, int], SlotLease] = {}
        self._malformed: dict[str, frozenset[str]] = {}  # node -> the problems reported
        self._malformed_seen = False  # every node's values were looked at since acting

    # -- health --------------------------------------------------------------------

    def wake(self) -> None:
        """Plan again as soon as possible (a watch saw a change)."""
        self._wake.set()

    def healthy(self, max_silence: float = 60.0) -> bool:
        return self._monotonic() - self._last_tick < max_silence

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        failures = 0
        plans_in_a_row = 0
        conflicts = 0
        acting = False
        while not stop.is_set():
            self._last_tick = self._monotonic()
            leader = self._leadership.is_leader
            self._metrics.is_leader.set(1 if leader else 0)
            if not self._cache.synced or not leader:
                acting = False  # the first plan as leader plans from what is there then
                self._wake.clear()  # else a standby's events would keep _wait from sleeping
                self._wait(stop, self._tick)
                continue
            if not acting:  # just synced or just elected: plan from what is there now
                acting = self._plan_due = True
                self._baseline = None
                self._malformed_seen = False  # and look at every node's values
            forced = self._plan_due or self._deadline_passed()
            if not forced and not self._wake.is_set():
                self._wait(stop, self._sleep_for())
                continue
            self._wake.clear()
            snapshot = self._cache.snapshot()
            self._report_malformed(snapshot)
            if not forced and self._same_plan(snapshot):
                self._baseline = snapshot
                continue
            self._plan_due, self._deadline, self._baseline = True, None, None  # until done
            try:
                done = self.reconcile_once(snapshot)
            except KubeError as err:
                self._metrics.reconcile_errors.labels(kind=err.kind).inc()
                if err.kind == "conflict":
                    # Re-read before planning again, so a stale cache cannot loop; a
                    # conflict after conflict (another writer keeps winning) backs off.
                    conflicts += 1
                    log.info("stale view, reading the cluster again", extra={
                        "ERROR": str(err), "CONFLICTS_IN_A_ROW": conflicts})
                    if conflicts > 3:
                        self._wait(stop, min(CONFLICT_PAUSE_STEP * conflicts, CONFLICT_PAUSE_MAX))
                    self._refresh(stop)
                    plans_in_a_row = 0
                    continue
                failures += 1
                self._back_off(stop, err, failures)
                continue
            except CluoError as err:
                self._metrics.reconcile_errors.labels(kind=err.kind).inc()
                failures += 1
                self._back_off(stop, err, failures)
                continue
            failures = 0
            conflicts = 0
            if done.writes:
                plans_in_a_row += 1
                if plans_in_a_row < MAX_PLANS_WITHOUT_PAUSE:
                    continue  # plan again at once: the next step may be possible now
                log.warning("plans keep changing the cluster, pausing briefly")
                plans_in_a_row = 0
                self._schedule(Deadline.after(timedelta(seconds=self._tick),
                                              monotonic_now=self._monotonic(),
                                              wall_now=self._clock()))
                continue
            plans_in_a_row = 0
            self._schedule(done.deadline)
            self._baseline = None if done.plan.changes else snapshot  # (leadership lost)

    def _back_off(self, stop: threading.Event, err: CluoError, failures: int) -> None:
        # Never sooner than the API server asked (a 429's or a 5xx's Retry-After).
        delay = max(RECONCILE_BACKOFF.delay(failures), err.retry_after or 0.0)
        log.warning("reconcile failed, backing off", extra={
            "ERROR": str(err), "ERROR_KIND": err.kind, "RETRY_IN": round(delay, 2)})
        self._wait(stop, delay)

    def _deadline_passed(self) -> bool:
        return self._deadline is not None and self._deadline.passed(
            monotonic_now=self._monotonic(), wall_now=self._clock())

    def _same_plan(self, snapshot: ClusterSnapshot) -> bool:
        """Whether planning ``snapshot`` would give the last plan again, which changed
        nothing: the slots and the pause are as they were, and every node that changed
        since went from one state the planner ignores to another (its absence included)
        while no slot names it. No deadline passed either (the caller checks), so time
        changed nothing. The metrics stay right too: such a node needs no reboot."""
        baseline = self._baseline
        if baseline is None or snapshot.node_changes is None:
            return False
        if snapshot.slots != baseline.slots or snapshot.paused_by_admin != baseline.paused_by_admin:
            return False
        if self._blockers is not None and self._blockers.version != self._blockers_planned:
            return False
        if snapshot.roll != baseline.roll:
            return False
        holders = {slot.holder for slot in snapshot.slots if slot.holder}
        every_node = counts_every_node(self._policy)  # planner rule 15: percentages
        return all(
            name not in holders and ignored_while_unslotted(before)
            and ignored_while_unslotted(after)
            and not (every_node and (before is None or after is None
                                     or before.labels != after.labels))
            for name, before, after in snapshot.node_changes
        )

    def _report_malformed(self, snapshot: ClusterSnapshot) -> None:
        """A Warning Event on the node, a log line and a metric for each malformed value,
        once per change: a value reported stays quiet until it changes again or is fixed
        (this process remembers what it reported; a new leader reports it once more).
        Only the nodes that changed since the last snapshot are looked at."""
        views: list[NodeView]
        if snapshot.node_changes is None or not self._malformed_seen:  # look at all
            self._malformed_seen = True
            views = list(snapshot.nodes)
            present = {view.name for view in views}
            for name in [name for name in self._malformed if name not in present]:
                del self._malformed[name]
        else:
            views = []
            for name, _, after in snapshot.node_changes:
                if after is None:
                    self._malformed.pop(name, None)
                else:
                    views.append(after)
        for view in views:
            found = frozenset(malformed_values(view, self._policy.keys))
            for problem in sorted(found - self._malformed.get(view.name, frozenset())):
                log.warning("malformed value", extra={"NODE": view.name, "PROBLEM": problem})
                self._nodes.emit_event(view.name, Reason.MALFORMED_VALUE.value, problem,
                                       type="Warning", component=COMPONENT)
                self._metrics.events.labels(type="Warning",
                                            reason=Reason.MALFORMED_VALUE.value).inc()
            if found:
                self._malformed[view.name] = found
            else:
                self._malformed.pop(view.name, None)
        self._metrics.nodes_with_malformed_values.set(len(self._malformed))

    def _schedule(self, deadline: Deadline | None) -> None:
        """No plan until an event, or until ``deadline`` when given."""
        self._plan_due = False
        self._deadline = deadline

    def _sleep_for(self) -> float:
        if self._deadline is None:
            return self._tick
        return min(self._tick, self._deadline.seconds_left(self._monotonic()))

    def _wait(self, stop: threading.Event, timeout: float) -> None:
        """Up to ``timeout`` seconds, less if woken or stopped."""
        deadline = self._monotonic() + timeout
        while not stop.is_set() and not self._wake.is_set():
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, STOP_CHECK))

    def _refresh(self, stop: threading.Event) -> None:
        try:
            self._cache.refresh()
        except KubeError as err:
            self._metrics.reconcile_errors.labels(kind=err.kind).inc()
            log.warning("re-listing the cluster failed", extra={
                "ERROR": str(err), "ERROR_KIND": err.kind})
            self._wait(stop, RELIST_RETRY)

    def reconcile_once(self, snapshot: ClusterSnapshot | None = None) -> Reconciled:
        """Plan from ``snapshot`` (else the cache's) and apply; returns the plan, the
        writes made and when to plan again without an event."""
        if snapshot is None:
            snapshot = self._cache.snapshot()
        policy = self._policy
        if snapshot.paused_by_admin and not policy.paused:
            policy = replace(policy, paused=True)
        if snapshot.roll.failed:
            policy = replace(policy, failed_reboots=snapshot.roll.failed_nodes)
        now, monotonic_now = self._clock(), self._monotonic()
        health = self._assess_health(snapshot)
        current = plan(snapshot.nodes, snapshot.slots, now, policy, health=health)
        if self._gates is not None and not policy.before_reboot_annotations:
            self._gates.prefetch(current.queue)  # the next grants' records, read ahead
        self.plans += 1
        self._report_health(current, health)
        self._notifier.planned(snapshot.nodes, snapshot.slots, current, now)
        released = {s.index: s.released_at for s in snapshot.slots
                    if s.released_at and not s.group}
        try:
            applied = self._runner.run(schedule(current.changes),
                                       lambda change: self._apply(change, released),
                                       lambda: self._leadership.is_leader)
        finally:  # the plan's gauges, off the path to its first write
            self._observe(current, snapshot, policy)
        if applied.cut_short:
            log.info("lost leadership, stopping the plan")
        writes = applied.writes
        if self._status is not None:
            self._status.offer(current, snapshot, now)
        recheck_after = current.recheck_after
        if health.closed_gates:  # re-check them soon (WorkloadGates decides how soon)
            recheck = timedelta(seconds=GATE_RECHECK)
            recheck_after = recheck if recheck_after is None else min(recheck_after, recheck)
        if snapshot.expires_in is not None:
            expires = timedelta(seconds=snapshot.expires_in)
            recheck_after = expires if recheck_after is None else min(recheck_after, expires)
        deadline = None if recheck_after is None else Deadline.after(
            recheck_after, monotonic_now=monotonic_now, wall_now=now)
        return Reconciled(current, writes, deadline)

    def _observe(self, current: Plan, snapshot: ClusterSnapshot, policy: Policy) -> None:
        """The gauges of a plan (taken once its writes are done or stopped)."""
        self._metrics.observe_cluster(
            NodeIndex.of(snapshot.nodes).reboot_needed,  # the cache's index: no pass
            len(current.in_flight),
            snapshot.slots,
        )
        self._metrics.observe_drain_backoff(len(current.drain_backoff),
                                            len(current.out_of_roll))
        self._metrics.observe_groups(current.groups, len(current.unavailable))
        paused_by = ((snapshot.roll.paused_by or "admin") if snapshot.roll.paused
                     else "admin" if policy.paused else "")
        self._metrics.observe_roll(paused_by, len(snapshot.roll.failed))

    # -- applying one change -------------------------------------------------------

    def _apply(self, change: Change, released: dict[int, datetime]) -> bool:
        """Apply one change; returns whether it wrote to the API server."""
        keys = self._policy.keys
        if isinstance(change, EmitEvent):
            if change.slot is None:
                self._nodes.emit_event(change.node, change.reason.value, change.message,
                                       type=change.type.value, component=COMPONENT)
            else:
                self._slots.emit_event(change.slot, change.reason.value, change.message,
                                       type=change.type.value, component=COMPONENT)
            self._metrics.events.labels(type=change.type.value,
                                        reason=change.reason.value).inc()
            log.info("event posted", extra={"NODE": change.node, "REASON": change.reason.value})
            self._notifier.posted(change, self._clock())
            return False
        if isinstance(change, GrantRebootOk):
            recorded = None
            if change.after_acquire:  # rule 3: the acquisitions' CAS, just before
                recorded = self._taken_for(change.node, "", change.slot)
                # Each group slot taken in this plan too: its CAS was the check.
                for group, index, version in change.group_slots:
                    if not version:
                        self._taken_for(change.node, group, index)
                change = replace(change, group_slots=tuple(
                    slot for slot in change.group_slots if slot[2]))
            elif self._gates is not None:  # the health gate's record: a CAS on the slot
                recorded = self._gates.record_grant(
                    change.node, change.slot, change.expected_lease_resource_version)
                self._cache.put_slot(recorded)
            if recorded is not None:
                change = replace(change, expected_lease_resource_version=str(
                    recorded.resource_version))
            self._check_slot_unchanged(change, global_slot_written=recorded is not None)
            obj = self._writer.patch_node(change.node, change.patch(keys),
                                          change.expected_resource_version)
            self._cache.put_node(obj)
            self._metrics.grants.inc()
            started = self._released_at.pop(change.slot, None)
            if started is not None:
                self._metrics.handoff_seconds.observe(self._monotonic() - started)
            log.info("reboot granted", extra={"NODE": change.node, "SLOT": change.slot})
            return True
        if isinstance(change, ResetRebootOk) and self._changes_nothing(change):
            # Rule 4's reset of a holder with nothing left to reset: all it needs of the
            # write is the check that the node is still as planned, and a read gives it.
            self._writer.check_node(change.node, change.expected_resource_version)
            log.info("node checked", extra={
                "NODE": change.node, "CHANGE": type(change).__name__})
            return False
        if isinstance(change, LabelBeforeReboot | LabelAfterReboot | ResetRebootOk):
            uncordon = isinstance(change, ResetRebootOk) and change.uncordon
            obj = self._writer.patch_node(change.node, change.patch(keys),
                                          change.expected_resource_version,
                                          unschedulable=False if uncordon else None)
            self._cache.put_node(obj)
            log.info("node updated", extra={
                "NODE": change.node, "CHANGE": type(change).__name__,
                **({"UNCORDONED": True} if uncordon else {})})
            return True
        if isinstance(change, AcquireSlot):
            folded = change.grant_follows
            if folded:
                self._taken.pop((change.group, change.slot), None)
            if change.handed_from and not change.group:  # the giver's release too:
                self._released_at[change.slot] = self._monotonic()  # the handoff starts
            # The grant follows at once: the health gate's record goes into this CAS.
            slot = self._slots.acquire(
                change, None if not folded or change.group or self._gates is None
                else self._gates.grant_record(change.node))
            self._cache.put_slot(slot)
            if folded:
                self._taken[change.group, change.slot] = slot
            if (not change.group and change.slot not in self._released_at
                    and change.slot in released):
                # Released by an earlier process (or before a restart): count from the
                # recorded release time.
                age = (self._clock() - released[change.slot]).total_seconds()
                self._released_at[change.slot] = self._monotonic() - max(age, 0.0)
            if change.handed_from:
                log.info("reboot slot handed over", extra={
                    "NODE": change.node, "SLOT": change.slot, "FROM": change.handed_from,
                    **({"GROUP": change.group} if change.group else {})})
            else:
                log.info("reboot slot taken", extra={"NODE": change.node, "SLOT": change.slot})
            return True
        if isinstance(change, ReleaseSlot):
            if change.holder_gone:
                self._check_node_gone(change)
            slot = self._slots.release(change)
            self._cache.put_slot(slot)
            if not change.group:  # the handoff metric times the global slots
                self._released_at[change.slot] = self._monotonic()
            if change.holder_gone:
                log.warning("reboot slot freed: its holder's Node is gone", extra={
                    "NODE": change.node, "SLOT": change.slot})
            else:
                log.info("reboot slot released", extra={
                    "NODE": change.node, "SLOT": change.slot})
            return True
        if isinstance(change, RecordFailedReboot | PauseRoll):
            return self._apply_brake(change)
        if isinstance(change, MarkStuck):
            slot = self._slots.mark_stuck(change)
            self._cache.put_slot(slot)
            log.warning("reboot slot holder stuck", extra={
                "NODE": change.node, "SLOT": change.slot})
            return True
        raise TypeError(f"unknown change {change!r}")  # pragma: no cover

    def _changes_nothing(self, change: ResetRebootOk) -> bool:
        """Whether the reset would change nothing on the Node the planner saw: the
        cache's Node at the change's resourceVersion (else unknown: False) already has
        every label and annotation of the patch, and none of those it removes."""
        obj = self._cache.node(change.node)
        metadata = (obj or {}).get("metadata") or {}
        if change.uncordon or metadata.get("resourceVersion") != change.expected_resource_version:
            return False
        patch = change.patch(self._policy.keys)
        return all(
            (metadata.get(part) or {}).get(key) == value
            for part, values in (("labels", patch.labels), ("annotations", patch.annotations))
            for key, value in values.items())

    def _apply_brake(self, change: RecordFailedReboot | PauseRoll) -> bool:
        """Planner rule 14 on the leader Lease."""
        if self._roll is None:
            raise TypeError("the planner used the brake but the driver has no RollStore")
        if isinstance(change, RecordFailedReboot):
            state = self._roll.record_failed_reboot(change.failure)
            self._metrics.failed_reboots.set(len(state.failed))
            log.warning("reboot proof failed", extra={
                "NODE": change.failure.node, "WHY": change.failure.why,
                "FAILED_REBOOTS": len(state.failed)})
            return True
        state = self._roll.pause(change.reason, change.at)
        self._metrics.observe_roll(state.paused_by or "admin", len(state.failed))
        log.warning("roll paused", extra={"BY": state.paused_by, "REASON": state.reason})
        return True

    # -- the health gate and the blockers ---------------------------------------------

    def _assess_health(self, snapshot: ClusterSnapshot) -> Health:
        """What fires and which finished holders' gates are closed, for this plan."""
        if self._gates is None and self._blockers is None:
            return ALL_CLEAR
        firing: tuple[str, ...] = ()
        if self._blockers is not None:
            self._blockers_planned = self._blockers.version
            firing = self._blockers.firing()
        closed = ({} if self._gates is None
                  else self._gates.closed(snapshot.nodes, snapshot.slots))
        return Health(blockers=firing, closed_gates=closed)

    def _report_health(self, current: Plan, health: Health) -> None:
        """A log line when a hold starts and ends, an Event when it starts (about slot
        Lease 0: the roll's), the same for each holder's gate (about its Node), and the
        gauges."""
        started, ended = hold_changes(self._holds, current.holds)
        for hold in started:
            log.warning("new reboot slots held", extra={
                "HOLD": hold, "QUEUED": len(current.queue)})
            self._slots.emit_event(
                0, HOLD_EVENT_REASON, f"Nodes waiting for a reboot slot get none: {hold}",
                type="Normal", component=COMPONENT)
            self._metrics.events.labels(type="Normal", reason=HOLD_EVENT_REASON).inc()
        for hold in ended:
            log.info("reboot slots no longer held", extra={"HOLD": hold})
        self._holds = current.holds
        closed = frozenset(health.closed_gates)
        for node in sorted(closed - self._closed_gates):
            why = health.closed_gates[node]
            log.info("health gate closed", extra={"NODE": node, "WHY": why})
            self._nodes.emit_event(
                node, GATE_EVENT_REASON, f"The node is back; its reboot slot is released "
                f"once its workloads recovered: {why}", type="Normal", component=COMPONENT)
            self._metrics.events.labels(type="Normal", reason=GATE_EVENT_REASON).inc()
        for node in sorted(self._closed_gates - closed):
            log.info("health gate open", extra={"NODE": node})
        self._closed_gates = closed
        self._metrics.observe_health([hold_kind(hold) for hold in current.holds],
                                     len(health.blockers), len(closed))

    def _check_node_gone(self, change: ReleaseSlot) -> None:
        """Rule 11: a slot is freed for a gone holder only if the API server has no such
        Node (one outside --node-selector is not gone, the cache just does not show it)."""
        if self._writer.node_exists(change.node):
            raise KubeError(
                f"freeing reboot slot {change.slot} of node {change.node!r}",
                "the node exists but is not in the coordinator's view (outside "
                "--node-selector?): the slot is kept", kind="blocked")

    def _taken_for(self, node: str, group: str, index: int) -> SlotLease:
        """The slot Lease an AcquireSlot of this plan took for ``node``, as it wrote it
        (GrantRebootOk.after_acquire), or a conflict."""
        recorded = self._taken.pop((group, index), None)
        if recorded is None or recorded.holder != node:
            raise KubeError(f"granting reboot-ok to node {node!r}",
                            f"reboot slot {lease_name(index, group)!r} was not taken for it "
                            "in this plan: not granted", kind="conflict", status=409)
        return recorded

    def _check_slot_unchanged(self, change: GrantRebootOk, *,
                              global_slot_written: bool = False) -> None:
        """Rule 3: reboot-ok=true only while the slot Lease is as the planner saw it;
        and, rule 15, each of the holder's group slot Leases too. With
        ``global_slot_written``, the health gate's record has just been written to the
        global slot's Lease by compare-and-swap at the planned version: that write is
        rule 3's check of it (an update with that resourceVersion right before the node
        write), so it is not read again; so is the acquisition's CAS when the grant
        follows it in one plan (``after_acquire``)."""
        expected = [] if global_slot_written else [
            ("", change.slot, change.expected_lease_resource_version)]
        expected += change.group_slots
        for group, index, resource_version in expected:
            name = lease_name(index, group)
            action = f"granting reboot-ok to node {change.node!r} under slot {name!r}"
            obj = self._writer.read_lease(name)
            slot = slot_from_object(obj) if obj is not None else None
            if (
                slot is None
                or slot.resource_version != resource_version
                or slot.holder != change.node
            ):
                raise KubeError(action, "the slot Lease changed since the plan: not granted",
                                kind="conflict", status=409)


if TYPE_CHECKING:  # the real adapters satisfy the protocols fakes are written against
    _CLUSTER_VIEW: type[ClusterView] = ClusterCache
    _NODE_WRITER: type[NodeWriter] = ClusterWriter
    _SLOT_STORE: type[SlotStore] = KubeSlots
    _ROLL_STORE: type[RollStore] = KubeRollState
    _EVENT_SINK: type[EventSink] = KubeNodes
    _WAITER: type[Waiter] = threading.Event
    _BLOCKERS: type[Blockers] = BlockerWatch
    _GATES: type[HealthGates] = WorkloadGates
