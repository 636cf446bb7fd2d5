"""Pods bound to a node: list them, evict them (PDBs respected), delete them, check on them.

Pods are summarised as ``drain_plan.PodSummary`` (the drain planner's input), read from
the API server's JSON rather than the client's generated models. Evictions and deletions
carry the pod's UID as a precondition, so a replacement pod that took the same name (a
StatefulSet's) is never hit by a request meant for its predecessor.

The calls are synchronous; the async agent runs them with ``asyncio.to_thread``.

``KubePods`` also lets a drain see its pods go as it happens (``PodDepartures``): a watch
of the node's pods from the drain's last list, which returns once every pod the drain
waits for is gone, instead of the drain polling with lists. The drain still completes only
on a list that finds nothing left; the watch only says when to list.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cluo.cycle.drain_plan import (
    DEFAULT_GRACE_SECONDS,
    FINISHED_PHASES,
    MIRROR_POD_ANNOTATION,
    OwnerRef,
    PodSummary,
)
from cluo.errors import KubeError, WatchExpired, status_details
from cluo.kube.client import REQUEST_ERRORS, TRANSPORT_ERRORS, ApiError, KubeClient, kube_error
from cluo.kube.resources import PODS_PATH, REQUEST_TIMEOUT, Timeout, pod_path
from cluo.kube.watch import Watch

__all__ = [
    "BlockedByBudget",
    "Deleted",
    "DeletionOutcome",
    "Evicted",
    "EvictionOutcome",
    "Gone",
    "KubePods",
    "PodApi",
    "PodDepartures",
    "PodState",
    "Present",
    "pod_summary",
]

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 500
DISRUPTION_BUDGET_CAUSE = "DisruptionBudget"  # policy/v1 DisruptionBudgetCause


@dataclass(frozen=True)
class Evicted:
    """The API server accepted the eviction: the pod is terminating (or already gone)."""


@dataclass(frozen=True)
class Deleted:
    """The API server accepted the deletion: the pod is terminating (or already gone)."""


@dataclass(frozen=True)
class BlockedByBudget:
    """Eviction refused (429) by a PodDisruptionBudget; ``message`` is the server's,
    ``retry_after`` the seconds it asked to wait (Retry-After), if it did."""

    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Gone:
    """The pod (this UID) no longer exists; ``replaced_by`` is the UID of a pod that
    took its name since, if any."""

    replaced_by: str | None = None


@dataclass(frozen=True)
class Present:
    """The pod (this UID) still exists; ``deleting``: its deletion has started."""

    uid: str
    deleting: bool = False


EvictionOutcome = Evicted | BlockedByBudget | Gone
DeletionOutcome = Deleted | Gone
PodState = Gone | Present


class PodApi(Protocol):
    """What the agent's drain needs from the API about pods."""

    def pods_on_node(self, node: str) -> list[PodSummary]: ...

    def evict(
        self, pod: PodSummary, grace_period_seconds: int | None = None
    ) -> EvictionOutcome: ...

    def delete(
        self, pod: PodSummary, grace_period_seconds: int | None = None
    ) -> DeletionOutcome: ...

    def pod_state(self, namespace: str, name: str, uid: str) -> PodState: ...


@runtime_checkable
class PodDepartures(Protocol):
    """A ``PodApi`` that can also wait for pods to go without polling."""

    def await_departures(self, node: str, uids: frozenset[str], timeout: float) -> bool:
        """Block until each pod of ``uids`` has gone (or finished) since the last
        ``pods_on_node(node)``, or a pod was bound to the node since; False after
        ``timeout`` seconds without that. Raises ``CluoError`` if it cannot watch."""
        ...


def pod_summary(obj: Mapping[str, Any]) -> PodSummary:
    """Summarise a Pod object as the API server sends it (JSON, camelCase keys)."""
    metadata = obj.get("metadata") or {}
    owners = tuple(
        OwnerRef(
            kind=str(ref.get("kind") or ""),
            name=str(ref.get("name") or ""),
            controller=bool(ref.get("controller")),
        )
        for ref in metadata.get("ownerReferences") or []
    )
    return PodSummary(
        namespace=str(metadata.get("namespace") or ""),
        name=str(metadata.get("name") or ""),
        uid=str(metadata.get("uid") or ""),
        owners=owners,
        mirror=MIRROR_POD_ANNOTATION in (metadata.get("annotations") or {}),
        phase=str((obj.get("status") or {}).get("phase") or "Pending"),
        deleting=bool(metadata.get("deletionTimestamp")),
        grace_seconds=_grace_seconds((obj.get("spec") or {}).get("terminationGracePeriodSeconds")),
    )


def _grace_seconds(value: object) -> int:
    """spec.terminationGracePeriodSeconds; the API server's default when unset."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return DEFAULT_GRACE_SECONDS


class KubePods:
    """``PodApi`` on a real API server."""

    def __init__(
        self,
        client: KubeClient,
        *,
        request_timeout: Timeout = REQUEST_TIMEOUT,
    ) -> None:
        self._client = client
        self._timeout = request_timeout
        self._listed_at: dict[str, str] = {}  # node -> resourceVersion of its last list

    def pods_on_node(self, node: str) -> list[PodSummary]:
        """Every pod bound to ``node`` (spec.nodeName), in all namespaces."""
        action = f"listing the pods on node {node!r}"
        pods: list[PodSummary] = []
        token: str | None = None
        version = ""
        try:
            while True:
                page = self._client.request("GET", PODS_PATH, query={
                    "fieldSelector": f"spec.nodeName={node}",
                    "limit": LIST_PAGE_SIZE,
                    "continue": token,
                }, timeout=self._timeout)
                pods.extend(pod_summary(item) for item in page.get("items") or [])
                metadata = page.get("metadata") or {}
                version = version or str(metadata.get("resourceVersion") or "")
                token = metadata.get("continue") or None
                if token is None:
                    self._listed_at[node] = version
                    return pods
        except REQUEST_ERRORS as err:
            raise kube_error(action, err) from err

    def await_departures(self, node: str, uids: frozenset[str], timeout: float) -> bool:
        """``PodDepartures``: a watch of the node's pods (the same field selector as the
        list, which is all a node's credential may watch) from its last list."""
        since = self._listed_at.get(node)
        if not since:
            return True  # nothing to watch from: list
        watch = Watch(self._client, PODS_PATH, action=f"watching the pods on node {node!r}",
                      resource_version=since,
                      selectors={"fieldSelector": f"spec.nodeName={node}"},
                      timeout_seconds=max(1, math.ceil(timeout)))
        # Ends the watch at the timeout even if nothing happens (close() works from any thread).
        timer = threading.Timer(timeout, watch.close)
        timer.daemon = True
        timer.start()
        waiting = set(uids)
        try:
            for event in watch:
                metadata = event.object.get("metadata") or {}
                uid = str(metadata.get("uid") or "")
                phase = (event.object.get("status") or {}).get("phase")
                if event.type == "ADDED" and uid not in waiting:
                    return True  # bound to the node after the list: a pod to move
                if event.type == "DELETED" or phase in FINISHED_PHASES:
                    waiting.discard(uid)
                if not waiting:
                    return True
            return False
        except WatchExpired:
            return True  # the list is older than the watch cache: list again
        finally:
            timer.cancel()
            watch.close()

    def evict(self, pod: PodSummary, grace_period_seconds: int | None = None) -> EvictionOutcome:
        """Ask the Eviction API to remove the pod; PodDisruptionBudgets are respected.

        ``Evicted``: accepted. ``BlockedByBudget``: a budget refused it (try again
        later). ``Gone``: the pod had already gone. Anything else raises ``KubeError``
        (a 429 that is not from a budget, API throttling, has kind "blocked").
        """
        action = f"evicting pod {pod.ref!r}"
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
            "deleteOptions": self._delete_options(pod, grace_period_seconds),
        }
        try:
            self._client.request(
                "POST", f"{pod_path(pod.namespace, pod.name)}/eviction", body=body,
                timeout=self._timeout,
            )
        except ApiError as err:
            if err.status == 429:
                details = status_details(err.body)
                if any(reason == DISRUPTION_BUDGET_CAUSE for reason, _ in details.causes) or (
                    "disruption budget" in details.message.lower()
                ):
                    causes = "; ".join(m for _, m in details.causes if m)
                    text = details.message.rstrip(".")
                    text = f"{text}: {causes}" if text and causes else text or causes
                    log.info("eviction blocked by a disruption budget",
                             extra={"POD": pod.ref, "DETAIL": text})
                    return BlockedByBudget(text, err.retry_after)
            return self._settle(action, pod, err)
        except TRANSPORT_ERRORS as err:
            raise kube_error(action, err) from err
        log.info("pod evicted", extra={"POD": pod.ref})
        return Evicted()

    def delete(self, pod: PodSummary, grace_period_seconds: int | None = None) -> DeletionOutcome:
        """Delete the pod outright (the "force" drain policy): budgets are NOT respected."""
        action = f"deleting pod {pod.ref!r}"
        try:
            self._client.request(
                "DELETE", pod_path(pod.namespace, pod.name),
                body=self._delete_options(pod, grace_period_seconds), timeout=self._timeout,
            )
        except ApiError as err:
            return self._settle(action, pod, err)
        except TRANSPORT_ERRORS as err:
            raise kube_error(action, err) from err
        log.info("pod deleted", extra={"POD": pod.ref})
        return Deleted()

    def pod_state(self, namespace: str, name: str, uid: str) -> PodState:
        """Whether the pod with this UID still exists (a same-named successor does not count)."""
        action = f"reading pod '{namespace}/{name}'"
        try:
            obj = self._client.request(
                "GET", pod_path(namespace, name), timeout=self._timeout
            )
        except ApiError as err:
            if err.status == 404:
                return Gone()
            raise kube_error(action, err) from err
        except TRANSPORT_ERRORS as err:
            raise kube_error(action, err) from err
        current = pod_summary(obj)
        if current.uid != uid:
            return Gone(replaced_by=current.uid)
        return Present(uid, deleting=current.deleting)

    def _settle(self, action: str, pod: PodSummary, err: ApiError) -> Gone:
        """A failed evict/delete: the pod already gone is success, anything else raises."""
        if err.status == 404:
            return Gone()
        if err.status == 409:
            # The UID precondition failed: the name now belongs to another pod.
            state = self.pod_state(pod.namespace, pod.name, pod.uid)
            if isinstance(state, Gone):
                return state
        error: KubeError = kube_error(action, err)
        raise error from err

    @staticmethod
    def _delete_options(pod: PodSummary, grace_period_seconds: int | None) -> dict[str, Any]:
        """meta/v1 DeleteOptions; the UID precondition spares a same-named successor."""
        options: dict[str, Any] = {}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if pod.uid:
            options["preconditions"] = {"uid": pod.uid}
        return options


if TYPE_CHECKING:  # the real adapter satisfies the protocol fakes are written against
    _POD_API: type[PodApi] = KubePods
