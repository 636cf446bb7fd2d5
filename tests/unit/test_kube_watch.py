"""The one watch mechanism (cluo.kube.watch), fed fake event streams.

``Watch`` reads one watch request's events: what the API server sends besides changes
(bookmarks, ERROR events, a refusal, a broken stream) and a ``close()`` from another
thread, even while the request is being made. ``WatchLoop`` keeps watching: on from
where a watch ended, from a fresh start after an expiry, after a backoff after a
failure. ``Reflector`` lists into a store and keeps it current. The real client and API
server are in tests/kube (test_kube_nodes.py, test_coordinator.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cluo.backoff import Backoff
from cluo.errors import KubeError, WatchExpired
from cluo.kube.client import ApiError, WatchSilent
from cluo.kube.objects import Obj
from cluo.kube.resources import WATCH_IDLE_TIMEOUT
from cluo.kube.watch import LIST_PAGE, ObjectStore, Reflector, Watch, WatchEvent, WatchLoop
from cluo_host.journal import fields_of
from testbed.waiting import assert_stays, wait_for

TIMEOUT = 10.0
WATCHING = "watching nodes"


def node(name: str, version: str) -> Obj:
    return {"metadata": {"name": name, "resourceVersion": version}}


def change(kind: str, name: str, version: str) -> dict[str, Any]:
    return {"type": kind, "object": node(name, version)}


def bookmark(version: str) -> dict[str, Any]:
    return {"type": "BOOKMARK", "object": {"kind": "Node", "metadata": {
        "resourceVersion": version}}}


def error_event(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "status": "Failure", "code": code,
                                        "reason": reason, "message": message}}


class FakeStream:
    """A watch's raw events as ``KubeClient.watch`` gives them: each item is yielded, or
    raised if it is an exception. With ``silent`` it then says nothing more until
    closed, like a real watch; closing it ends the iteration quietly."""

    def __init__(self, items: list[dict[str, Any] | BaseException], *, silent: bool = False):
        self._items = items
        self._silent = silent
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in self._items:
            if isinstance(item, BaseException):
                raise item  # an error reaches the reader even after a close (a reset socket)
            if self.closed:
                return
            yield item
        if self._silent and not self._closed.wait(TIMEOUT):
            raise AssertionError("a silent watch stream was never closed")

    def close(self) -> None:
        self._closed.set()


class FakeClient:
    """``KubeClient.watch``: hands out the given streams, one per watch, and records the
    requests. ``while_opening`` runs inside ``watch()``, before the stream is returned."""

    def __init__(self, *streams: FakeStream,
                 while_opening: Callable[[], None] = lambda: None) -> None:
        self._streams = list(streams)
        self.while_opening = while_opening
        self.requests: list[tuple[str, dict[str, Any], tuple[float, float]]] = []

    def watch(self, path: str, *, query: Any = None,
              timeout: tuple[float, float] = (0.0, 0.0)) -> FakeStream:
        self.requests.append((path, dict(query or {}), timeout))
        self.while_opening()
        return self._streams.pop(0)


def read(watch: Watch) -> list[WatchEvent]:
    return list(watch)


# -- Watch: one watch request ------------------------------------------------------------


def test_the_request_asks_for_bookmarks_from_the_version_through_the_selectors() -> None:
    client = FakeClient(FakeStream([]))
    read(Watch(client, "/api/v1/nodes", action=WATCHING, resource_version="41",
               selectors={"fieldSelector": "metadata.name=n1", "labelSelector": None},
               timeout_seconds=60))
    [(path, query, timeout)] = client.requests
    assert path == "/api/v1/nodes"
    assert query == {"fieldSelector": "metadata.name=n1", "labelSelector": None,
                     "watch": True, "resourceVersion": "41", "allowWatchBookmarks": True,
                     "timeoutSeconds": 60}
    # The stream may stay silent no longer than a healthy one does: the server sends a
    # bookmark about every minute, so a dead connection is noticed within 90 s (not at
    # the end of timeoutSeconds).
    assert timeout[1] == WATCH_IDLE_TIMEOUT
    assert 60 < WATCH_IDLE_TIMEOUT <= 90


def test_the_silence_allowed_can_be_set() -> None:
    client = FakeClient(FakeStream([]))
    read(Watch(client, "/api/v1/nodes", action=WATCHING, idle_timeout=2.5))
    [(_, _, timeout)] = client.requests
    assert timeout[1] == 2.5


def test_changes_are_yielded_and_the_version_follows_them() -> None:
    watch = Watch(FakeClient(FakeStream([change("ADDED", "n1", "5"),
                                         change("DELETED", "n2", "6")])), "/p",
                  action=WATCHING)
    assert read(watch) == [WatchEvent("ADDED", node("n1", "5")),
                           WatchEvent("DELETED", node("n2", "6"))]
    assert watch.resource_version == "6"


def test_a_bookmark_moves_the_version_on_and_is_no_change() -> None:
    watch = Watch(FakeClient(FakeStream([change("MODIFIED", "n1", "5"), bookmark("9")])), "/p",
                  action=WATCHING, resource_version="4")
    assert read(watch) == [WatchEvent("MODIFIED", node("n1", "5"))]
    assert watch.resource_version == "9", "a watch resumed from here skips nothing"


def test_an_expired_error_event_keeps_the_last_version_seen() -> None:
    watch = Watch(FakeClient(FakeStream([
        change("MODIFIED", "n1", "7"),
        error_event(410, "Expired", "too old resource version: 7 (12)"),
    ])), "/p", action=WATCHING, resource_version="3")
    events: list[WatchEvent] = []
    with pytest.raises(WatchExpired) as caught:
        events.extend(watch)
    assert events == [WatchEvent("MODIFIED", node("n1", "7"))]
    assert caught.value.kind == "expired"
    assert caught.value.resource_version == "7"
    assert str(caught.value).startswith(f"{WATCHING}: too old resource version")


def test_an_expired_error_event_first_keeps_the_version_the_watch_started_from() -> None:
    watch = Watch(FakeClient(FakeStream([error_event(410, "Gone", "too old")])), "/p",
                  action=WATCHING, resource_version="3")
    with pytest.raises(WatchExpired) as caught:
        read(watch)
    assert caught.value.resource_version == "3"


def test_another_error_event_keeps_its_code_and_reason() -> None:
    watch = Watch(FakeClient(FakeStream([
        error_event(500, "InternalError", "etcd leader changed"),
        change("ADDED", "n1", "8"),
    ])), "/p", action=WATCHING)
    with pytest.raises(KubeError) as caught:
        read(watch)
    assert not isinstance(caught.value, WatchExpired)
    assert (caught.value.kind, caught.value.status, caught.value.reason) == (
        "unavailable", 500, "InternalError")
    assert str(caught.value).startswith(f"{WATCHING}: etcd leader changed")


def test_a_watch_refused_as_too_old_is_expired_with_its_version() -> None:
    refused = ApiError(410, "Gone", '{"kind":"Status","code":410,"reason":"Expired"}')
    watch = Watch(FakeClient(FakeStream([refused])), "/p", action=WATCHING,
                  resource_version="3")
    with pytest.raises(WatchExpired) as caught:
        read(watch)
    assert caught.value.resource_version == "3"


def test_a_watch_refused_otherwise_is_that_error() -> None:
    refused = ApiError(403, "Forbidden", '{"kind":"Status","code":403,"reason":"Forbidden",'
                                         '"message":"nodes is forbidden"}')
    with pytest.raises(KubeError) as caught:
        read(Watch(FakeClient(FakeStream([refused])), "/p", action=WATCHING))
    assert (caught.value.kind, caught.value.status) == ("forbidden", 403)
    assert "nodes is forbidden" in str(caught.value)


def test_a_silent_stream_ends_the_watch_to_be_made_again_from_its_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No event, no bookmark for the idle timeout: maybe a connection that died without a
    # word. The watch ends as when the server ends it; the next one, from the version
    # reached, goes over a new connection.
    silent = WatchSilent("the watch stayed silent (no event, no bookmark) for 80 s")
    watch = Watch(FakeClient(FakeStream([change("ADDED", "n1", "5"), silent])), "/p",
                  action=WATCHING)
    with caplog.at_level(logging.INFO, "cluo.kube.watch"):
        assert [event.object for event in read(watch)] == [node("n1", "5")]
    assert watch.resource_version == "5"
    [record] = caplog.records
    assert record.getMessage() == "the watch stayed silent, watching again"
    assert fields_of(record) == {"ACTION": WATCHING, "SILENT_FOR": WATCH_IDLE_TIMEOUT}


def test_a_broken_stream_is_unavailable_and_says_what_was_watched() -> None:
    watch = Watch(FakeClient(FakeStream([change("ADDED", "n1", "5"),
                                         ConnectionResetError("reset by peer")])), "/p",
                  action=WATCHING)
    events: list[WatchEvent] = []
    with pytest.raises(KubeError) as caught:
        events.extend(watch)
    assert len(events) == 1
    assert caught.value.kind == "unavailable"
    assert str(caught.value).startswith(f"{WATCHING}: ConnectionResetError")


def test_a_stream_broken_by_a_close_from_another_thread_ends_quietly() -> None:
    stream = FakeStream([change("ADDED", "n1", "5"), ConnectionResetError("shut down")])
    watch = Watch(FakeClient(stream), "/p", action=WATCHING)
    seen = []
    for event in watch:
        seen.append(event)
        watch.close()
    assert len(seen) == 1
    assert stream.closed


def test_a_close_while_the_watch_is_being_opened_ends_it_quietly() -> None:
    stream = FakeStream([], silent=True)  # it would say nothing until closed
    client = FakeClient(stream)
    watch = Watch(client, "/p", action=WATCHING)
    client.while_opening = watch.close  # as if closed from another thread meanwhile
    assert read(watch) == []
    assert stream.closed
    assert len(client.requests) == 1


def test_a_closed_watch_is_never_opened() -> None:
    client = FakeClient(FakeStream([change("ADDED", "n1", "5")]))
    watch = Watch(client, "/p", action=WATCHING)
    watch.close()
    assert read(watch) == []
    assert client.requests == []


def test_a_silent_watch_closed_from_another_thread_ends_quietly() -> None:
    stream = FakeStream([change("ADDED", "n1", "5")], silent=True)
    watch = Watch(FakeClient(stream), "/p", action=WATCHING)
    first = threading.Event()
    outcome: list[object] = []

    def consume() -> None:
        try:
            for _ in watch:
                first.set()
            outcome.append("ended")
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    assert first.wait(TIMEOUT), "the first event"
    watch.close()
    thread.join(TIMEOUT)
    assert outcome == ["ended"]


def test_a_watch_can_be_iterated_only_once() -> None:
    watch = Watch(FakeClient(FakeStream([])), "/p", action=WATCHING)
    read(watch)
    with pytest.raises(RuntimeError):
        iter(watch)


# -- WatchLoop: keep watching ------------------------------------------------------------


class FakeWatch:
    """One watch as a WatchLoop runs it: its events, then its end (or ``error``)."""

    def __init__(self, version: str | None, events: list[str], *,
                 error: BaseException | None = None, end: str | None = None,
                 silent: bool = False) -> None:
        self.started_from = version
        self.resource_version = version
        self._events = events
        self._error = error
        self._end = end  # the version the server's end leaves it at
        self._silent = silent
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            self.resource_version = event
            yield event
        if self._error is not None:
            raise self._error
        if self._end is not None:
            self.resource_version = self._end
        if self._silent:
            self.closed.wait(TIMEOUT)

    def close(self) -> None:
        self.closed.set()


class Script:
    """What a WatchLoop is given: ``begin`` answers with the next of ``lists``, the
    watches are made by ``next_watch(version)``; what happened is recorded."""

    def __init__(self, lists: list[str | None],
                 next_watch: Callable[[str | None], FakeWatch]) -> None:
        self._lists = lists
        self._next_watch = next_watch
        self.begun = 0
        self.watches: list[FakeWatch] = []
        self.events: list[str] = []

    def begin(self) -> str | None:
        self.begun += 1
        return self._lists[min(self.begun, len(self._lists)) - 1]

    def open_watch(self, version: str | None) -> FakeWatch:
        watch = self._next_watch(version)
        self.watches.append(watch)
        return watch

    def loop(self, backoff: Backoff, **options: Any) -> WatchLoop[str]:
        return WatchLoop("test-watch", begin=self.begin, open_watch=self.open_watch,
                         on_event=self.events.append, backoff=backoff,
                         log_fields={"WHAT": "things"}, failed_message="watch failed",
                         expired_message="watch expired", **options)


FAST = Backoff(initial=0.01, maximum=0.04)
NEVER = Backoff(initial=3600.0, maximum=3600.0)


@pytest.fixture
def running() -> Iterator[list[WatchLoop[str]]]:
    loops: list[WatchLoop[str]] = []
    yield loops
    for loop in loops:
        loop.stop(TIMEOUT)


def start(loops: list[WatchLoop[str]], loop: WatchLoop[str]) -> WatchLoop[str]:
    loops.append(loop)
    loop.start()
    return loop


def test_after_the_server_ends_a_watch_the_next_starts_where_it_ended(
    running: list[WatchLoop[str]],
) -> None:
    def next_watch(version: str | None) -> FakeWatch:
        if version == "10":
            return FakeWatch(version, ["11", "12"], end="15")
        return FakeWatch(version, [], silent=True)

    script = Script(["10"], next_watch)
    start(running, script.loop(NEVER))
    wait_for(lambda: len(script.watches) == 2, TIMEOUT, "the second watch")
    assert [w.started_from for w in script.watches] == ["10", "15"]
    assert script.events == ["11", "12"]
    assert script.begun == 1, "no fresh start: the watch went on"


def test_after_an_expiry_it_begins_again_at_once(
    running: list[WatchLoop[str]], caplog: pytest.LogCaptureFixture,
) -> None:
    def next_watch(version: str | None) -> FakeWatch:
        if version == "10":
            return FakeWatch(version, ["11"], error=WatchExpired(WATCHING, "too old", "11"))
        return FakeWatch(version, [], silent=True)

    script = Script(["10", "20"], next_watch)
    with caplog.at_level(logging.INFO, "cluo.kube.watch"):
        start(running, script.loop(NEVER))  # a backoff would be an hour
        wait_for(lambda: len(script.watches) == 2, TIMEOUT, "a watch after the expiry")
    assert script.begun == 2
    assert [w.started_from for w in script.watches] == ["10", "20"]
    assert [r.getMessage() for r in caplog.records] == ["watch expired"]


def test_after_a_failure_it_waits_the_backoff_then_begins_again(
    running: list[WatchLoop[str]], caplog: pytest.LogCaptureFixture,
) -> None:
    failure = KubeError(WATCHING, "connection refused", kind="unavailable")
    script = Script([None], lambda version: FakeWatch(version, [], error=failure))
    with caplog.at_level(logging.WARNING, "cluo.kube.watch"):
        start(running, script.loop(NEVER))
        wait_for(lambda: script.begun == 1 and caplog.records, TIMEOUT, "the first failure")
        assert_stays(lambda: script.begun == 1, 0.3, "the loop to wait before it retries")
    [warning] = caplog.records
    assert warning.getMessage() == "watch failed"
    assert fields_of(warning) == {"WHAT": "things", "ERROR": str(failure),
                                  "ERROR_KIND": "unavailable", "RETRY_IN": 3600.0}


def test_after_a_failure_with_retry_after_it_waits_at_least_that_long(
    running: list[WatchLoop[str]], caplog: pytest.LogCaptureFixture,
) -> None:
    throttled = KubeError(WATCHING, "too many requests", kind="blocked", status=429,
                          retry_after=0.5)
    script = Script([None], lambda version: FakeWatch(version, [], error=throttled))
    with caplog.at_level(logging.WARNING, "cluo.kube.watch"):
        start(running, script.loop(FAST))
        wait_for(lambda: caplog.records, TIMEOUT, "the first failure")
    assert fields_of(caplog.records[0])["RETRY_IN"] == 0.5


def test_failures_in_a_row_wait_longer_and_a_delivered_event_starts_over(
    running: list[WatchLoop[str]], caplog: pytest.LogCaptureFixture,
) -> None:
    failure = KubeError(WATCHING, "connection refused", kind="unavailable")

    def next_watch(version: str | None) -> FakeWatch:
        attempt = len(script.watches) + 1
        if attempt == 5:  # this one works a while: it delivers an event, then breaks
            return FakeWatch(version, ["7"], error=failure)
        if attempt > 6:
            return FakeWatch(version, [], silent=True)
        return FakeWatch(version, [], error=failure)

    script = Script([None], next_watch)
    with caplog.at_level(logging.WARNING, "cluo.kube.watch"):
        start(running, script.loop(FAST))
        wait_for(lambda: len(script.watches) == 7, TIMEOUT, "the seventh watch")
    delays = [fields_of(r)["RETRY_IN"] for r in caplog.records]
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.01, 0.02]
    assert script.events == ["7"]


def test_it_begins_again_when_the_restart_period_has_passed(
    running: list[WatchLoop[str]],
) -> None:
    now = [0.0]

    def next_watch(version: str | None) -> FakeWatch:
        if len(script.watches) == 1:
            now[0] = 601.0  # the watch lasted past the period
        return FakeWatch(version, [], end=version, silent=len(script.watches) >= 2)

    script = Script(["10", "20"], next_watch)
    start(running, script.loop(NEVER, restart_every=600.0, clock=lambda: now[0]))
    wait_for(lambda: script.begun == 2 and len(script.watches) == 3, TIMEOUT,
             "a fresh start after the period, and a watch from it")
    assert [w.started_from for w in script.watches] == ["10", "10", "20"]


def test_stop_closes_the_current_watch_and_ends_the_thread(
    running: list[WatchLoop[str]],
) -> None:
    script = Script(["10"], lambda version: FakeWatch(version, ["11"], silent=True))
    loop = script.loop(NEVER)
    loop.start()
    wait_for(lambda: script.events == ["11"], TIMEOUT, "the first event")
    loop.stop(TIMEOUT)
    assert script.watches[0].closed.is_set()
    assert len(script.watches) == 1, "no watch after stop"


# -- Reflector: list, then keep the store current ------------------------------------------


class FakeApi(FakeClient):
    """``KubeClient.call`` (the list) besides ``watch``."""

    def __init__(self, listed: list[Obj], version: str, *streams: FakeStream) -> None:
        super().__init__(*streams)
        self._list = {"metadata": {"resourceVersion": version}, "items": listed}

    def call(self, action: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        assert (action, method) == ("listing nodes", "GET")
        return self._list


def test_a_reflector_lists_then_watches_from_the_list_into_its_store() -> None:
    api = FakeApi([node("a", "3"), node("b", "4")], "5", FakeStream([
        change("MODIFIED", "a", "6"),
        change("MODIFIED", "b", "2"),  # older than what the store has: ignored
        change("DELETED", "b", "7"),
        change("ADDED", "c", "8"),
    ], silent=True))
    store = ObjectStore()
    changes: list[Obj | None] = []
    reflector = Reflector("nodes", api, "/api/v1/nodes", store, changes.append,
                          resync_period=600.0, label_selector="pool=a")
    reflector.start()
    try:
        wait_for(lambda: len(changes) == 4, TIMEOUT, "the list and three changes")
        assert reflector.synced
    finally:
        reflector.stop(TIMEOUT)
    assert changes == [None, node("a", "6"), node("b", "7"), node("c", "8")]
    assert sorted(store.by_name()) == ["a", "c"]
    [(_, query, _)] = api.requests
    assert (query["resourceVersion"], query["labelSelector"]) == ("5", "pool=a")


def test_a_reflector_with_resync_period_0_never_lists_again_while_its_watches_resume() -> None:
    api = FakeApi([node("a", "3")], "5", FakeStream([change("MODIFIED", "a", "6")]),
                  FakeStream([], silent=True))
    now = [0.0]
    changes: list[Obj | None] = []

    def changed(obj: Obj | None) -> None:
        now[0] += 1e6  # far past any period
        changes.append(obj)

    reflector = Reflector("nodes", api, "/api/v1/nodes", ObjectStore(), changed,
                          resync_period=0, clock=lambda: now[0])
    reflector.start()
    try:
        wait_for(lambda: len(api.requests) == 2, TIMEOUT, "the second watch")
    finally:
        reflector.stop(TIMEOUT)
    assert changes[0] is None and changes.count(None) == 1  # the first list only
    assert [query["resourceVersion"] for _, query, _ in api.requests] == ["5", "6"]


class PagedApi(FakeApi):
    """A list answered ``page`` objects at a time, with ``continue`` tokens."""

    def __init__(self, listed: list[Obj], version: str, page: int, *streams: FakeStream) -> None:
        super().__init__(listed, version, *streams)
        self._listed, self._version, self._page = listed, version, page
        self.list_queries: list[dict[str, Any]] = []

    def call(self, action: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        query = dict(kwargs["query"])
        self.list_queries.append(query)
        start = int(query.get("continue") or 0)
        end = start + self._page
        metadata = {"resourceVersion": self._version}
        if end < len(self._listed):
            metadata["continue"] = str(end)
        return {"metadata": metadata, "items": self._listed[start:end]}


class KeptStore(ObjectStore):
    """Keeps only the name and version of each listed object."""

    def kept(self, obj: Obj) -> Obj:
        metadata = obj["metadata"]
        return {"metadata": {"name": metadata["name"],
                             "resourceVersion": metadata["resourceVersion"]}}


def test_a_reflector_lists_page_by_page_and_keeps_what_the_store_keeps() -> None:
    listed = [{**node(f"n{i}", str(i)), "spec": {"large": "x" * 100}} for i in range(5)]
    api = PagedApi(listed, "9", 2, FakeStream([], silent=True))
    store = KeptStore()
    reflector = Reflector("nodes", api, "/api/v1/nodes", store, lambda _: None,
                          resync_period=0, label_selector="pool=a")
    assert reflector.list_now() == "9"
    assert [(q.get("continue"), q["limit"], q["labelSelector"]) for q in api.list_queries] == [
        (None, LIST_PAGE, "pool=a"), ("2", LIST_PAGE, "pool=a"), ("4", LIST_PAGE, "pool=a")]
    assert store.by_name() == {f"n{i}": store.kept(node(f"n{i}", str(i))) for i in range(5)}
