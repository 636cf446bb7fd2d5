"""Watching Kubernetes objects: one reader of watch streams, one loop that keeps watching.

- ``Watch``: one watch request on a collection (narrowed by a field or label selector)
  from a resourceVersion, read as ``WatchEvent``s. Besides the changes it handles what
  else a watch can bring: a BOOKMARK only moves ``resource_version`` on; an ERROR event
  raises a ``KubeError`` with the status's code and reason, or ``WatchExpired`` for 410
  (with the last resourceVersion seen), as does a watch refused from the start; a broken
  stream raises a ``KubeError`` of kind ``unavailable``. A stream silent for longer than
  ``WATCH_IDLE_TIMEOUT`` (no event and no bookmark, which the server sends about every
  minute once it has seen a change of that kind: the connection may have died without a
  word) ends the iteration, as the server's end of the watch does, so the caller
  watches again from ``resource_version`` on a new connection (which fails, and goes
  the failure path, if the server is really gone). ``close()``, from any thread, even
  while the request is being made, ends the iteration quietly.
- ``WatchLoop``: watch, and watch again, in a thread of its own, until stopped: from
  where the last watch ended when the server ended it (its ``timeoutSeconds``), from a
  fresh start (``begin``) at once when it expired, from a fresh start after a
  ``Backoff`` when it failed (at least as long as the server's Retry-After, if it
  gave one).
- ``Reflector``: a WatchLoop whose fresh start lists a collection into a ``Store``,
  which the watch then keeps current (client-go's pattern): the coordinator's cache.

The agent follows its one Node with a WatchLoop over ``KubeNodes.watch`` (a ``Watch``
with a ``metadata.name`` field selector) and no list: a watch from "now" begins with
the object as it is, as an ADDED event.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from cluo.backoff import Backoff, spread
from cluo.errors import CluoError, KubeError, WatchExpired, kind_for_status
from cluo.kube.client import (
    TRANSPORT_ERRORS,
    ApiError,
    ClosableStream,
    KubeClient,
    MalformedResponse,
    Query,
    WatchSilent,
    kube_error,
)
from cluo.kube.objects import Obj, name_of, newer_or_same, version_of
from cluo.kube.resources import (
    CONNECT_TIMEOUT,
    WATCH_IDLE_TIMEOUT,
    WATCH_TIMEOUT_SECONDS,
    Timeout,
)

__all__ = [
    "REFLECTOR_BACKOFF",
    "EventStream",
    "ObjectStore",
    "Reflector",
    "RunningWatch",
    "Store",
    "StreamSource",
    "Watch",
    "WatchEvent",
    "WatchLoop",
]

log = logging.getLogger(__name__)

# The coordinator's reflectors retry a failed list or watch 0.2 s doubling to 30 s, each
# delay spread by ±20 % so that the two reflectors (and replicas) do not retry in step.
REFLECTOR_BACKOFF = Backoff(initial=0.2, maximum=30.0, jitter=spread(0.2, random.uniform))
# A reflector lists this many objects per request (``limit`` and ``continue``), so a large
# collection is never held whole as the API server sent it: each page is cut down to what
# the store keeps before the next is read (15,000 Nodes: 15 requests).
LIST_PAGE = 1000


class WatchEvent(NamedTuple):
    """A change: "ADDED", "MODIFIED" or "DELETED", and the object as it then was."""

    type: str
    object: Obj


class EventStream(Protocol):
    """A watch's raw events, one JSON object each (``KubeClient.watch``'s answer)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


class StreamSource(Protocol):
    """What a ``Watch`` needs of the client."""

    def watch(
        self, path: str, *, query: Query | None = ..., timeout: Timeout = ...
    ) -> EventStream: ...


class Watch(ClosableStream[WatchEvent]):
    """One watch request on the collection at ``path``; iterate once for its changes.

    ``resource_version``: where the watch starts (None: from now; its first events are
    then the objects as they are, as ADDED), and then the last version it saw. Watch
    again from there when the iteration ends (the server ended the watch after
    ``timeout_seconds``, or it stayed silent for ``idle_timeout`` seconds). ``action``
    says what was being done in its errors.
    """

    def __init__(
        self,
        client: StreamSource,
        path: str,
        *,
        action: str,
        resource_version: str | None = None,
        selectors: Query | None = None,
        timeout_seconds: int = WATCH_TIMEOUT_SECONDS,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = WATCH_IDLE_TIMEOUT,
    ) -> None:
        if timeout_seconds < 1:
            raise ValueError("a watch needs a timeout of at least one second")
        super().__init__()
        self.action = action
        self.resource_version = resource_version or None
        self._client = client
        self._path = path
        self._selectors = dict(selectors or {})
        self._timeout_seconds = timeout_seconds
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._stream: EventStream | None = None

    def _interrupt(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.close()  # unblocks a read in another thread

    def _events(self) -> Iterator[WatchEvent]:
        if self._closed.is_set():
            return
        stream = self._stream = self._client.watch(
            self._path,
            query={
                **self._selectors,
                "watch": True,
                "resourceVersion": self.resource_version,
                "allowWatchBookmarks": True,
                "timeoutSeconds": self._timeout_seconds,
            },
            timeout=(self._connect_timeout, self._idle_timeout),
        )
        if self._closed.is_set():  # closed while the stream was being made
            stream.close()
        try:
            for raw in stream:
                if self._closed.is_set():
                    return
                event = self._read(raw)
                if event is not None:
                    yield event
        except WatchSilent:  # maybe a dead connection: the next watch makes a new one
            if not self._closed.is_set():
                log.info("the watch stayed silent, watching again", extra={
                    "ACTION": self.action, "SILENT_FOR": self._idle_timeout})
        except ApiError as err:  # the watch was refused
            if err.status == 410:
                raise WatchExpired(
                    self.action, "resourceVersion too old", self.resource_version
                ) from err
            raise kube_error(self.action, err) from err
        except TRANSPORT_ERRORS as err:  # a cut-off or garbled event too
            if self._closed.is_set():
                return
            raise kube_error(self.action, err) from err
        finally:
            self._stream = None
            stream.close()

    def _read(self, raw: Mapping[str, Any]) -> WatchEvent | None:
        """The change ``raw`` brings, None for a bookmark; raises for an ERROR event."""
        kind = str(raw.get("type") or "")
        obj = raw.get("object") or {}
        if not isinstance(obj, dict):
            raise MalformedResponse("a watch event's object is not a JSON object")
        if kind == "ERROR":
            raise self._error(obj)
        self.resource_version = version_of(obj) or self.resource_version
        return None if kind == "BOOKMARK" else WatchEvent(kind, obj)

    def _error(self, status: Mapping[str, Any]) -> KubeError:
        """The error an ERROR event's metav1.Status stands for."""
        code = status.get("code")
        code = code if isinstance(code, int) else 0
        message = str(status.get("message") or "")
        if code == 410:
            return WatchExpired(self.action, message, self.resource_version)
        return KubeError(self.action, message, kind=kind_for_status(code), status=code,
                         reason=str(status.get("reason") or ""))


E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)


class RunningWatch(Protocol[E_co]):
    """One watch, as a ``WatchLoop`` runs it: a ``Watch``, or one built on it."""

    @property
    def resource_version(self) -> str | None: ...

    def __iter__(self) -> Iterator[E_co]: ...

    def close(self) -> None: ...


class WatchLoop(Generic[E]):
    """Keep watching in a thread of its own (``name``) from ``start()`` to ``stop()``.

    ``begin()`` runs first, and again after a watch expired or failed: it returns the
    resourceVersion to watch from (a list's), or None to watch from now.
    ``open_watch(version)`` makes one watch, and each of its events goes to
    ``on_event``. When the server ends a watch, the next one starts where it ended;
    with ``restart_every`` seconds, ``begin()`` also runs again when that long has
    passed since it last ran (a safety-net re-list). A failure (a ``CluoError`` from
    any of them) waits ``backoff.delay(failures in a row)`` first, or the error's
    ``retry_after`` if longer; a watch that delivered an event or ended normally counts
    as a success.

    ``log_fields`` say what is watched in the log lines, ``failed_message`` (a warning,
    with ERROR, ERROR_KIND and RETRY_IN) and ``expired_message`` (info) are their
    messages.
    """

    def __init__(
        self,
        name: str,
        *,
        open_watch: Callable[[str | None], RunningWatch[E]],
        on_event: Callable[[E], None],
        backoff: Backoff,
        log_fields: Mapping[str, object],
        failed_message: str,
        expired_message: str,
        begin: Callable[[], str | None] = lambda: None,
        restart_every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_watch = open_watch
        self._on_event = on_event
        self._begin = begin
        self._backoff = backoff
        self._fields = dict(log_fields)
        self._failed_message = failed_message
        self._expired_message = expired_message
        self._restart_every = restart_every
        self._clock = clock
        self._failures = 0
        self._current: RunningWatch[E] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: the current watch is closed and the thread joined (up to ``timeout``)."""
        self._stop.set()
        watch = self._current
        if watch is not None:
            watch.close()  # unblocks its read
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The thread's work (runs in the caller's thread when called directly)."""
        while not self._stop.is_set():
            try:
                version = self._begin()
                begun_at = self._clock()
                while not self._stop.is_set() and not self._restart_due(begun_at):
                    version = self._watch_once(version)
                    self._failures = 0
            except WatchExpired:
                log.info(self._expired_message, extra=self._fields)
            except CluoError as err:
                if self._stop.is_set():
                    return
                delay = max(self._next_delay(), err.retry_after or 0.0)
                log.warning(self._failed_message, extra={
                    **self._fields, "ERROR": str(err), "ERROR_KIND": err.kind,
                    "RETRY_IN": round(delay, 2)})
                self._stop.wait(delay)
            except Exception as err:
                delay = self._next_delay()
                log.exception("watch loop failed unexpectedly", extra={
                    **self._fields, "ERROR": repr(err), "RETRY_IN": round(delay, 2)})
                self._stop.wait(delay)

    def _restart_due(self, begun_at: float) -> bool:
        every = self._restart_every
        return every is not None and self._clock() - begun_at > every

    def _watch_once(self, version: str | None) -> str | None:
        """One watch from ``version``; the version to go on from when the server ends it."""
        watch = self._current = self._open_watch(version)
        if self._stop.is_set():  # stopped while it was being made
            watch.close()
        try:
            for event in watch:
                self._failures = 0
                self._on_event(event)
        finally:
            self._current = None
            watch.close()
        return watch.resource_version

    def _next_delay(self) -> float:
        self._failures += 1
        return self._backoff.delay(self._failures)


class Store(Protocol):
    """Where a ``Reflector`` keeps the objects; each method says whether anything changed
    (``replace``, a fresh list, always may)."""

    def put(self, obj: Obj) -> bool: ...

    def delete(self, obj: Obj) -> bool: ...

    def replace(self, objects: list[Obj], list_version: str) -> None: ...

    def kept(self, obj: Obj) -> Obj:
        """What the store keeps of a listed object (a list hands ``replace`` these)."""


class ObjectStore:
    """Objects by name; an object never goes back to an older resourceVersion."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, Obj] = {}

    def put(self, obj: Obj) -> bool:
        name = name_of(obj)
        with self._lock:
            current = self._objects.get(name)
            if current is not None and (
                not newer_or_same(version_of(obj), version_of(current))
                or version_of(current) == version_of(obj)
            ):
                return False
            self._objects[name] = obj
            return True

    def delete(self, obj: Obj) -> bool:
        with self._lock:
            return self._objects.pop(name_of(obj), None) is not None

    def replace(self, objects: list[Obj], list_version: str) -> None:
        """A fresh list: keep only listed objects, unless the cache has a newer one."""
        with self._lock:
            fresh = {name_of(o): o for o in objects}
            for name, current in self._objects.items():
                if name in fresh:
                    if not newer_or_same(version_of(fresh[name]), version_of(current)):
                        fresh[name] = current
                elif not newer_or_same(list_version, version_of(current)):
                    fresh[name] = current  # written after the list was taken
            self._objects = fresh

    def kept(self, obj: Obj) -> Obj:
        return obj

    def values(self) -> list[Obj]:
        with self._lock:
            return list(self._objects.values())

    def by_name(self, names: Iterable[str] | None = None) -> dict[str, Obj | None]:
        """Every object by name, or only those named (None for one that is absent)."""
        with self._lock:
            if names is None:
                return dict(self._objects)
            return {name: self._objects.get(name) for name in names}


class Reflector:
    """List then watch one collection into ``store``, in a thread of its own.

    ``on_change`` is called with None after each list and with each object a watch
    event changed in the store. ``resync_period``: seconds after which a list runs again
    (when the current watch ends), a safety net; 0: never (a list runs only at the start
    and when a watch's version expired or a watch failed).
    """

    def __init__(
        self,
        what: str,
        client: KubeClient,
        path: str,
        store: Store,
        on_change: Callable[[Obj | None], None],
        *,
        resync_period: float,
        label_selector: str = "",
        backoff: Backoff = REFLECTOR_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._client = client
        self._path = path
        self._selectors = {"labelSelector": label_selector or None}
        self._store = store
        self._on_change = on_change
        self._synced = threading.Event()
        self._loop = WatchLoop(
            f"reflector-{what}",
            begin=self._list_into_store,
            open_watch=self._watch,
            on_event=self._apply,
            backoff=backoff,
            log_fields={"WHAT": what},
            failed_message="list or watch failed, retrying",
            expired_message="watch expired, listing again",
            restart_every=resync_period or None,
            clock=clock,
        )

    @property
    def synced(self) -> bool:
        """Whether a list has filled the store."""
        return self._synced.is_set()

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.stop(timeout)

    def list_now(self) -> str:
        """List in the caller's thread, ``LIST_PAGE`` objects a request, each page cut
        down to what the store keeps (``Store.kept``), then replace the store; returns
        the list's resourceVersion (a paged list is one consistent snapshot)."""
        objects: list[Obj] = []
        token: str | None = None
        while True:
            body = self._client.call(f"listing {self.what}", "GET", self._path, query={
                **self._selectors, "limit": LIST_PAGE, "continue": token})
            objects += [self._store.kept(item) for item in body.get("items") or []]
            token = str((body.get("metadata") or {}).get("continue") or "") or None
            if token is None:
                break
        version = version_of(body)
        self._store.replace(objects, version)
        return version

    def _list_into_store(self) -> str | None:
        version = self.list_now()
        self._synced.set()
        self._on_change(None)
        return version or None

    def _watch(self, version: str | None) -> Watch:
        return Watch(self._client, self._path, action=f"watching {self.what}",
                     resource_version=version, selectors=self._selectors)

    def _apply(self, event: WatchEvent) -> None:
        obj = event.object
        changed = self._store.delete(obj) if event.type == "DELETED" else self._store.put(obj)
        if changed:
            self._on_change(obj)

