"""Node Events posted from a thread of their own, off the path from one node's release to
the next node's grant.

The driver posts an Event only after the change it reports was applied (planner's
``EmitEvent``); posting it is a POST the next grant need not wait for. ``EventPoster`` is
the driver's ``EventSink``: ``emit_event`` puts the Event on a queue and returns, one
thread posts the queued Events in order through the real sink (``KubeNodes``, which never
raises). So an Event is still posted only when its change was applied, and in the order
the changes were, only later. A full queue (the API server is not keeping up) makes
``emit_event`` wait for room, as posting inline would have: no Event is dropped. On
``stop`` the queued Events get ``SHUTDOWN_GRACE`` seconds to go out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from cluo.kube.nodes import EventType

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # Events waiting to be posted; more make emit_event wait
SHUTDOWN_GRACE = 5.0  # seconds the queued Events get to go out on stop


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
    """An ``EventSink`` that posts through ``sink`` from its own thread, in order."""

    def __init__(self, sink: EventSink, *, queue_size: int = QUEUE_SIZE) -> None:
        self._sink = sink
        self._queue: queue.Queue[_Queued | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="event-poster", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Post what is queued for up to ``grace`` seconds, then stop."""
        self._stopping.set()
        deadline = time.monotonic() + grace
        while True:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        left = self._queue.qsize()
        if self._thread.is_alive() or left:
            log.warning("events not posted before stopping", extra={"EVENTS": left})

    def emit_event(self, node_name: str, reason: str, message: str, *,
                   type: EventType = "Normal", component: str) -> None:
        if self._stopping.is_set():  # no thread to post it any more: post it here
            self._sink.emit_event(node_name, reason, message, type=type, component=component)
            return
        self._queue.put(_Queued(node_name, reason, message, type, component))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._sink.emit_event(item.node_name, item.reason, item.message,
                                      type=item.type, component=item.component)
            except Exception:  # the sink never raises; a bug must not end the thread
                log.exception("posting an event failed", extra={"NODE": item.node_name})
