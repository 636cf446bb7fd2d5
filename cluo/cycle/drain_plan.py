"""Which pods a drain evicts, skips, waits for, or cannot move.

The drain adapter lists the pods bound to the node, summarises each one as a
``PodSummary`` and asks ``plan_drain`` what to do. It re-plans from a fresh list on every
pass, so a pod that appears after the cordon (a Pending pod, a new static pod) is seen;
the drain is complete when the plan is ``done``.

The rules follow ``kubectl drain``, minus what needs the API (does the DaemonSet still
exist?) and minus deleting finished pods (they run nothing, so they do not hold up a
reboot):

- a mirror pod (annotation ``kubernetes.io/config.mirror``) is skipped: the kubelet owns
  it and the API cannot evict it;
- a pod whose controller is a DaemonSet is skipped: the DaemonSet would recreate it on
  the cordoned node at once;
- a finished pod (phase Succeeded or Failed) is skipped;
- a pod that is already being deleted is waited for, not evicted again;
- a pod with no controller is evicted only if the options allow it; otherwise it blocks
  the drain with a message saying how to unblock it, since nothing would recreate it
  elsewhere.

This module is pure: it imports no I/O library and reads no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
DEFAULT_GRACE_SECONDS = 30  # spec.terminationGracePeriodSeconds when the pod sets none


@dataclass(frozen=True)
class OwnerRef:
    """One entry of a pod's metadata.ownerReferences."""

    kind: str
    name: str
    controller: bool = False


@dataclass(frozen=True)
class PodSummary:
    """What the drain needs to know about one pod bound to the node."""

    namespace: str
    name: str
    uid: str
    owners: tuple[OwnerRef, ...] = ()
    mirror: bool = False  # has the kubernetes.io/config.mirror annotation
    phase: str = "Running"  # status.phase
    deleting: bool = False  # metadata.deletionTimestamp is set
    grace_seconds: int = DEFAULT_GRACE_SECONDS  # spec.terminationGracePeriodSeconds

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def controller(self) -> OwnerRef | None:
        for owner in self.owners:
            if owner.controller:
                return owner
        return None


@dataclass(frozen=True)
class DrainOptions:
    # Also evict pods that no controller manages (nothing recreates them elsewhere).
    evict_pods_without_controller: bool = False


class SkipReason(enum.Enum):
    MIRROR = "mirror pod (static, owned by the kubelet)"
    DAEMON_SET = "managed by a DaemonSet"
    FINISHED = "finished (Succeeded or Failed)"


class BlockReason(enum.Enum):
    """Why a pod keeps the drain from completing."""

    NO_CONTROLLER = "no-controller"  # not evicted unless the options allow it
    DISRUPTION_BUDGET = "disruption-budget"  # eviction refused (429) by a PodDisruptionBudget
    TERMINATING = "terminating"  # evicted or deleted, not gone yet
    EVICTION_ERROR = "eviction-error"  # the eviction call failed otherwise

    @property
    def permanent(self) -> bool:
        """Waiting does not help: only an admin (or a different option) can unblock it."""
        return self is BlockReason.NO_CONTROLLER


@dataclass(frozen=True)
class PodBlocker:
    """A pod that keeps the drain from completing, and why."""

    namespace: str
    name: str
    reason: BlockReason
    detail: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def describe(self) -> str:
        text = {
            BlockReason.NO_CONTROLLER: "has no controller; delete it, or allow draining "
            "pods without a controller",
            BlockReason.DISRUPTION_BUDGET: "eviction refused by a PodDisruptionBudget",
            BlockReason.TERMINATING: "still terminating",
            BlockReason.EVICTION_ERROR: "eviction failed",
        }[self.reason]
        if self.detail:
            text = f"{text}: {self.detail}"
        return f"{self.ref} ({text})"


@dataclass(frozen=True)
class SkippedPod:
    pod: PodSummary
    reason: SkipReason


@dataclass(frozen=True)
class DrainPlan:
    evict: tuple[PodSummary, ...]  # to evict through the Eviction API
    wait_for: tuple[PodSummary, ...]  # already being deleted: wait until gone
    skipped: tuple[SkippedPod, ...]  # stay on the node; do not hold up the reboot
    blocking: tuple[PodBlocker, ...]  # cannot be moved with the current options

    @property
    def done(self) -> bool:
        """Nothing left that must leave the node before it reboots."""
        return not (self.evict or self.wait_for or self.blocking)


def plan_drain(pods: Iterable[PodSummary], options: DrainOptions) -> DrainPlan:
    """Classify the node's pods. ``evict`` is in the order to evict them: the longest
    termination grace period first (a drain cannot end before each pod's eviction plus its
    grace period, so the long ones are started first), then by namespace/name; the other
    outputs are sorted by namespace/name."""
    evict: list[PodSummary] = []
    wait_for: list[PodSummary] = []
    skipped: list[SkippedPod] = []
    blocking: list[PodBlocker] = []
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        controller = pod.controller
        if pod.mirror:
            skipped.append(SkippedPod(pod, SkipReason.MIRROR))
        elif controller is not None and controller.kind == "DaemonSet":
            skipped.append(SkippedPod(pod, SkipReason.DAEMON_SET))
        elif pod.phase in FINISHED_PHASES:
            skipped.append(SkippedPod(pod, SkipReason.FINISHED))
        elif pod.deleting:
            wait_for.append(pod)
        elif controller is None and not options.evict_pods_without_controller:
            blocking.append(PodBlocker(pod.namespace, pod.name, BlockReason.NO_CONTROLLER))
        else:
            evict.append(pod)
    evict.sort(key=lambda p: -p.grace_seconds)  # stable: namespace/name within a grace
    return DrainPlan(tuple(evict), tuple(wait_for), tuple(skipped), tuple(blocking))


def describe_blockers(blockers: Iterable[PodBlocker], limit: int = 10) -> str:
    """One line naming the blocking pods and why, at most ``limit`` of them.

    Sorted, so the same set of blockers always gives the same text (the agent compares
    it with the blocked-reason annotation to write only on change).
    """
    ordered = sorted(set(blockers), key=lambda b: (b.namespace, b.name, b.reason.value))
    shown = "; ".join(blocker.describe() for blocker in ordered[:limit])
    if len(ordered) > limit:
        shown += f"; and {len(ordered) - limit} more"
    return shown
