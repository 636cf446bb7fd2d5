"""A history of the nodes in flight, from watches on Nodes and slot Leases (tests, the roll).

Both live in the same etcd, so ordering their events by resourceVersion gives one
history; "never more nodes in flight than allowed" is checked over every state in it.

Each kind is listed, then watched from the list's resourceVersion, and watched again from
the last resourceVersion seen (bookmarks included) when a watch ends or fails: as long as
the API server can resume from there, no change is missed. When it cannot (410 Gone: the
API server was restarted, or the version left its watch cache), the kind is listed again
and the list replaces the recorder's view of that kind. Changes between the last version
seen and that list may have been missed: that stretch is a `Gap`, and every `Moment`
inside it names the kind in ``blind``. The summaries (`max_in_flight`, `grant_order`,
`grant_spans`) refuse a history with a gap (`RecorderBlind`) unless the caller accepts
the gaps, and then they read only the moments where nothing was blind.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import kubernetes.client
from kubernetes.client import CoordinationV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from cluo.protocol import SLOT_LEASE_LABEL, SLOT_LEASE_PREFIX, Keys

KINDS = ("node", "lease")
# Each watch's timeoutSeconds. A watch stays open as long as it can: a watched set that
# sees no change (the slot Leases before a roll) moves the version its next watch resumes
# from only by the API server's bookmarks, which come about once a minute and before a
# watch's deadline, not to a watch of a second or two. A version that stands still falls
# out of the API server's watch cache (a few minutes of every Lease's changes, the nodes'
# heartbeats among them) and the watch cannot resume: 410 Gone, a gap. stop() ends an
# open watch by shutting its connection down.
WATCH_SECONDS = 60
REQUEST_TIMEOUT = 5.0  # a list
WATCH_REQUEST_TIMEOUT = WATCH_SECONDS + 10.0
RETRY_FIRST = 0.2  # after a failed list or watch, doubled up to RETRY_MAX
RETRY_MAX = 2.0
GONE = 410


class RecorderBlind(AssertionError):
    """A check over a history with gaps, which could pass only because it saw too little."""


@dataclass(frozen=True)
class Moment:
    """One state of the cluster, as the watches saw it."""

    at: float  # time.monotonic() when the event arrived
    # nodes with reboot-ok or reboot-in-progress, cordoned by cluo, or holding a global
    # slot (planner rule 1: a node named only by group slots, rule 15, is not in flight)
    in_flight: frozenset[str]
    granted: frozenset[str]  # nodes with reboot-ok=true
    holders: frozenset[str]  # slot Lease holders, group slots' included
    blind: frozenset[str] = frozenset()  # kinds whose view may be stale here (inside a gap)
    # spec.unschedulable with agent-made-unschedulable=true (an admin release aside)
    cordoned: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Gap:
    """A stretch of one kind's history the recorder may have missed changes in.

    From resourceVersion ``after`` (the last one seen) to ``relisted`` (the list that
    replaced the view; None if no list succeeded before the recorder stopped); in time,
    from ``since`` (the first failure that led to it) to ``until``.
    """

    kind: str
    after: int
    since: float
    error: str
    relisted: int | None = None
    until: float | None = None

    def seconds(self, now: float | None = None) -> float:
        """How long the recorder was blind to this kind (up to ``now`` if it still is)."""
        end = self.until if self.until is not None else (
            time.monotonic() if now is None else now)
        return end - self.since

    def covers(self, version: int) -> bool:
        return self.after < version and (self.relisted is None or version < self.relisted)


class _Event(NamedTuple):
    version: int
    at: float
    kind: str
    name: str | None  # None: a list, whose state is the whole view of the kind
    state: Any


@dataclass
class _Broken:
    """A watch that failed, while it is being resumed or the kind listed again."""

    since: float
    error: str
    delay: float = field(default=RETRY_FIRST)


class InFlightRecorder:
    """Watches the Nodes of ``selector`` and the slot Leases of ``namespace`` until stopped.

    A node counts as in flight while it has reboot-ok=true or reboot-in-progress=true or
    is cordoned by cluo (spec.unschedulable with agent-made-unschedulable=true), unless an
    admin released its slot (release-slot=true), and while it holds a slot Lease. Every
    failed list or watch is kept in ``errors``; the ones that cost the history a stretch
    are in ``gaps`` (``lost_sight``, ``blind_seconds``).
    """

    def __init__(self, admin: kubernetes.client.ApiClient, selector: str, namespace: str,
                 keys: Keys) -> None:
        self._core = CoreV1Api(admin)
        self._coordination = CoordinationV1Api(admin)
        self._selector = selector
        self._namespace = namespace
        self._keys = keys
        self._lock = threading.Lock()
        self._events: list[_Event] = []
        self._gaps: list[Gap] = []
        self._stop = threading.Event()
        self._ready = threading.Barrier(len(KINDS) + 1, timeout=30)
        self.errors: list[str] = []
        self.relists = 0  # lists after the first, of either kind
        self._open: dict[str, Any] = {}  # kind -> its watch's HTTP response, to shut down
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True,
                                          name=f"recorder-{kind}") for kind in KINDS]

    def start(self) -> InFlightRecorder:
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            responses = list(self._open.values())
        for response in responses:  # wakes a watch blocked on a quiet connection
            with contextlib.suppress(Exception):
                response.shutdown()
        for thread in self._threads:
            thread.join(10)
        if any(thread.is_alive() for thread in self._threads):
            raise RuntimeError("the recorder's watch threads did not stop within 10 s")

    # -- what it lost ----------------------------------------------------------------------

    @property
    def gaps(self) -> list[Gap]:
        with self._lock:
            return list(self._gaps)

    @property
    def lost_sight(self) -> bool:
        return bool(self.gaps)

    def blind_seconds(self) -> float:
        """The total time some kind was blind (gaps of the two kinds may overlap)."""
        return sum(gap.seconds() for gap in self.gaps)

    # -- watching --------------------------------------------------------------------------

    def _list_call(self, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        if kind == "node":
            return self._core.list_node, (), {"label_selector": self._selector}
        return (self._coordination.list_namespaced_lease, (self._namespace,),
                {"label_selector": SLOT_LEASE_LABEL})

    def _run(self, kind: str) -> None:
        call, args, kwargs = self._list_call(kind)
        broken: _Broken | None = None
        failed_at = time.monotonic()
        version = self._list(kind, call, args, kwargs)
        if version is None:
            broken = _Broken(failed_at, f"listing {kind}s failed")
            self._open_gap(kind, 0, broken)
        self._ready.wait()
        while not self._stop.is_set():
            if version is None:
                version = self._list(kind, call, args, kwargs)
                if version is None:
                    assert broken is not None
                    broken.delay = self._pause(broken.delay)
                    continue
                self._close_gap(kind, version)
                broken = None
            watch = Watch()
            try:
                for event in watch.stream(self._opener(kind, call), *args, **kwargs,
                                          resource_version=str(version),
                                          allow_watch_bookmarks=True,
                                          timeout_seconds=WATCH_SECONDS,
                                          _request_timeout=WATCH_REQUEST_TIMEOUT):
                    if event["type"] != "BOOKMARK":
                        self._record(kind, event["object"], deleted=event["type"] == "DELETED")
                    version = int(watch.resource_version or version)
                    broken = None
                    if self._stop.is_set():
                        watch.stop()
                broken = None  # the server ended the watch: resume from `version`
            except ApiException as err:
                if self._stop.is_set():
                    break
                broken = self._failed(kind, err, broken)
                if err.status == GONE:
                    self._open_gap(kind, version, broken)
                    version = None  # list again, at once
                else:
                    broken.delay = self._pause(broken.delay)
            except Exception as err:  # the connection: resume from `version` once it is back
                if self._stop.is_set():  # stop() shut the connection down
                    break
                broken = self._failed(kind, err, broken)
                broken.delay = self._pause(broken.delay)

    def _opener(self, kind: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` for Watch.stream, keeping each watch's response for stop() to shut."""
        @functools.wraps(call)  # Watch.stream reads the return type from call's signature
        def open_watch(*args: Any, **kwargs: Any) -> Any:
            response = call(*args, **kwargs)
            with self._lock:
                self._open[kind] = response
            return response
        return open_watch

    def _list(self, kind: str, call: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> int | None:
        """List ``kind`` into one event that replaces its view; its version, None if failed."""
        try:
            listed = call(*args, **kwargs, _request_timeout=REQUEST_TIMEOUT)
        except Exception as err:
            self.errors.append(f"listing {kind}s: {err!r}")
            return None
        version = int(listed.metadata.resource_version)
        view = {obj.metadata.name: self._state(kind, obj) for obj in listed.items}
        with self._lock:
            self._events.append(_Event(version, time.monotonic(), kind, None, view))
        return version

    def _failed(self, kind: str, err: Exception, broken: _Broken | None) -> _Broken:
        self.errors.append(f"watching {kind}s: {err!r}")
        return broken or _Broken(time.monotonic(), f"watching {kind}s: {err!r}")

    def _pause(self, delay: float) -> float:
        self._stop.wait(delay)
        return min(delay * 2, RETRY_MAX)

    def _open_gap(self, kind: str, after: int, broken: _Broken) -> None:
        with self._lock:
            self._gaps.append(Gap(kind, after, broken.since, broken.error))

    def _close_gap(self, kind: str, relisted: int) -> None:
        with self._lock:
            self.relists += 1
            for i, gap in enumerate(self._gaps):
                if gap.kind == kind and gap.relisted is None:
                    self._gaps[i] = Gap(gap.kind, gap.after, gap.since, gap.error, relisted,
                                        time.monotonic())

    def _state(self, kind: str, obj: Any, *, deleted: bool = False) -> Any:
        if kind == "lease":
            return None if deleted else obj.spec.holder_identity
        annotations = obj.metadata.annotations or {}
        keys = self._keys
        granted = not deleted and annotations.get(keys.reboot_ok) == "true"
        released = annotations.get(keys.release_slot) == "true"
        cordoned = (not deleted and not released and bool(obj.spec.unschedulable)
                    and annotations.get(keys.agent_made_unschedulable) == "true")
        return (not deleted and not released and (
            granted or cordoned or annotations.get(keys.reboot_in_progress) == "true"),
            granted, cordoned)

    def _record(self, kind: str, obj: Any, *, deleted: bool = False) -> None:
        state = self._state(kind, obj, deleted=deleted)
        with self._lock:
            self._events.append(_Event(int(obj.metadata.resource_version), time.monotonic(),
                                       kind, obj.metadata.name, state))

    # -- the history -----------------------------------------------------------------------

    def history(self) -> list[Moment]:
        """Every state in resourceVersion order, each naming the kinds blind there."""
        with self._lock:
            events = sorted(self._events, key=lambda e: e.version)
            gaps = list(self._gaps)
        flying: dict[str, bool] = {}
        granted: dict[str, bool] = {}
        cordoned: dict[str, bool] = {}
        holders: dict[str, str | None] = {}
        moments = []
        for version, at, kind, name, state in events:
            if kind == "node":
                if name is None:
                    flying = {n: s[0] for n, s in state.items()}
                    granted = {n: s[1] for n, s in state.items()}
                    cordoned = {n: s[2] for n, s in state.items()}
                else:
                    flying[name], granted[name], cordoned[name] = state
            elif name is None:
                holders = dict(state)
            else:
                holders[name] = state
            holding = frozenset(h for h in holders.values() if h)
            global_holding = frozenset(h for lease, h in holders.items()
                                       if h and lease.startswith(SLOT_LEASE_PREFIX))
            blind = frozenset(gap.kind for gap in gaps if gap.covers(version))
            moments.append(Moment(at, frozenset(n for n, f in flying.items() if f)
                                  | global_holding,
                                  frozenset(n for n, g in granted.items() if g), holding,
                                  blind, frozenset(n for n, c in cordoned.items() if c)))
        return moments

    def _sighted(self, allow_gaps: bool) -> list[Moment]:
        gaps = self.gaps
        if gaps and not allow_gaps:
            raise RecorderBlind(
                f"the recorder lost sight {len(gaps)} time(s), {self.blind_seconds():.1f} s "
                f"in all: {gaps}; a check over its history could pass only for lack of sight")
        return [moment for moment in self.history() if not moment.blind]

    def max_in_flight(self, *, allow_gaps: bool = False) -> int:
        """The most nodes in flight at once (with ``allow_gaps``: outside the gaps)."""
        return max((len(m.in_flight) for m in self._sighted(allow_gaps)), default=0)

    def max_cordoned(self, *, allow_gaps: bool = False) -> int:
        """The most nodes cordoned by cluo at once (with ``allow_gaps``: outside the gaps)."""
        return max((len(m.cordoned) for m in self._sighted(allow_gaps)), default=0)

    def uncordons(self, *, allow_gaps: bool = False) -> list[tuple[str, bool]]:
        """Each time a node stopped being cordoned by cluo, in order: the node, and whether
        its reboot-ok=true went in the same write (the coordinator's reset uncordoned it)."""
        found: list[tuple[str, bool]] = []
        previous: Moment | None = None
        for moment in self._sighted(allow_gaps):
            if previous is not None:
                for name in sorted(previous.cordoned - moment.cordoned):
                    found.append((name, name in previous.granted
                                  and name not in moment.granted))
            previous = moment
        return found

    def grant_order(self, *, allow_gaps: bool = False) -> list[str]:
        """Nodes in the order reboot-ok became true (a node may appear more than once)."""
        order: list[str] = []
        previous: frozenset[str] = frozenset()
        for moment in self._sighted(allow_gaps):
            order.extend(sorted(moment.granted - previous))
            previous = moment.granted
        return order

    def grant_spans(self, *, allow_gaps: bool = False
                    ) -> dict[str, list[tuple[float, float | None]]]:
        """Per node, each (reboot-ok became true, became false again or None) span."""
        spans: dict[str, list[tuple[float, float | None]]] = {}
        previous: frozenset[str] = frozenset()
        for moment in self._sighted(allow_gaps):
            for name in moment.granted - previous:
                spans.setdefault(name, []).append((moment.at, None))
            for name in previous - moment.granted:
                start, _ = spans[name][-1]
                spans[name][-1] = (start, moment.at)
            previous = moment.granted
        return spans
