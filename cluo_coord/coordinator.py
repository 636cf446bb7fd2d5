"""The reconcile driver: read the cached cluster, ``plan()``, apply the changes in order.

The loop runs on every watch event, when ``Plan.recheck_after`` elapses, and at once
after it applied changes (so the next node gets its slot right after a release). It
honours the planner's safety rules (see cluo_coord.planner):

- every node write is a JSON merge patch carrying the resourceVersion the planner saw,
  every Lease write a KubeSlots compare-and-swap (rule 2);
- before ``reboot-ok=true`` the slot Lease is read again, uncached, and the grant is
  refused unless it is still at the resourceVersion the planner saw and names the node
  (rule 3);
- changes are applied in the planner's order and the first error stops the plan, so a
  ``ReleaseSlot`` never runs without the ``ResetRebootOk`` before it (rule 4), and an
  Event is posted only when the change it reports was applied.

A conflict means the view was stale: both collections are re-listed (uncached) before
planning again, so a stale cache cannot loop. Other errors back off exponentially.
Only the leader plans and writes; a standby keeps its caches warm.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from cluo_coord.cluster import ClusterCache, ClusterWriter
from cluo_coord.leases import KubeSlots, slot_from_object
from cluo_coord.metrics import CoordMetrics
from cluo_coord.planner import (
    AcquireSlot,
    Change,
    EmitEvent,
    GrantRebootOk,
    LabelAfterReboot,
    LabelBeforeReboot,
    MarkStuck,
    Plan,
    Policy,
    ReleaseSlot,
    ResetRebootOk,
    plan,
)
from cluo_host.errors import CluoError, KubeError
from cluo_host.kube_nodes import KubeNodes
from cluo_host.protocol import slot_lease_name

log = logging.getLogger(__name__)

COMPONENT = "cluo-coord"
# Test-only hook: the name of a change type (e.g. "AcquireSlot"); the process exits with
# CRASH_EXIT_CODE right after applying the first such change, as a crash would.
CRASH_AFTER_ENV = "CLUO_COORD_TEST_CRASH_AFTER"
CRASH_EXIT_CODE = 70
IDLE_TICK = 2.0  # the loop wakes at least this often (for /healthz)
BACKOFF_START = 0.2
BACKOFF_MAX = 30.0
MAX_PLANS_WITHOUT_PAUSE = 50


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...


class AlwaysLeader:
    """Leader election off: this process always acts."""

    @property
    def is_leader(self) -> bool:
        return True


class Coordinator:
    """Drives ``plan()`` from the cluster cache and applies its changes."""

    def __init__(
        self,
        cache: ClusterCache,
        *,
        writer: ClusterWriter,
        slots: KubeSlots,
        nodes: KubeNodes,
        policy: Policy,
        metrics: CoordMetrics,
        leadership: Leadership | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        crash_after: str = "",
    ) -> None:
        self._cache = cache
        self._writer = writer
        self._slots = slots
        self._nodes = nodes
        self._policy = policy
        self._metrics = metrics
        self._leadership = leadership or AlwaysLeader()
        self._clock = clock
        self._crash_after = crash_after or os.environ.get(CRASH_AFTER_ENV, "")
        self._wake = threading.Event()
        self._last_tick = time.monotonic()
        self._released_at: dict[int, float] = {}  # slot -> monotonic time of its release

    # -- health --------------------------------------------------------------------

    def wake(self) -> None:
        """Plan again as soon as possible (a watch saw a change)."""
        self._wake.set()

    def healthy(self, max_silence: float = 60.0) -> bool:
        return time.monotonic() - self._last_tick < max_silence

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        backoff = BACKOFF_START
        plans_in_a_row = 0
        conflicts = 0
        while not stop.is_set():
            self._last_tick = time.monotonic()
            self._metrics.is_leader.set(1 if self._leadership.is_leader else 0)
            if not self._cache.synced or not self._leadership.is_leader:
                self._wait(stop, IDLE_TICK)
                continue
            self._wake.clear()
            try:
                current, applied = self.reconcile_once()
            except KubeError as err:
                self._metrics.reconcile_errors.labels(kind=err.kind).inc()
                if err.kind == "conflict":
                    # Re-read before planning again, so a stale cache cannot loop; a
                    # conflict after conflict (another writer keeps winning) backs off.
                    conflicts += 1
                    log.info("stale view, reading the cluster again", extra={
                        "ERROR": str(err), "CONFLICTS_IN_A_ROW": conflicts})
                    if conflicts > 3:
                        self._wait(stop, min(BACKOFF_START * conflicts, 2.0))
                    self._refresh(stop)
                    plans_in_a_row = 0
                    continue
                log.warning("reconcile failed, backing off", extra={
                    "ERROR": str(err), "ERROR_KIND": err.kind, "RETRY_IN": round(backoff, 2)})
                self._wait(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            except CluoError as err:
                self._metrics.reconcile_errors.labels(kind=err.kind).inc()
                log.warning("reconcile failed, backing off", extra={
                    "ERROR": str(err), "ERROR_KIND": err.kind, "RETRY_IN": round(backoff, 2)})
                self._wait(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            conflicts = 0
            if applied:
                plans_in_a_row += 1
                if plans_in_a_row < MAX_PLANS_WITHOUT_PAUSE:
                    continue  # plan again at once: the next step may be possible now
                log.warning("plans keep changing the cluster, pausing briefly")
            plans_in_a_row = 0
            timeout = IDLE_TICK
            if current.recheck_after is not None:
                timeout = min(timeout, current.recheck_after.total_seconds() + 0.01)
            self._wait(stop, timeout)

    def _wait(self, stop: threading.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, 0.5))

    def _refresh(self, stop: threading.Event) -> None:
        try:
            self._cache.refresh()
        except KubeError as err:
            self._metrics.reconcile_errors.labels(kind=err.kind).inc()
            log.warning("re-listing the cluster failed", extra={
                "ERROR": str(err), "ERROR_KIND": err.kind})
            self._wait(stop, BACKOFF_START * 5)

    def reconcile_once(self) -> tuple[Plan, int]:
        """Plan from the cache and apply; returns the plan and how many writes were made."""
        snapshot = self._cache.snapshot()
        policy = self._policy
        if snapshot.paused_by_admin and not policy.paused:
            policy = replace(policy, paused=True)
        current = plan(snapshot.nodes, snapshot.slots, self._clock(), policy)
        self._metrics.observe_cluster(
            sum(1 for view in snapshot.nodes if view.state.reboot_needed),
            len(current.in_flight),
            snapshot.slots,
        )
        released = {s.index: s.released_at for s in snapshot.slots if s.released_at}
        writes = 0
        for change in current.changes:
            if not self._leadership.is_leader:
                log.info("lost leadership, stopping the plan")
                break
            if self._apply(change, released):
                writes += 1
            self._maybe_crash(change)
        return current, writes

    # -- applying one change -------------------------------------------------------

    def _apply(self, change: Change, released: dict[int, datetime]) -> bool:
        """Apply one change; returns whether it wrote to the API server."""
        keys = self._policy.keys
        if isinstance(change, EmitEvent):
            self._nodes.emit_event(change.node, change.reason.value, change.message,
                                   type=change.type.value, component=COMPONENT)
            log.info("event posted", extra={"NODE": change.node, "REASON": change.reason.value})
            return False
        if isinstance(change, GrantRebootOk):
            self._check_slot_unchanged(change)
            obj = self._writer.patch_node(change.node, change.patch(keys),
                                          change.expected_resource_version)
            self._cache.put_node(obj)
            self._metrics.grants.inc()
            started = self._released_at.pop(change.slot, None)
            if started is not None:
                self._metrics.handoff_seconds.observe(time.monotonic() - started)
            log.info("reboot granted", extra={"NODE": change.node, "SLOT": change.slot})
            return True
        if isinstance(change, LabelBeforeReboot | LabelAfterReboot | ResetRebootOk):
            obj = self._writer.patch_node(change.node, change.patch(keys),
                                          change.expected_resource_version)
            self._cache.put_node(obj)
            log.info("node updated", extra={
                "NODE": change.node, "CHANGE": type(change).__name__})
            return True
        if isinstance(change, AcquireSlot):
            slot = self._slots.acquire(change)
            self._cache.put_slot(slot)
            if change.slot not in self._released_at and change.slot in released:
                # Released by an earlier process (or before a restart): count from the
                # recorded release time.
                age = (self._clock() - released[change.slot]).total_seconds()
                self._released_at[change.slot] = time.monotonic() - max(age, 0.0)
            log.info("reboot slot taken", extra={"NODE": change.node, "SLOT": change.slot})
            return True
        if isinstance(change, ReleaseSlot):
            slot = self._slots.release(change)
            self._cache.put_slot(slot)
            self._released_at[change.slot] = time.monotonic()
            log.info("reboot slot released", extra={"NODE": change.node, "SLOT": change.slot})
            return True
        if isinstance(change, MarkStuck):
            slot = self._slots.mark_stuck(change)
            self._cache.put_slot(slot)
            log.warning("reboot slot holder stuck", extra={
                "NODE": change.node, "SLOT": change.slot})
            return True
        raise TypeError(f"unknown change {change!r}")  # pragma: no cover

    def _check_slot_unchanged(self, change: GrantRebootOk) -> None:
        """Rule 3: reboot-ok=true only while the slot Lease is as the planner saw it."""
        name = slot_lease_name(change.slot)
        action = f"granting reboot-ok to node {change.node!r} under slot {name!r}"
        obj = self._writer.read_lease(name)
        slot = slot_from_object(obj) if obj is not None else None
        if (
            slot is None
            or slot.resource_version != change.expected_lease_resource_version
            or slot.holder != change.node
        ):
            raise KubeError(action, "the slot Lease changed since the plan: not granted",
                            kind="conflict", status=409)

    def _maybe_crash(self, change: Change) -> None:
        if self._crash_after and type(change).__name__ == self._crash_after:
            log.error("test crash hook: exiting", extra={"AFTER": self._crash_after})
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
