"""A history of the nodes in flight, from watches on Nodes and slot Leases (tests, the roll).

Both live in the same etcd, so ordering their events by resourceVersion gives one
history; "never more nodes in flight than allowed" is checked over every state in it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes.client
from kubernetes.client import CoordinationV1Api, CoreV1Api
from kubernetes.watch import Watch

from cluo.protocol import SLOT_LEASE_LABEL, Keys


@dataclass(frozen=True)
class Moment:
    """One state of the cluster, as the watches saw it."""

    at: float  # time.monotonic() when the event arrived
    in_flight: frozenset[str]  # nodes with reboot-ok or reboot-in-progress, or holding a slot
    granted: frozenset[str]  # nodes with reboot-ok=true
    holders: frozenset[str]  # slot Lease holders


class InFlightRecorder:
    """Watches the Nodes of ``selector`` and the slot Leases of ``namespace`` until stopped.

    A node counts as in flight while it has reboot-ok=true or reboot-in-progress=true,
    unless an admin released its slot (release-slot=true), and while it holds a slot
    Lease. A list or watch that fails is kept in ``errors``: a gap in the history would
    make a check over it vacuous.
    """

    def __init__(self, admin: kubernetes.client.ApiClient, selector: str, namespace: str,
                 keys: Keys) -> None:
        self._core = CoreV1Api(admin)
        self._coordination = CoordinationV1Api(admin)
        self._selector = selector
        self._namespace = namespace
        self._keys = keys
        self._lock = threading.Lock()
        self._events: list[tuple[int, float, str, str, Any]] = []  # (rv, t, kind, name, state)
        self._stop = threading.Event()
        self._ready = threading.Barrier(3, timeout=30)
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True,
                                          name=f"recorder-{kind}") for kind in ("node", "lease")]

    def start(self) -> InFlightRecorder:
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        if any(thread.is_alive() for thread in self._threads):
            raise RuntimeError("the recorder's watch threads did not stop within 10 s")

    def _list_call(self, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        if kind == "node":
            return self._core.list_node, (), {"label_selector": self._selector}
        return (self._coordination.list_namespaced_lease, (self._namespace,),
                {"label_selector": SLOT_LEASE_LABEL})

    def _run(self, kind: str) -> None:
        call, args, kwargs = self._list_call(kind)
        try:
            listed = call(*args, **kwargs)
            for obj in listed.items:
                self._record(kind, obj)
            version = listed.metadata.resource_version
        except Exception as err:
            self.errors.append(f"listing {kind}s: {err!r}")
            version = None
        self._ready.wait()
        while version is not None and not self._stop.is_set():
            watch = Watch()
            try:
                for event in watch.stream(call, *args, **kwargs, resource_version=version,
                                          timeout_seconds=1, _request_timeout=5):
                    obj = event["object"]
                    version = obj.metadata.resource_version
                    self._record(kind, obj, deleted=event["type"] == "DELETED")
                    if self._stop.is_set():
                        watch.stop()
            except Exception as err:
                self.errors.append(f"watching {kind}s: {err!r}")
                return

    def _record(self, kind: str, obj: Any, *, deleted: bool = False) -> None:
        name = obj.metadata.name
        state: Any
        if kind == "node":
            annotations = obj.metadata.annotations or {}
            keys = self._keys
            granted = not deleted and annotations.get(keys.reboot_ok) == "true"
            released = annotations.get(keys.release_slot) == "true"
            state = (not deleted and not released and (
                granted or annotations.get(keys.reboot_in_progress) == "true"), granted)
        else:
            state = None if deleted else obj.spec.holder_identity
        with self._lock:
            self._events.append((int(obj.metadata.resource_version), time.monotonic(), kind,
                                 name, state))

    def history(self) -> list[Moment]:
        with self._lock:
            events = sorted(self._events, key=lambda e: e[0])
        flying: dict[str, bool] = {}
        granted: dict[str, bool] = {}
        holders: dict[str, str | None] = {}
        moments = []
        for _, at, kind, name, state in events:
            if kind == "node":
                flying[name], granted[name] = state
            else:
                holders[name] = state
            holding = frozenset(h for h in holders.values() if h)
            moments.append(Moment(at, frozenset(n for n, f in flying.items() if f) | holding,
                                  frozenset(n for n, g in granted.items() if g), holding))
        return moments

    def max_in_flight(self) -> int:
        return max((len(m.in_flight) for m in self.history()), default=0)

    def grant_order(self) -> list[str]:
        """Nodes in the order reboot-ok became true (a node may appear more than once)."""
        order: list[str] = []
        previous: frozenset[str] = frozenset()
        for moment in self.history():
            order.extend(sorted(moment.granted - previous))
            previous = moment.granted
        return order

    def grant_spans(self) -> dict[str, list[tuple[float, float | None]]]:
        """Per node, each (reboot-ok became true, became false again or None) span."""
        spans: dict[str, list[tuple[float, float | None]]] = {}
        previous: frozenset[str] = frozenset()
        for moment in self.history():
            for name in moment.granted - previous:
                spans.setdefault(name, []).append((moment.at, None))
            for name in previous - moment.granted:
                start, _ = spans[name][-1]
                spans[name][-1] = (start, moment.at)
            previous = moment.granted
        return spans
