"""Node reads, writes, watches and events through the Kubernetes API.

Every write touches only the fields it names: annotations and labels go out as a JSON
merge patch (a key set to ``None`` is deleted, every other key is left alone), cordoning
patches ``spec.unschedulable`` only. A change that depends on what the node said
(``update``) carries the resourceVersion it was computed from, so the API server refuses
it (409) if anyone wrote in between; it is then recomputed from a fresh read.

Objects are read and written as plain JSON (``kube_client``), so a newer API server's
unknown fields can neither break parsing nor be dropped on a write. The calls are
synchronous; the async agent runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn, Protocol

from cluo.errors import KubeError, WatchExpired, kind_for_status, kube_error
from cluo.kube.client import (
    TRANSPORT_ERRORS,
    ApiError,
    Closing,
    KubeClient,
    WatchStream,
    segment,
)
from cluo.protocol import Keys, NodeProtocolState

__all__ = [
    "EVENT_NAMESPACE",
    "MERGE_PATCH",
    "KubeNodes",
    "NodeApi",
    "NodeChange",
    "NodeEvent",
    "NodeSnapshot",
    "NodeWatch",
    "WatchExpired",
    "node_patch",
]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# Node events live in "default", as the kubelet's do; `kubectl describe node` finds them.
EVENT_NAMESPACE = "default"
EVENT_MESSAGE_LIMIT = 1024
DEFAULT_REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds for one request
WATCH_READ_GRACE = 30.0  # seconds a watch may stay silent beyond its timeout_seconds
DEFAULT_UPDATE_ATTEMPTS = 5

NODES_PATH = "/api/v1/nodes"
EVENTS_PATH = f"/api/v1/namespaces/{EVENT_NAMESPACE}/events"

EventType = Literal["Normal", "Warning"]


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class NodeSnapshot:
    """What cluo reads from one Node object at one resourceVersion.

    ``ready``: the Ready condition is "True". ``boot_id``: the kubelet-reported
    ``status.nodeInfo.bootID`` ("" when not reported). ``state``: the annotations and
    labels read as the cluo protocol (with the adapter's key prefix).
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

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], keys: Keys) -> NodeSnapshot:
        """Read a Node object as the API server sends it (JSON, camelCase keys)."""
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
        labels = {str(k): str(v) for k, v in (metadata.get("labels") or {}).items()}
        ready = any(
            condition.get("type") == "Ready" and condition.get("status") == "True"
            for condition in status.get("conditions") or []
        )
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

    resource_version: str | None

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

    def set_unschedulable(self, name: str, value: bool) -> NodeSnapshot: ...

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
    ) -> None: ...


def _time(at: datetime) -> str:
    """An RFC 3339 time in UTC, as metav1.Time is written (whole seconds)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        request_timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT,
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
        action = f"reading node {name!r}"
        try:
            obj = self._client.request(
                "GET", f"{NODES_PATH}/{segment(name)}", timeout=self._timeout
            )
        except (ApiError, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err
        return NodeSnapshot.from_object(obj, self._keys)

    def patch_metadata(
        self,
        name: str,
        annotations: Mapping[str, str | None] | None = None,
        labels: Mapping[str, str | None] | None = None,
    ) -> NodeSnapshot:
        """Set (or, with None, delete) the given annotations and labels; nothing else."""
        return self._patch(
            name,
            node_patch(annotations=annotations, labels=labels),
            f"patching annotations and labels of node {name!r}",
        )

    def set_unschedulable(self, name: str, value: bool) -> NodeSnapshot:
        """Cordon (True) or uncordon (False) the node; patches spec.unschedulable only."""
        verb = "cordoning" if value else "uncordoning"
        return self._patch(name, node_patch(unschedulable=value), f"{verb} node {name!r}")

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
                return self._patch(name, patch, action)
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
        self, name: str, resource_version: str | None, timeout_seconds: int = 300
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
    ) -> None:
        """Record a core/v1 Event about the node. Never raises: a failure is logged."""
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
            "firstTimestamp": _time(now),
            "lastTimestamp": _time(now),
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": node_name if component == "cluo-agent" else component,
        }
        try:
            self._client.request("POST", EVENTS_PATH, body=event, timeout=self._timeout)
        except Exception as err:
            wrapped = (
                kube_error(f"recording event for node {node_name!r}", err)
                if isinstance(err, (ApiError, *TRANSPORT_ERRORS))
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

    def _patch(self, name: str, patch: Mapping[str, Any], action: str) -> NodeSnapshot:
        try:
            obj = self._client.request(
                "PATCH", f"{NODES_PATH}/{segment(name)}",
                query={"fieldManager": self._field_manager},
                body=dict(patch), content_type=MERGE_PATCH, timeout=self._timeout,
            )
        except (ApiError, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err
        return NodeSnapshot.from_object(obj, self._keys)


class NodeWatch(Closing):
    """One watch request on one node. Iterate once; ``close()`` stops it from any thread."""

    def __init__(
        self,
        client: KubeClient,
        keys: Keys,
        name: str,
        resource_version: str | None,
        timeout_seconds: int,
        *,
        connect_timeout: float = DEFAULT_REQUEST_TIMEOUT[0],
    ) -> None:
        if timeout_seconds < 1:
            raise ValueError("a watch needs a timeout of at least one second")
        self.resource_version = resource_version or None
        self._client = client
        self._keys = keys
        self._name = name
        self._timeout_seconds = timeout_seconds
        self._connect_timeout = connect_timeout
        self._stream: WatchStream | None = None
        self._started = False
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop the watch; an iteration blocked in a read ends quietly."""
        self._closed.set()
        stream = self._stream
        if stream is not None:
            stream.close()  # unblocks a read in another thread

    def __iter__(self) -> Iterator[NodeEvent]:
        if self._started:
            raise RuntimeError("a NodeWatch can be iterated only once; start a new watch")
        self._started = True
        return self._events()

    def _events(self) -> Iterator[NodeEvent]:
        action = f"watching node {self._name!r}"
        if self._closed.is_set():
            return
        stream = self._stream = self._client.watch(
            NODES_PATH,
            query={
                "fieldSelector": f"metadata.name={self._name}",
                "watch": True,
                "resourceVersion": self.resource_version,
                "allowWatchBookmarks": True,
                "timeoutSeconds": self._timeout_seconds,
            },
            timeout=(self._connect_timeout, self._timeout_seconds + WATCH_READ_GRACE),
        )
        if self._closed.is_set():  # closed while the stream was being made
            stream.close()
        try:
            for event in stream:
                kind = str(event.get("type") or "")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    self._raise_error(action, obj)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.resource_version = str(version)
                if kind == "BOOKMARK":
                    continue
                yield NodeEvent(kind, NodeSnapshot.from_object(obj, self._keys))
        except ApiError as err:
            if err.status == 410:
                raise WatchExpired(
                    action, "resourceVersion too old", self.resource_version
                ) from err
            raise kube_error(action, err) from err
        except TRANSPORT_ERRORS as err:  # a cut-off line too: the stream broke mid-event
            if self._closed.is_set():
                return
            raise kube_error(action, err) from err
        finally:
            self._stream = None
            stream.close()

    def _raise_error(self, action: str, status: Mapping[str, Any]) -> NoReturn:
        code = int(status.get("code") or 0)
        message = str(status.get("message") or "")
        if code == 410:
            raise WatchExpired(action, message, self.resource_version)
        raise KubeError(
            action, message, kind=kind_for_status(code), status=code,
            reason=str(status.get("reason") or ""),
        )


if TYPE_CHECKING:  # the real adapter satisfies the protocol fakes are written against
    _NODE_API: type[NodeApi] = KubeNodes
