"""The health gate's adapter: what a node runs at its grant, and whether it recovered.

``KubeWorkloads`` reads, uncached: the pods bound to a node and the PodDisruptionBudgets
of their namespaces when the node is granted (``record``), and the recorded controllers
and budgets when its cycle is finished (``verdict``). The decisions are
cluo_coord.health's. ``WorkloadGates`` decides *when* to look: only for slot holders back
from their reboot (the only ones a finished cycle can release), at most once every
``recheck`` seconds per holder, so a big cluster's reconciles cost nothing extra. A gate
that cannot be evaluated (an API error, an unreadable record) is closed, and says why. The
record comes from the slot Lease: as this process wrote it when the plan sees the Lease at
the version that write made (no read on the plan's path), else read uncached.

Off the grant's path: while a holder is back from its reboot (its slot is about to be
released), the record of the node queued next is read ahead on a thread of its own
(``prefetch``); the grant that follows the next node's acquisition in one plan (no
before-reboot hooks) uses it if it is at most ``RECORD_MAX_AGE`` old, counted from when
the reading was asked for, and reads it again otherwise (``grant_record``). Pods bound to
the node in that time are missing from its baseline, as any bound between the listing and
the agent's cordon always were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo.kube.resources import PODS_PATH, segment
from cluo_coord.health import (
    GATED_KINDS,
    BudgetFacts,
    BudgetScope,
    ControllerHealth,
    ControllerRef,
    PodFacts,
    WorkloadRecord,
    gate_verdict,
    record_workloads,
)
from cluo_coord.leases import KubeSlots
from cluo_coord.planner import NodeIndex, NodeView, SlotLease

log = logging.getLogger(__name__)

GATE_RECHECK = 3.0  # s between two evaluations of one holder's gate
RECORD_MAX_AGE = 2.0  # s: the oldest read-ahead record a grant uses
RECORD_REFRESH = 1.0  # s: a read-ahead record this old is read again at the next plan
BUDGETS_PATH = "/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets"
# A list served from the watch cache as it stands, not a consistent read (KubeWorkloads.record).
CACHED = {"resourceVersion": "0"}


class KubeWorkloads:
    """Uncached reads of pods, controllers and PodDisruptionBudgets."""

    def __init__(self, api: KubeClient, budgets: BudgetScope) -> None:
        self._api = api
        self._scope = budgets

    def record(self, node: str) -> WorkloadRecord:
        """The gate's baseline for ``node``, read now (right before its grant).

        Both lists are served from the API server's watch cache as it stands
        (``resourceVersion=0``), not as a consistent read: a consistent list of a
        resource that did not change since other writes waits for the cache to be proven
        fresh (etcd's progress notification, about 90 ms on the test bed against 3 ms),
        and that wait sat on every grant's path. The record is a baseline of which
        controllers and budgets to wait for after the reboot, as a read-ahead record up to
        ``RECORD_MAX_AGE`` old already is; a pod bound in the last milliseconds is missed
        either way, as one bound between the listing and the agent's cordon always was."""
        body = self._api.call(f"listing the pods of node {node!r}", "GET", PODS_PATH,
                              query={"fieldSelector": f"spec.nodeName={node}",
                                     **CACHED})
        pods = [PodFacts.from_object(obj) for obj in body.get("items") or ()]
        return record_workloads(node, pods, self._budgets({p.namespace for p in pods
                                                           if p.evicted}))

    def _budgets(self, namespaces: Iterable[str]) -> list[BudgetFacts]:
        if self._scope.selector is None:
            return []
        query = dict(CACHED)
        if self._scope.selector:  # "" selects every budget
            query["labelSelector"] = self._scope.selector
        found = []
        for namespace in sorted(namespaces):
            body = self._api.call(
                f"listing the PodDisruptionBudgets of namespace {namespace!r}", "GET",
                BUDGETS_PATH.format(namespace=segment(namespace)), query=query)
            found += [BudgetFacts.from_object(obj) for obj in body.get("items") or ()]
        return found

    def verdict(self, record: WorkloadRecord) -> str | None:
        """None when everything ``record`` names recovered; else what has not."""
        controllers = {ref: self._controller(ref) for ref in record.controllers}
        budgets: dict[tuple[str, str], int | None] = {}
        for baseline in record.budgets:
            obj = self._get(f"{BUDGETS_PATH.format(namespace=segment(baseline.namespace))}/"
                            f"{segment(baseline.name)}", f"reading {baseline}")
            budgets[(baseline.namespace, baseline.name)] = (
                None if obj is None else BudgetFacts.from_object(obj).disruptions_allowed)
        return gate_verdict(record, controllers, budgets)

    def _controller(self, ref: ControllerRef) -> ControllerHealth | None:
        path = GATED_KINDS[ref.kind].format(namespace=segment(ref.namespace),
                                            name=segment(ref.name))
        obj = self._get(path, f"reading {ref}")
        return None if obj is None else ControllerHealth.from_object(obj)

    def _get(self, path: str, action: str) -> Mapping[str, Any] | None:
        try:
            body = self._api.call(action, "GET", path)
        except KubeError as err:
            if err.kind == "not_found":
                return None  # gone: recovered
            raise
        return body if isinstance(body, dict) else None


class WorkloadGates:
    """Which finished holders' gates are closed (``closed``), and the grant's record."""

    def __init__(self, workloads: KubeWorkloads, slots: KubeSlots, *,
                 recheck: float = GATE_RECHECK,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._workloads = workloads
        self._slots = slots
        self._recheck = recheck
        self._monotonic = monotonic
        # (node, slot, acquired at) -> (when it was evaluated, why closed or None)
        self._verdicts: dict[tuple[str, int, datetime | None], tuple[float, str | None]] = {}
        self._finishing = 0  # holders back from their reboot, at the last ``closed``
        # node -> (when its reading was asked for, the record being read)
        self._ahead: dict[str, tuple[float, Future[WorkloadRecord]]] = {}
        self._reader: ThreadPoolExecutor | None = None

    def record_grant(self, node: str, slot: int, expected_lease_version: str) -> SlotLease:
        """Record ``node``'s workloads on its slot Lease, by compare-and-swap at the
        version the planner saw (the driver's rule 3 check follows, at the new one)."""
        record = self._workloads.record(node)
        written = self._slots.record_workloads(slot, node, expected_lease_version,
                                               record.to_json())
        log.info("workloads recorded for the health gate", extra={
            "NODE": node, "SLOT": slot, "CONTROLLERS": len(record.controllers),
            "PDBS": len(record.budgets)})
        return written

    def prefetch(self, queue: Sequence[str]) -> None:
        """Read ahead the records of the first nodes of ``queue``, one per holder that the
        last ``closed`` found back from its reboot (the slots about to be free): each
        on the reader thread, unless one asked for less than ``RECORD_REFRESH`` ago."""
        now = self._monotonic()
        for node in [node for node, (asked, _) in list(self._ahead.items())
                     if now - asked > RECORD_MAX_AGE]:
            del self._ahead[node]  # too old for any grant
        heads = queue[:self._finishing]
        for node in heads:
            asked = self._ahead.get(node)
            if asked is not None and now - asked[0] < RECORD_REFRESH:
                continue
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="workloads-ahead")
            self._ahead[node] = (now, self._reader.submit(self._workloads.record, node))

    def grant_record(self, node: str) -> str:
        """``node``'s record (JSON) for a grant about to be written: the one read ahead
        if it was asked for at most ``RECORD_MAX_AGE`` ago and was read, else read now."""
        asked = self._ahead.pop(node, None)
        record = None
        if asked is not None and self._monotonic() - asked[0] <= RECORD_MAX_AGE:
            try:
                record = asked[1].result()
            except KubeError as err:
                log.info("reading ahead the workloads failed, reading them again", extra={
                    "NODE": node, "ERROR": str(err)})
        if record is None:
            record = self._workloads.record(node)
        log.info("workloads recorded for the health gate", extra={
            "NODE": node, "CONTROLLERS": len(record.controllers), "PDBS": len(record.budgets),
            "READ_AHEAD": asked is not None})
        return record.to_json()

    def closed(self, nodes: Iterable[NodeView], slots: Iterable[SlotLease]) -> dict[str, str]:
        """Holder -> why its gate is closed, for every holder back from its reboot whose
        workloads have not recovered."""
        views = NodeIndex.of(nodes).by_name  # the cache's index: no pass over the nodes
        now = self._monotonic()
        closed: dict[str, str] = {}
        seen = set()
        self._finishing = 0
        for slot in slots:
            if slot.group:
                continue  # the record is on the holder's global slot Lease, checked there
            view = views.get(slot.holder or "")
            if view is None or not _back(view):
                continue
            self._finishing += 1
            key = (view.name, slot.index, slot.acquired_at)
            seen.add(key)
            checked = self._verdicts.get(key)
            if checked is None or now - checked[0] >= self._recheck:
                checked = (now, self._evaluate(view.name, slot.index, slot.resource_version))
                self._verdicts[key] = checked
            if checked[1] is not None:
                closed[view.name] = "; ".join(filter(None, (closed.get(view.name),
                                                            checked[1])))
        for key in [key for key in self._verdicts if key not in seen]:
            del self._verdicts[key]
        return closed

    def _evaluate(self, node: str, slot: int, resource_version: str | None) -> str | None:
        try:
            # The record as this process wrote it at the Lease version the plan sees, when
            # it did: no read on the plan's path (the release is a compare-and-swap at that
            # version anyway); else read uncached.
            text = self._slots.workloads(slot, resource_version)
            if text is None:
                return None  # granted with the gate off, or by an older coordinator
            record = WorkloadRecord.from_json(text)
            if record.node != node:
                return None  # a record of an earlier holder: this one's grant recorded none
            return self._workloads.verdict(record)
        except ValueError as err:
            return (f"the workload record on reboot slot {slot} is unreadable ({err}); "
                    "remove it to open the gate")
        except KubeError as err:
            return f"the workloads could not be checked: {err}"


def _back(view: NodeView) -> bool:
    """The holder may be at the end of its cycle: rebooted, reported back."""
    return not view.state.reboot_needed and not view.state.reboot_in_progress
