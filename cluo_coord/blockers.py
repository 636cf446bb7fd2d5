"""Blockers: conditions that hold every new reboot slot while they fire.

Each blocker answers one question, on demand (``check``): pods matching a label selector
exist (kured's ``--blocking-pod-selector``), a Prometheus query has a result
(``--prometheus-query``), an alert fires (``--prometheus-url``, less the alerts
``--alert-filter-regexp`` matches, as kured does). ``BlockerWatch`` asks them all from a
thread every ``--blocker-interval`` and hands the sentences of those that fire to the
reconcile loop (``firing``; ``version`` moves whenever they change, and ``on_change``
wakes the loop). A blocker that cannot be evaluated fires (fail safe) and says why; so
does every blocker before its first evaluation.

The sentences are stable while the condition is (no counts, no timestamps), since each
new one is a new hold with its own Event; the details go to the log.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from cluo.errors import CluoError
from cluo.kube.client import KubeClient
from cluo.kube.resources import PODS_PATH, segment
from cluo_coord.health import firing_alerts, query_result_fires
from cluo_coord.prometheus import Prometheus

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0  # s between two evaluations (--blocker-interval)
NOT_FINISHED = "status.phase!=Succeeded,status.phase!=Failed"
POD_SAMPLE = 3  # pods named in the log line of a pod-selector blocker


class Blocker(Protocol):
    @property
    def name(self) -> str:
        """What the blocker watches, as a hold names it."""

    def check(self) -> str | None:
        """None when it does not fire; else the sentence of its hold. Raises CluoError
        (or ValueError) when it cannot tell."""


class PodSelectorBlocker:
    """Pods that match ``selector`` (not finished) exist in ``namespace`` ("": any)."""

    def __init__(self, api: KubeClient, selector: str, namespace: str = "") -> None:
        self._api = api
        self._selector = selector
        self._namespace = namespace

    @property
    def name(self) -> str:
        where = f" in namespace {self._namespace}" if self._namespace else ""
        return f"pods matching {self._selector}{where}"

    def check(self) -> str | None:
        path = (f"/api/v1/namespaces/{segment(self._namespace)}/pods" if self._namespace
                else PODS_PATH)
        body = self._api.call(f"listing the {self.name}", "GET", path, query={
            "labelSelector": self._selector, "fieldSelector": NOT_FINISHED,
            "limit": str(POD_SAMPLE)})
        pods = [f"{(p.get('metadata') or {}).get('namespace')}/"
                f"{(p.get('metadata') or {}).get('name')}" for p in body.get("items") or ()]
        if not pods:
            return None
        log.debug("blocking pods found", extra={"SELECTOR": self._selector,
                                                "PODS": ", ".join(pods)})
        return f"{self.name} exist"


class QueryBlocker:
    """A Prometheus query whose result is not empty."""

    def __init__(self, prometheus: Prometheus, query: str) -> None:
        self._prometheus = prometheus
        self._query = query

    @property
    def name(self) -> str:
        return f"prometheus query {self._query!r}"

    def check(self) -> str | None:
        found = query_result_fires(self._prometheus.query(self._query))
        if found is None:
            return None
        log.debug("blocking query result", extra={"QUERY": self._query, "RESULT": found})
        return f"{self.name} has a result"


class AlertBlocker:
    """Alerts firing in Prometheus, but those whose name ``ignored`` matches."""

    def __init__(self, prometheus: Prometheus, ignored: re.Pattern[str] | None) -> None:
        self._prometheus = prometheus
        self._ignored = ignored

    @property
    def name(self) -> str:
        unless = f" (ignoring /{self._ignored.pattern}/)" if self._ignored else ""
        return f"prometheus alerts{unless}"

    def check(self) -> str | None:
        names = firing_alerts(self._prometheus.alerts(), self._ignored)
        return f"alerts firing: {', '.join(names)}" if names else None


def evaluate(blocker: Blocker) -> str | None:
    """``blocker.check()``, failing safe: a blocker that cannot tell fires, saying why."""
    try:
        return blocker.check()
    except (CluoError, ValueError) as err:
        return f"{blocker.name} cannot be evaluated ({err})"


class BlockerWatch:
    """Evaluates ``blockers`` every ``interval`` seconds in a thread of its own."""

    def __init__(self, blockers: Sequence[Blocker], interval: float = DEFAULT_INTERVAL, *,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._blockers = tuple(blockers)
        self._interval = interval
        self._on_change = on_change
        self._lock = threading.Lock()
        self._firing = tuple(f"{b.name} not evaluated yet" for b in self._blockers)
        self._version = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blockers", daemon=True)

    @property
    def active(self) -> bool:
        return bool(self._blockers)

    def firing(self) -> tuple[str, ...]:
        with self._lock:
            return self._firing

    @property
    def version(self) -> int:
        """Moves whenever ``firing()`` changes."""
        with self._lock:
            return self._version

    def check_now(self) -> bool:
        """Evaluate every blocker once; returns whether what fires changed."""
        found = tuple(f for f in (evaluate(b) for b in self._blockers) if f is not None)
        with self._lock:
            before = self._firing
            if found == before:
                return False
            self._firing = found
            self._version += 1
        for sentence in found:
            if sentence not in before:
                log.warning("blocker fires", extra={"BLOCKER": sentence})
        for sentence in before:
            if sentence not in found:
                log.info("blocker no longer fires", extra={"BLOCKER": sentence})
        self._on_change()
        return True

    def start(self) -> None:
        if self._blockers:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            self._stop.wait(self._interval)
