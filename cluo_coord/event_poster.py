"""Node Events posted from threads of their own, off the path from one node's release to
the next node's grant.

The driver posts an Event only after the change it reports was applied (planner's
``EmitEvent``), and only once its plan's writes are done (cluo_coord.apply); posting it
is a POST no grant need wait for. ``EventPoster`` is
the driver's ``EventSink``: ``emit_event`` puts the Event on a queue and returns, and
``WORKERS`` threads post the queued Events through the real sink (``KubeNodes``, which
never raises). The Events of one node all go to the same thread, which posts them in
order: so an Event is still posted only when its change was applied, and one node's in
the order its changes were, only later. Several threads because one could not keep up
in a large roll: four Events a node cycle, one POST at a time, fell behind fifty nodes
in flight on a loaded API server, until the full queue held the grants up. A full queue
(the API server is not keeping up) makes ``emit_event`` wait for room, as posting inline
would have: no Event is dropped. On ``stop`` the queued Events get ``SHUTDOWN_GRACE``
seconds to go out.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

from cluo.kube.nodes import EventType

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # Events waiting to be posted, per thread; more make emit_event wait
SHUTDOWN_GRACE = 5.0  # seconds the queued Events get to go out on stop
# Threads posting Events: with the apply pool's eight writers, still far inside the API
# priority and fairness share of the coordinator's ServiceAccount (docs/coordinator.md).
WORKERS = 4


class EventSink(Protocol):
    """What posts an Event about a Node (``KubeNodes``); posting one never raises."""

    def emit_event(self, node_name: str, reason: str, message: str, *, type: EventType,
                   component: str) -> None: ...


@dataclass(frozen=True)
class _Queued:
    node_name: str
    reason: str
    message: str
    type: EventType
    component: str


class EventPoster:
    """An ``EventSink`` that posts through ``sink`` from ``workers`` threads, each node's
    Events in order."""

    def __init__(self, sink: EventSink, *, queue_size: int = QUEUE_SIZE,
                 workers: int = WORKERS) -> None:
        if workers < 1:
            raise ValueError("an EventPoster needs at least one thread")
        self._sink = sink
        self._queues: list[queue.Queue[_Queued | None]] = [
            queue.Queue(queue_size) for _ in range(workers)]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name="event-poster", daemon=True)
            for q in self._queues]
        self._stopping = threading.Event()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Post what is queued for up to ``grace`` seconds, then stop."""
        self._stopping.set()
        deadline = time.monotonic() + grace
        for pending in self._queues:
            with contextlib.suppress(queue.Full):  # a thread still busy: the deadline ends it
                pending.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(pending.qsize() for pending in self._queues)
        if left or any(thread.is_alive() for thread in self._threads):
            log.warning("events not posted before stopping", extra={"EVENTS": left})

    def emit_event(self, node_name: str, reason: str, message: str, *,
                   type: EventType = "Normal", component: str) -> None:
        if self._stopping.is_set():  # no thread to post it any more: post it here
            self._sink.emit_event(node_name, reason, message, type=type, component=component)
            return
        self._queue_of(node_name).put(_Queued(node_name, reason, message, type, component))

    def _queue_of(self, node_name: str) -> queue.Queue[_Queued | None]:
        """The one queue of ``node_name``'s Events (a stable hash, not Python's salted one)."""
        return self._queues[zlib.crc32(node_name.encode()) % len(self._queues)]

    def _run(self, pending: queue.Queue[_Queued | None]) -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            try:
                self._sink.emit_event(item.node_name, item.reason, item.message,
                                      type=item.type, component=item.component)
            except Exception:  # the sink never raises; a bug must not end the thread
                log.exception("posting an event failed", extra={"NODE": item.node_name})
