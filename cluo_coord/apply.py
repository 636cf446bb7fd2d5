"""How the driver applies a plan's changes: in chains, the chains side by side.

``schedule(changes)`` is pure: it gives each change of a plan the earlier changes it must
wait for (``Step.after``). Two changes are ordered, in the planner's order, when they
touch the same thing:

- the same node: its writes, the slot Leases it takes, releases or is marked stuck on,
  the Events about it, and the brake's record of its failed reboot. So a node's changes
  keep the planner's order: its ``ReleaseSlot`` after the ``ResetRebootOk`` before it
  (planner rule 4), its group slot's ``AcquireSlot`` before its global one (rule 15),
  ``RecordFailedReboot`` before the ``MarkStuck``, ``LabelAfterReboot`` or (without
  after-reboot hooks) ``ResetRebootOk`` that goes with it (rule 14);
- the same slot Lease (a grant checks its Leases, rule 3), or the leader Lease (the
  brake's records, one after another);
- a hand-over (an ``AcquireSlot`` with ``handed_from``, of a global or a group slot)
  touches the node it takes the slot from as well: it is that node's release, so it
  waits for its ``ResetRebootOk`` (rule 4), and the taker's grant waits for it through
  the slot and the taker;
- an ``EmitEvent`` and the change it reports, the one just before it in the plan (an
  Event is posted only once its change was applied);
- ``PauseRoll``: it waits for every change before it, and every change after it waits
  for it.

Changes that share nothing (different nodes) may run at the same time. The runners apply
the steps: ``InOrder`` one after another in the plan's order (which the schedule always
allows; the driver's tests on fake time use it), ``Pooled`` on a small fixed pool of
threads. With either, a change starts only once every change it waits for was applied,
and only while ``go_on()`` (leadership) holds; the first error stops the plan: no change
starts after it, the ones already running finish, and the error is raised to the loop
(which re-lists on a conflict and backs off on anything else, as for one change).

The Events go after the writes: an ``EmitEvent`` whose change was applied is held, and
the runner posts the held Events in the plan's order once the plan's writes are done,
also when a write failed (the Event reports a change that was applied; the error is
raised after them), while ``go_on()`` holds. So no Event is built or posted between two
writes of a chain: a hand-over's Event about the giver (its ``RebootFinished``, which
also drives the roll's ``done`` webhook) goes out after the taker's grant instead of
beside it, and is not lost when the grant fails. A write never waits for an Event: the
next change of the Event's node follows the change the Event reports.

``WORKERS``: the pool's size. Every change is one or two API round trips of a few ms on
the API server; a node's chain in one plan is one to four of them. Eight at a time lets
fifty nodes in flight be served in a few rounds instead of one after another. It stays
far inside API priority and fairness: the coordinator's ServiceAccount falls in the
default ``service-accounts`` FlowSchema, priority level ``workload-low``, which gets about
245 of the 600 seats of an API server with the default --max-requests-inflight 400 and
--max-mutating-requests-inflight 200, and queues beyond them: eight requests at a time
from one user are never queued, let alone rejected (429), by the coordinator's own load.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from cluo_coord.planner import (
    AcquireSlot,
    Change,
    EmitEvent,
    GrantRebootOk,
    LabelAfterReboot,
    LabelBeforeReboot,
    MarkStuck,
    PauseRoll,
    RecordFailedReboot,
    ReleaseSlot,
    ResetRebootOk,
)

log = logging.getLogger(__name__)

WORKERS = 8  # changes applied at a time by the coordinator (see the module docstring)

# What a change touches: ("node", name), ("slot", group, index), ("roll",): the leader Lease.
Key = tuple[str, ...]
ROLL: Key = ("roll",)


@dataclass(frozen=True)
class Step:
    """The change at ``index`` of the plan, and the indices of the earlier changes that
    must have been applied before it starts."""

    index: int
    change: Change
    after: tuple[int, ...] = ()


def _node(name: str) -> Key:
    return ("node", name)


def _slot(group: str, index: int) -> Key:
    return ("slot", group, str(index))


def touches(change: Change) -> frozenset[Key]:
    """The node and Leases a change writes or checks (``EmitEvent``: its node only)."""
    if isinstance(change, GrantRebootOk):
        return frozenset({_node(change.node), _slot("", change.slot),
                          *(_slot(group, index) for group, index, _ in change.group_slots)})
    if isinstance(change, LabelBeforeReboot | LabelAfterReboot | ResetRebootOk | EmitEvent):
        return frozenset({_node(change.node)})
    if isinstance(change, AcquireSlot) and change.handed_from:  # also the giver's release
        return frozenset({_node(change.node), _node(change.handed_from),
                          _slot(change.group, change.slot)})
    if isinstance(change, AcquireSlot | ReleaseSlot | MarkStuck):
        return frozenset({_node(change.node), _slot(change.group, change.slot)})
    if isinstance(change, RecordFailedReboot):
        return frozenset({_node(change.failure.node), ROLL})
    if isinstance(change, PauseRoll):
        return frozenset({ROLL})
    raise TypeError(f"unknown change {change!r}")  # pragma: no cover


def schedule(changes: Sequence[Change]) -> tuple[Step, ...]:
    """Each change with the earlier ones it waits for (the module docstring's rules);
    ``after`` names only direct predecessors, the rest follows through them."""
    steps: list[Step] = []
    last: dict[Key, int] = {}  # key -> the latest change that touched it
    barrier: int | None = None  # the latest PauseRoll
    for index, change in enumerate(changes):
        after: set[int]
        if isinstance(change, PauseRoll):
            after = set(last.values())
            if barrier is not None:
                after.add(barrier)
            barrier = index
            last.clear()
        else:
            keys = touches(change)
            after = {last[key] for key in keys if key in last}
            if isinstance(change, EmitEvent) and index:
                after.add(index - 1)  # the change it reports
            if not after and barrier is not None:
                after.add(barrier)
            for key in keys:
                last[key] = index
        steps.append(Step(index, change, tuple(sorted(after))))
    return tuple(steps)


def one_chain(steps: Sequence[Step]) -> bool:
    """Whether no two writes can run at the same time: each write waits, directly or
    through the Events between them, for the write before it. (The Events run after the
    writes whatever the runner.)"""
    latest: dict[int, int] = {}  # step -> the latest write it follows (a write: itself)
    previous = -1  # the latest write so far
    for step in steps:
        follows = max((latest[before] for before in step.after), default=-1)
        if isinstance(step.change, EmitEvent):
            latest[step.index] = follows
            continue
        if follows != previous:
            return False
        latest[step.index] = previous = step.index
    return True


@dataclass(frozen=True)
class Applied:
    """What a runner did: the writes made (``apply`` returned True), and whether it
    stopped before the end of the plan because ``go_on()`` said so."""

    writes: int
    cut_short: bool = False


Apply = Callable[[Change], bool]  # applies one change; whether it wrote; raises on error


class Runner(Protocol):
    def run(self, steps: Sequence[Step], apply: Apply, go_on: Callable[[], bool]
            ) -> Applied: ...

    def close(self) -> None: ...


def _post(events: Sequence[Change], apply: Apply, go_on: Callable[[], bool]) -> None:
    """The held Events (each one's change applied), in the plan's order, in the caller's
    thread, while ``go_on()`` holds."""
    for event in events:
        if not go_on():
            return
        apply(event)


class InOrder:
    """One change after another, in the plan's order, in the caller's thread; the Events
    after the writes (the module docstring)."""

    def run(self, steps: Sequence[Step], apply: Apply, go_on: Callable[[], bool]
            ) -> Applied:
        writes = 0
        events: list[Change] = []  # of the changes applied, posted after the writes
        try:
            for step in sorted(steps, key=lambda step: step.index):
                if isinstance(step.change, EmitEvent):
                    events.append(step.change)  # everything before it was applied
                    continue
                if not go_on():
                    return Applied(writes, cut_short=True)
                writes += apply(step.change)
        finally:
            _post(events, apply, go_on)
        return Applied(writes)

    def close(self) -> None:
        pass


class Pooled:
    """The steps on a pool of ``workers`` threads, each as soon as the ones it waits for
    were applied; the caller's thread only dispatches and waits. A worker that applied a
    change goes on with the next change of its chain that this made ready (the node's
    next write) itself, rather than through the pool's queue and the caller's thread: a
    hop there costs two thread wake-ups between the two writes of a chain (0.15 to 0.23 ms
    at the median, 0.24 to 0.35 ms at p90, on the 2-core test bed; 0.02 ms without), and
    queues the write behind other chains' changes. The other changes it made ready go to
    the caller's thread."""

    def __init__(self, workers: int = WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="apply")

    def run(self, steps: Sequence[Step], apply: Apply, go_on: Callable[[], bool]
            ) -> Applied:
        if one_chain(steps):  # nothing to run beside: no thread hop (a handoff's plans)
            return InOrder().run(steps, apply, go_on)
        return _PooledRun(steps, apply, go_on).run(self._pool)

    def close(self) -> None:
        """Wait for the threads to end (no plan runs any more)."""
        self._pool.shutdown(wait=True)


class _PooledRun:
    """One plan on the pool: what waits for what, what is ready, what runs; every field
    is read and written under ``_lock``."""

    def __init__(self, steps: Sequence[Step], apply: Apply, go_on: Callable[[], bool]
                 ) -> None:
        self._apply = apply
        self._go_on = go_on
        self._changes = {step.index: step.change for step in steps}
        self._waiting = {step.index: len(step.after) for step in steps}
        self._followers: dict[int, list[int]] = {step.index: [] for step in steps}
        for step in steps:
            for before in step.after:
                self._followers[before].append(step.index)
        self._lock = threading.Condition()
        self._ready: deque[int] = deque()
        self._events: list[int] = []  # Events whose change was applied: posted at the end
        self._running = 0  # changes handed to the pool and not finished
        self._stop = False
        self._cut_short = False
        self._error: BaseException | None = None
        self._writes = 0
        with self._lock:
            self._ready.extend(self._free(step.index for step in steps if not step.after))

    def run(self, pool: ThreadPoolExecutor) -> Applied:
        with self._lock:
            while True:
                while self._ready and not self._stop:
                    self._running += 1
                    pool.submit(self._chain, self._ready.popleft())
                if not self._running:
                    break
                self._lock.wait()
        try:
            _post([self._changes[index] for index in sorted(self._events)], self._apply,
                  self._go_on)
        finally:
            if self._error is not None:
                raise self._error
        return Applied(self._writes, cut_short=self._cut_short)

    def _free(self, indices: Iterable[int]) -> list[int]:
        """Of the steps whose predecessors were all applied, the writes; each Event is
        held, and what waits for it only for the change it reports, so is freed too."""
        writes: list[int] = []
        for index in indices:
            if isinstance(self._changes[index], EmitEvent):
                self._events.append(index)
                writes += self._free(self._applied(index))
            else:
                writes.append(index)
        return writes

    def _applied(self, index: int) -> list[int]:
        """The followers of ``index`` that wait for nothing else any more."""
        freed = []
        for follower in self._followers[index]:
            self._waiting[follower] -= 1
            if not self._waiting[follower]:
                freed.append(follower)
        return freed

    def _chain(self, index: int | None) -> None:
        """On a pool thread: apply the change, then the first it made ready, and so on,
        while the plan goes on; the others it made ready go to the caller's thread."""
        try:
            while index is not None:
                with self._lock:
                    if not self._stop and not self._go_on():
                        self._stop = self._cut_short = True
                    if self._stop:
                        return
                try:
                    wrote = self._apply(self._changes[index])
                except BaseException as err:  # raised by run() once the others finished
                    with self._lock:
                        self._stop = True  # before this thread takes another change
                        if self._error is None:
                            log.info("a change failed, stopping the plan", extra={
                                "ERROR": str(err), "RUNNING": self._running - 1})
                            self._error = err
                    return
                with self._lock:
                    self._writes += wrote
                    freed = self._free(self._applied(index))
                    index = freed.pop(0) if freed else None
                    if freed:  # for the caller's thread to hand to the pool
                        self._ready.extend(freed)
                        self._lock.notify()
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify()
