"""The health gate and the blockers: what they decide, with no I/O and no clock.

Two things keep a roll from going faster than the cluster recovers (docs/coordinator.md,
"Health gate and blockers"):

- **The health gate.** When a node is granted, the coordinator records which controllers
  own the pods a drain will evict from it (ReplicaSets, StatefulSets,
  ReplicationControllers) and the ``disruptionsAllowed`` of every PodDisruptionBudget
  covering those pods (``record_workloads``; stored on the slot Lease as compact JSON, so
  it survives restarts). Once the node is back, its slot is released only when every
  recorded controller has all its replicas available again and no recorded budget allows
  fewer disruptions than it did before the drain (``gate_verdict``). A controller or
  budget that is gone counts as recovered; a controller scaled down is measured against
  its new size.
- **Blockers.** While one fires, no node gets a new slot (holders finish their cycle):
  pods matching a selector exist, a Prometheus query returns a non-empty result, or an
  alert fires. A blocker that cannot be evaluated fires (fail safe) and says why.

Excluded from the gate: DaemonSet pods (a drain does not evict them, and they come back
with the node), mirror pods (the kubelet's, not evicted), pods no controller owns (not
evicted by default, and nothing would bring them back to check), finished pods, and pods
of other controllers (a Job's pods are not expected to come back Ready).

The planner consults a `Health` (``plan(..., health=...)``); the adapters in
cluo_coord.workloads and cluo_coord.blockers fill it in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
# The controllers whose replicas the gate waits for, and where their API lives.
GATED_KINDS: Mapping[str, str] = {
    "ReplicaSet": "/apis/apps/v1/namespaces/{namespace}/replicasets/{name}",
    "StatefulSet": "/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}",
    "ReplicationController": "/api/v1/namespaces/{namespace}/replicationcontrollers/{name}",
}
NOT_EVICTED_KINDS = frozenset({"DaemonSet"})
HOLD_KINDS_SEPARATOR = ":"  # "blocker: ..." -> the hold's kind, a metric label
HOLD_EVENT_REASON = "GrantsHeld"  # a hold starts (Event about slot Lease 0)
GATE_EVENT_REASON = "WorkloadsNotRecovered"  # a holder's gate closes (Event about its Node)


@dataclass(frozen=True)
class Health:
    """What the planner is told about the cluster's health.

    ``blockers``: one sentence per blocker that fires now (empty: none fires), each
    holding every new grant. ``closed_gates``: node -> why its health gate is closed
    (a holder back from its reboot whose workloads have not recovered); a node missing
    from it has an open gate. The default means "nothing fires, every gate open".
    """

    blockers: tuple[str, ...] = ()
    closed_gates: Mapping[str, str] = field(default_factory=dict)

    def gate(self, node: str) -> str | None:
        """Why ``node``'s gate is closed, or None when it is open."""
        return self.closed_gates.get(node)


ALL_CLEAR = Health()


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True, order=True)
class ControllerRef:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class BudgetBaseline:
    """A PodDisruptionBudget and its ``status.disruptionsAllowed`` before the drain."""

    namespace: str
    name: str
    disruptions_allowed: int

    def __str__(self) -> str:
        return f"PodDisruptionBudget {self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorkloadRecord:
    """What a node ran when it was granted: the gate's baseline (slot Lease annotation)."""

    node: str
    controllers: tuple[ControllerRef, ...] = ()
    budgets: tuple[BudgetBaseline, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.controllers and not self.budgets

    def to_json(self) -> str:
        """Compact: {"node":..,"controllers":["ReplicaSet/ns/name"],"pdbs":{"ns/name":1}}."""
        return json.dumps({
            "node": self.node,
            "controllers": [f"{c.kind}/{c.namespace}/{c.name}" for c in self.controllers],
            "pdbs": {f"{b.namespace}/{b.name}": b.disruptions_allowed for b in self.budgets},
        }, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkloadRecord:
        """Raises ValueError naming what is wrong with ``text``."""
        try:
            data = json.loads(text)
            node = data["node"]
            controllers = tuple(ControllerRef(*_controller(item))
                                for item in data.get("controllers") or ())
            budgets = tuple(BudgetBaseline(*_namespaced(key), int(value))
                            for key, value in (data.get("pdbs") or {}).items())
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"not a workload record: {text[:200]!r} ({err})") from None
        if not isinstance(node, str) or any(c.kind not in GATED_KINDS for c in controllers):
            raise ValueError(f"not a workload record: {text[:200]!r}")
        return cls(node, tuple(sorted(controllers)), tuple(sorted(budgets)))


def _controller(item: str) -> tuple[str, str, str]:
    kind, sep, rest = item.partition("/")
    if not sep:
        raise ValueError(f"{item!r} is not KIND/NAMESPACE/NAME")
    return (kind, *_namespaced(rest))


def _namespaced(key: str) -> tuple[str, str]:
    namespace, sep, name = key.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"{key!r} is not NAMESPACE/NAME")
    return namespace, name


@dataclass(frozen=True)
class PodFacts:
    """What the record needs to know about one pod bound to the node."""

    namespace: str
    labels: Mapping[str, str]
    controller: tuple[str, str] | None  # (kind, name) of its controller owner reference
    mirror: bool = False
    finished: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PodFacts:
        metadata = obj.get("metadata") or {}
        controller = next(((str(ref.get("kind") or ""), str(ref.get("name") or ""))
                           for ref in metadata.get("ownerReferences") or ()
                           if ref.get("controller")), None)
        return cls(
            namespace=str(metadata.get("namespace") or ""),
            labels=dict(metadata.get("labels") or {}),
            controller=controller,
            mirror=MIRROR_POD_ANNOTATION in (metadata.get("annotations") or {}),
            finished=(obj.get("status") or {}).get("phase") in FINISHED_PHASES,
        )

    @property
    def evicted(self) -> bool:
        """Whether a drain evicts this pod (and so the gate waits for it)."""
        return (not self.mirror and not self.finished and self.controller is not None
                and self.controller[0] not in NOT_EVICTED_KINDS)


@dataclass(frozen=True)
class BudgetFacts:
    namespace: str
    name: str
    selector: Mapping[str, Any] | None  # spec.selector, a metav1.LabelSelector
    disruptions_allowed: int

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> BudgetFacts:
        metadata = obj.get("metadata") or {}
        return cls(
            namespace=str(metadata.get("namespace") or ""),
            name=str(metadata.get("name") or ""),
            selector=(obj.get("spec") or {}).get("selector"),
            disruptions_allowed=int((obj.get("status") or {}).get("disruptionsAllowed") or 0),
        )


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: a null selector matches nothing, an empty one
    everything (policy/v1 PodDisruptionBudgets)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.get("matchExpressions") or ():
        key, operator = requirement.get("key"), requirement.get("operator")
        values = set(requirement.get("values") or ())
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False  # an operator this code does not know: no match, as the API's
    return True


def record_workloads(node: str, pods: Iterable[PodFacts],
                     budgets: Iterable[BudgetFacts]) -> WorkloadRecord:
    """The gate's baseline for ``node``: the controllers of the pods a drain evicts from
    it, and the budgets (already filtered by ``--health-gate-pdbs``) covering them."""
    evicted = [pod for pod in pods if pod.evicted]
    controllers = {
        ControllerRef(pod.controller[0], pod.namespace, pod.controller[1])
        for pod in evicted if pod.controller and pod.controller[0] in GATED_KINDS
    }
    baselines = {
        BudgetBaseline(budget.namespace, budget.name, budget.disruptions_allowed)
        for budget in budgets
        if any(pod.namespace == budget.namespace and selector_matches(budget.selector,
                                                                       pod.labels)
               for pod in evicted)
    }
    return WorkloadRecord(node, tuple(sorted(controllers)), tuple(sorted(baselines)))


@dataclass(frozen=True)
class BudgetScope:
    """Which PodDisruptionBudgets the gate watches (``--health-gate-pdbs``): ``all``,
    ``none``, or those whose labels match a label selector (given to the API server)."""

    selector: str | None = ""  # "": all; None: none

    @classmethod
    def parse(cls, value: str) -> BudgetScope:
        text = value.strip()
        if text.lower() == "all":
            return cls("")
        if text.lower() == "none":
            return cls(None)
        if not text:
            raise ValueError("'all', 'none' or a label selector, not an empty value")
        return cls(text)

    def __str__(self) -> str:
        return "none" if self.selector is None else self.selector or "all"


# --------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class ControllerHealth:
    """A controller as read at release time: replicas wanted and available."""

    wanted: int
    available: int

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ControllerHealth:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        replicas = spec.get("replicas")
        return cls(wanted=1 if replicas is None else int(replicas),
                   available=int(status.get("availableReplicas") or 0))


def gate_verdict(
    record: WorkloadRecord,
    controllers: Mapping[ControllerRef, ControllerHealth | None],
    budgets: Mapping[tuple[str, str], int | None],
) -> str | None:
    """None when the gate is open; else one sentence naming what has not recovered.

    ``controllers`` and ``budgets`` (``(namespace, name)`` -> ``disruptionsAllowed``)
    are what the adapter read now; None: gone (recovered). A recorded object the adapter
    did not read counts as not recovered.
    """
    waiting: list[str] = []
    for ref in record.controllers:
        if ref not in controllers:
            waiting.append(f"{ref} not read")
            continue
        found = controllers[ref]
        if found is not None and found.available < found.wanted:
            waiting.append(f"{ref} has {found.available} of {found.wanted} replicas available")
    for baseline in record.budgets:
        key = (baseline.namespace, baseline.name)
        if key not in budgets:
            waiting.append(f"{baseline} not read")
            continue
        allowed = budgets[key]
        if allowed is not None and allowed < baseline.disruptions_allowed:
            waiting.append(f"{baseline} allows {allowed} disruptions, "
                           f"{baseline.disruptions_allowed} before the drain")
    return "; ".join(waiting) or None


# --------------------------------------------------------------------------- blockers


def query_result_fires(body: Mapping[str, Any]) -> str | None:
    """A Prometheus /api/v1/query answer: why it fires (a non-empty result), or None.

    Raises ValueError for an answer that is not a successful query result."""
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    data = body.get("data") or {}
    result = data.get("result")
    kind = data.get("resultType")
    if kind in ("vector", "matrix") and isinstance(result, list):
        if not result:
            return None
        first = result[0].get("metric") or {}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(first.items())) or "{}"
        return f"{len(result)} series (first: {shown})"
    if kind in ("scalar", "string") and isinstance(result, list):
        return f"a {kind} result ({result[-1]})"
    raise ValueError(f"an answer with no result: {body!r}"[:300])


def firing_alerts(body: Mapping[str, Any], ignored: re.Pattern[str] | None) -> tuple[str, ...]:
    """The names of the alerts a Prometheus /api/v1/alerts answer shows firing, but those
    whose name ``ignored`` matches (kured's --alert-filter-regexp). Pending alerts do not
    count. Raises ValueError for an answer that is not an alert list."""
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    alerts = (body.get("data") or {}).get("alerts")
    if not isinstance(alerts, list):
        raise ValueError(f"an answer with no alert list: {body!r}"[:300])
    names = {str((alert.get("labels") or {}).get("alertname") or "")
             for alert in alerts if alert.get("state") == "firing"}
    return tuple(sorted(name for name in names
                        if not (ignored is not None and ignored.search(name))))


def hold_kind(hold: str) -> str:
    """The kind of a ``Plan.holds`` sentence ("blocker: ..." -> "blocker"), for metrics."""
    kind, sep, _ = hold.partition(HOLD_KINDS_SEPARATOR)
    return kind.strip() if sep else "other"


def hold_changes(before: Iterable[str], after: Iterable[str]
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The holds that started and those that ended between two plans, each in order."""
    old, new = tuple(before), tuple(after)
    return (tuple(h for h in new if h not in old), tuple(h for h in old if h not in new))
