"""Node reads, writes, watches and events through the Kubernetes API.

Every write touches only the fields it names: annotations and labels go out as a JSON
merge patch (a key set to ``None`` is deleted, every other key is left alone), cordoning
patches ``spec.unschedulable`` only. A change that depends on what the node said
(``update``) carries the resourceVersion it was computed from, so the API server refuses
it (409) if anyone wrote in between; it is then recomputed from a fresh read. ``patch``
writes metadata and spec.unschedulable in one request, so a mark and the cordon it
stands for (or an uncordon and the mark's removal) land together or not at all.

Objects are read and written as plain JSON (``kube.client``), so a newer API server's
unknown fields can neither break parsing nor be dropped on a write. A Node object is
parsed in one place, ``NodeSnapshot.from_object``: the agent reads its node as one, the
coordinator builds its planner views from them. The calls are synchronous; the async
agent runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from cluo.errors import KubeError
from cluo.kube.client import REQUEST_ERRORS, Closing, KubeClient, kube_error
from cluo.kube.objects import api_time, seconds_time
from cluo.kube.resources import (
    CONNECT_TIMEOUT,
    EVENT_NAMESPACE,
    MERGE_PATCH,
    NODES_PATH,
    REQUEST_TIMEOUT,
    WATCH_TIMEOUT_SECONDS,
    Timeout,
    events_path,
    node_path,
)
from cluo.kube.watch import Watch
from cluo.protocol import Keys, NodeProtocolState

__all__ = [
    "EVENT_NAMESPACE",
    "KubeNodes",
    "NodeApi",
    "NodeChange",
    "NodeEvent",
    "NodeSnapshot",
    "NodeWatch",
    "node_patch",
]

log = logging.getLogger(__name__)

EVENT_MESSAGE_LIMIT = 1024
DEFAULT_UPDATE_ATTEMPTS = 5

EventType = Literal["Normal", "Warning"]


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class NodeSnapshot:
    """What cluo reads from one Node object at one resourceVersion.

    ``ready``: the Ready condition is "True"; ``ready_since``: its
    ``lastTransitionTime`` while it is (None otherwise). ``boot_id``: the
    kubelet-reported ``status.nodeInfo.bootID`` ("" when not reported). ``state``: the
    annotations and labels read as the cluo protocol (with the adapter's key prefix).
    """

    name: str
    uid: str
    resource_version: str
    annotations: Mapping[str, str]
    labels: Mapping[str, str]
    unschedulable: bool
    ready: bool
    boot_id: str
    state: NodeProtocolState = field(default_factory=NodeProtocolState)
    ready_since: datetime | None = None

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], keys: Keys) -> NodeSnapshot:
        """Read a Node object as the API server sends it (JSON, camelCase keys)."""
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
        labels = {str(k): str(v) for k, v in (metadata.get("labels") or {}).items()}
        ready, ready_since = False, None
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Ready":
                ready = condition.get("status") == "True"
                ready_since = api_time(condition.get("lastTransitionTime")) if ready else None
        return cls(
            name=str(metadata.get("name") or ""),
            uid=str(metadata.get("uid") or ""),
            resource_version=str(metadata.get("resourceVersion") or ""),
            annotations=_frozen(annotations),
            labels=_frozen(labels),
            unschedulable=bool(spec.get("unschedulable")),
            ready=ready,
            boot_id=str((status.get("nodeInfo") or {}).get("bootID") or ""),
            state=NodeProtocolState.from_metadata(keys, annotations, labels),
            ready_since=ready_since,
        )


@dataclass(frozen=True)
class NodeChange:
    """A change to a node: annotation and label values (None deletes), and cordon state."""

    annotations: Mapping[str, str | None] = field(default_factory=dict)
    labels: Mapping[str, str | None] = field(default_factory=dict)
    unschedulable: bool | None = None  # None: leave spec.unschedulable alone

    def needed(self, node: NodeSnapshot) -> bool:
        """Whether writing this change to ``node`` would change anything."""
        return (
            any(node.annotations.get(k) != v for k, v in self.annotations.items())
            or any(node.labels.get(k) != v for k, v in self.labels.items())
            or (self.unschedulable is not None and self.unschedulable != node.unschedulable)
        )


def node_patch(
    *,
    annotations: Mapping[str, str | None] | None = None,
    labels: Mapping[str, str | None] | None = None,
    unschedulable: bool | None = None,
    resource_version: str | None = None,
) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) that touches only the given keys.

    A value of None deletes the key. With ``resource_version`` the patch is also a
    precondition: the API server answers 409 Conflict if the node changed since then.
    """
    for what, values in (("annotation", annotations), ("label", labels)):
        for key, value in (values or {}).items():
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} {key!r} must be a string or None, not {value!r}")
    metadata: dict[str, Any] = {}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if labels:
        metadata["labels"] = dict(labels)
    if resource_version:
        metadata["resourceVersion"] = resource_version
    patch: dict[str, Any] = {}
    if metadata:
        patch["metadata"] = metadata
    if unschedulable is not None:
        patch["spec"] = {"unschedulable": unschedulable}
    return patch


class NodeEvent(NamedTuple):
    """One watch event: "ADDED", "MODIFIED" or "DELETED", and the node as it then was."""

    type: str
    node: NodeSnapshot


class NodeWatchStream(Protocol):
    """A running watch: iterate for events; ``resource_version`` is the last one seen."""

    @property
    def resource_version(self) -> str | None: ...

    def __iter__(self) -> Iterator[NodeEvent]: ...

    def close(self) -> None: ...

    def __enter__(self) -> NodeWatchStream: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class NodeApi(Protocol):
    """What the agent and the coordinator need from the API about nodes."""

    def get(self, name: str) -> NodeSnapshot: ...

    def patch_metadata(
        self,
        name: str,
        annotations: Mapping[str, str | None] | None = None,
        labels: Mapping[str, str | None] | None = None,
    ) -> NodeSnapshot: ...

    def patch(self, name: str, change: NodeChange) -> NodeSnapshot: ...

    def update(
        self,
        name: str,
        mutate: Callable[[NodeSnapshot], NodeChange | None],
        *,
        attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    ) -> NodeSnapshot: ...

    def watch(
        self, name: str, resource_version: str | None, timeout_seconds: int
    ) -> NodeWatchStream: ...

    def emit_event(
        self,
        node_name: str,
        reason: str,
        message: str,
        *,
        type: EventType = "Normal",
        component: str = "cluo-agent",
        instance: str | None = None,
    ) -> None: ...


class KubeNodes:
    """``NodeApi`` on a real API server.

    ``field_manager`` names cluo's writes in managedFields; by default the API server
    takes it from the user agent ("cluo-agent", "cluo-coord"; see kube_config).
    """

    def __init__(
        self,
        client: KubeClient,
        keys: Keys,
        *,
        field_manager: str | None = None,
        request_timeout: Timeout = REQUEST_TIMEOUT,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._keys = keys
        self._field_manager = field_manager
        self._timeout = request_timeout
        self._clock = clock

    @property
    def keys(self) -> Keys:
        return self._keys

    def get(self, name: str) -> NodeSnapshot:
        obj = self._client.call(f"reading node {name!r}", "GET", node_path(name),
                                timeout=self._timeout)
        return NodeSnapshot.from_object(obj, self._keys)

    def patch_metadata(
        self,
        name: str,
        annotations: Mapping[str, str | None] | None = None,
        labels: Mapping[str, str | None] | None = None,
    ) -> NodeSnapshot:
        """Set (or, with None, delete) the given annotations and labels; nothing else."""
        return self.patch(name, NodeChange(annotations or {}, labels or {}))

    def set_unschedulable(self, name: str, value: bool) -> NodeSnapshot:
        """Cordon (True) or uncordon (False) the node; patches spec.unschedulable only."""
        return self.patch(name, NodeChange(unschedulable=value))

    def patch(self, name: str, change: NodeChange) -> NodeSnapshot:
        """Write ``change`` as one merge patch, whatever it holds: annotations, labels and
        spec.unschedulable change together or not at all."""
        if change.unschedulable is None:
            action = f"patching annotations and labels of node {name!r}"
        else:
            verb = "cordoning" if change.unschedulable else "uncordoning"
            action = f"{verb} node {name!r}"
        return self._patch(
            name,
            node_patch(annotations=change.annotations, labels=change.labels,
                       unschedulable=change.unschedulable),
            action=action,
        )

    def update(
        self,
        name: str,
        mutate: Callable[[NodeSnapshot], NodeChange | None],
        *,
        attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    ) -> NodeSnapshot:
        """Read the node, compute a change from it, write it if the node has not moved.

        ``mutate`` may be called several times (once per attempt) and must decide from
        the snapshot alone. Returning None, or a change that changes nothing, writes
        nothing. A 409 (someone wrote in between) re-reads and calls ``mutate`` again, up
        to ``attempts`` times. Returns the node as written (or as read, if no write).
        """
        action = f"updating node {name!r}"
        for attempt in range(1, attempts + 1):
            node = self.get(name)
            change = mutate(node)
            if change is None or not change.needed(node):
                return node
            patch = node_patch(
                annotations=change.annotations,
                labels=change.labels,
                unschedulable=change.unschedulable,
                resource_version=node.resource_version,
            )
            try:
                return self._patch(name, patch, action=action)
            except KubeError as err:
                if err.kind != "conflict":
                    raise
                log.info(
                    "node changed since it was read, retrying the update",
                    extra={"NODE": name, "ATTEMPT": attempt, "ATTEMPTS": attempts},
                )
        raise KubeError(
            action, f"gave up after {attempts} attempts: the node kept changing",
            kind="conflict", status=409,
        )

    def watch(
        self, name: str, resource_version: str | None,
        timeout_seconds: int = WATCH_TIMEOUT_SECONDS,
    ) -> NodeWatch:
        """Watch one node from ``resource_version``, or from now if it is None.

        From now, the first event is an ADDED with the whole node: no separate read is
        needed. Iterate the result for events; the iteration ends when the server closes
        the watch after ``timeout_seconds``: watch again from its ``resource_version``.
        ``WatchExpired`` means that version is older than the API server's watch cache
        (after every API server restart, at least): watch again from None.

        A ``get``'s resource_version is the node's last-modified version, not the
        cluster's; right after an API server restart even that is "too old".
        """
        return NodeWatch(
            self._client, self._keys, name, resource_version, timeout_seconds,
            connect_timeout=self._timeout[0],
        )

    def emit_event(
        self,
        node_name: str,
        reason: str,
        message: str,
        *,
        type: EventType = "Normal",
        component: str = "cluo-agent",
        instance: str | None = None,
    ) -> None:
        """Record a core/v1 Event about the node. Never raises: a failure is logged.

        ``component`` reports it (``source.component``, ``reportingComponent``);
        ``instance`` is which one of that component (``reportingInstance``; the agent
        names its node), by default the component itself.
        """
        now = self._clock()
        # The node is referred to as the kubelet refers to it, with its name as UID (no
        # read needed); `kubectl describe node` lists such events (a reference without
        # any UID it does not).
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{node_name}.", "namespace": EVENT_NAMESPACE},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_name,
            },
            "reason": reason,
            "message": message[:EVENT_MESSAGE_LIMIT],
            "type": type,
            "source": {"component": component},
            "firstTimestamp": seconds_time(now),
            "lastTimestamp": seconds_time(now),
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": instance or component,
        }
        try:
            self._client.request("POST", events_path(), body=event, timeout=self._timeout)
        except Exception as err:
            wrapped = (
                kube_error(f"recording event for node {node_name!r}", err)
                if isinstance(err, REQUEST_ERRORS)
                else err
            )
            log.warning(
                "could not record an event",
                extra={
                    "NODE": node_name,
                    "REASON": reason,
                    "ERROR": str(wrapped),
                    "ERROR_KIND": getattr(wrapped, "kind", "unexpected"),
                },
            )

    def patch_object(self, name: str, patch: Mapping[str, Any], *, action: str) -> Any:
        """Apply a JSON merge patch (``node_patch``) to the node; returns the node as the
        API server wrote it (JSON). ``action`` says what the patch does, for errors."""
        return self._client.call(
            action, "PATCH", node_path(name), query={"fieldManager": self._field_manager},
            body=dict(patch), content_type=MERGE_PATCH, timeout=self._timeout,
        )

    def _patch(self, name: str, patch: Mapping[str, Any], *, action: str) -> NodeSnapshot:
        return NodeSnapshot.from_object(self.patch_object(name, patch, action=action), self._keys)


class NodeWatch(Closing):
    """One watch request on one node: a ``Watch`` with a ``metadata.name`` field
    selector, its events read as ``NodeSnapshot``s. Iterate once; ``close()`` stops it
    from any thread."""

    def __init__(
        self,
        client: KubeClient,
        keys: Keys,
        name: str,
        resource_version: str | None,
        timeout_seconds: int,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._keys = keys
        self._watch = Watch(
            client, NODES_PATH, action=f"watching node {name!r}",
            resource_version=resource_version,
            selectors={"fieldSelector": f"metadata.name={name}"},
            timeout_seconds=timeout_seconds, connect_timeout=connect_timeout,
        )

    @property
    def resource_version(self) -> str | None:
        """Where the watch started, then the last version it saw: watch again from it."""
        return self._watch.resource_version

    @property
    def closed(self) -> bool:
        return self._watch.closed

    def close(self) -> None:
        """Stop the watch; an iteration blocked in a read ends quietly."""
        self._watch.close()

    def __iter__(self) -> Iterator[NodeEvent]:
        events = iter(self._watch)  # refuses a second iteration now, not at the first event
        return (NodeEvent(e.type, NodeSnapshot.from_object(e.object, self._keys))
                for e in events)


if TYPE_CHECKING:  # the real adapter satisfies the protocol fakes are written against
    _NODE_API: type[NodeApi] = KubeNodes
