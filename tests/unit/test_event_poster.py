"""EventPoster: node Events posted from threads of their own, each node's in order, those
of different nodes side by side, none dropped, and the caller never waits for a POST."""

from __future__ import annotations

import threading

from cluo.kube.nodes import EventType
from cluo_coord.event_poster import EventPoster
from testbed.waiting import assert_stays, wait_for

TIMEOUT = 10.0


class _HeldSink:
    """Records Events; each post waits until ``release`` is set (a slow API server).
    ``most_at_once``: the most posts that were in progress at the same time."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.posted: list[tuple[str, str, str, str, str]] = []
        self._lock = threading.Lock()
        self._posting = 0
        self.most_at_once = 0

    def emit_event(self, node_name: str, reason: str, message: str, *, type: EventType,
                   component: str) -> None:
        with self._lock:
            self._posting += 1
            self.most_at_once = max(self.most_at_once, self._posting)
        self.release.wait(TIMEOUT)
        with self._lock:
            self._posting -= 1
            self.posted.append((node_name, reason, message, type, component))


def test_emit_returns_before_the_event_is_posted_and_posts_it_later() -> None:
    sink = _HeldSink()
    poster = EventPoster(sink)
    poster.start()
    try:
        poster.emit_event("n1", "RebootGranted", "granted", type="Normal", component="cluo-coord")
        assert sink.posted == [], "emit_event waited for the POST"
        sink.release.set()
        wait_for(lambda: sink.posted, TIMEOUT, "the queued Event to be posted")
        assert sink.posted == [("n1", "RebootGranted", "granted", "Normal", "cluo-coord")]
    finally:
        sink.release.set()
        poster.stop()


def test_events_are_posted_in_the_order_they_were_emitted() -> None:
    sink = _HeldSink()
    sink.release.set()
    poster = EventPoster(sink)
    poster.start()
    reasons = [f"R{i}" for i in range(50)]
    for reason in reasons:
        poster.emit_event("n1", reason, "m", type="Normal", component="cluo-coord")
    poster.stop()
    assert [posted[1] for posted in sink.posted] == reasons


def test_each_nodes_events_keep_their_order_among_other_nodes_events() -> None:
    sink = _HeldSink()
    sink.release.set()
    poster = EventPoster(sink)
    poster.start()
    nodes = [f"n{i}" for i in range(20)]
    for step in range(10):
        for node in nodes:
            poster.emit_event(node, f"R{step}", "m", type="Normal", component="cluo-coord")
    poster.stop()
    assert len(sink.posted) == len(nodes) * 10
    for node in nodes:
        assert [p[1] for p in sink.posted if p[0] == node] == [f"R{s}" for s in range(10)]


def test_events_of_different_nodes_are_posted_side_by_side() -> None:
    sink = _HeldSink()
    poster = EventPoster(sink, workers=4)
    poster.start()
    try:
        for i in range(20):  # twenty names: more than one of the four threads gets some
            poster.emit_event(f"n{i}", "RebootApproved", "m", type="Normal",
                              component="cluo-coord")
        wait_for(lambda: sink.most_at_once >= 2, TIMEOUT,
                 "a second Event posted while the first is still in progress")
    finally:
        sink.release.set()
        poster.stop()
    assert len(sink.posted) == 20


def test_a_full_queue_makes_emit_wait_instead_of_dropping_an_event() -> None:
    sink = _HeldSink()
    poster = EventPoster(sink, queue_size=1)
    poster.start()
    emitted = threading.Event()

    def emit_three() -> None:
        for reason in ("A", "B", "C"):  # A is being posted, B queued, C waits for room
            poster.emit_event("n1", reason, "m", type="Normal", component="cluo-coord")
        emitted.set()

    thread = threading.Thread(target=emit_three, daemon=True)
    thread.start()
    try:
        assert_stays(lambda: not emitted.is_set(), 0.3,
                     "emit_event waiting for room while the queue is full")
        sink.release.set()
        wait_for(emitted.is_set, TIMEOUT, "room in the queue for the third Event")
    finally:
        sink.release.set()
        poster.stop()
    thread.join(TIMEOUT)
    assert [posted[1] for posted in sink.posted] == ["A", "B", "C"]


def test_stop_posts_what_is_queued_and_later_events_inline() -> None:
    sink = _HeldSink()
    sink.release.set()
    poster = EventPoster(sink)
    poster.start()
    poster.emit_event("n1", "Queued", "m", type="Normal", component="cluo-coord")
    poster.stop()
    poster.emit_event("n1", "AfterStop", "m", type="Warning", component="cluo-coord")
    assert [posted[1] for posted in sink.posted] == ["Queued", "AfterStop"]
