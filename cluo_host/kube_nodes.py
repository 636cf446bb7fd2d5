"""Node reads, writes, watches and events through the Kubernetes API.

Every write touches only the fields it names: annotations and labels go out as a JSON
merge patch (a key set to ``None`` is deleted, every other key is left alone), cordoning
patches ``spec.unschedulable`` only. A change that depends on what the node said
(``update``) carries the resourceVersion it was computed from, so the API server refuses
it (409) if anyone wrote in between; it is then recomputed from a fresh read.

Objects are read as plain JSON rather than through the client's generated models, so a
newer API server's unknown fields can neither break parsing nor be dropped on a write.
The calls are synchronous; the async agent runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn, Protocol

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

from cluo_host.errors import KubeError, WatchExpired, kind_for_status, kube_error
from cluo_host.protocol import Keys, NodeProtocolState

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

EventType = Literal["Normal", "Warning"]
# What a failed request can raise besides ApiException: urllib3 and socket/TLS errors.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)


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


def read_json(response: Any) -> Any:
    """Parse a raw (``_preload_content=False``) response's JSON body and free the connection."""
    try:
        data = response.data
    finally:
        response.release_conn()
    return json.loads(data) if data else {}


class KubeNodes:
    """``NodeApi`` on a real API server.

    ``field_manager`` names cluo's writes in managedFields; by default the API server
    takes it from the user agent ("cluo-agent", "cluo-coord"; see kube_config).
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        keys: Keys,
        *,
        field_manager: str | None = None,
        request_timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
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
            response: Any = self._core.read_node(
                name, _preload_content=False, _request_timeout=self._timeout
            )
            return NodeSnapshot.from_object(read_json(response), self._keys)
        except (ApiException, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err

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
            self._core, self._keys, name, resource_version, timeout_seconds,
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
        event = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(
                generate_name=f"{node_name}.", namespace=EVENT_NAMESPACE
            ),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version="v1", kind="Node", name=node_name, uid=node_name
            ),
            reason=reason,
            message=message[:EVENT_MESSAGE_LIMIT],
            type=type,
            source=kubernetes.client.V1EventSource(component=component),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=component,
            reporting_instance=node_name if component == "cluo-agent" else component,
        )
        try:
            response: Any = self._core.create_namespaced_event(
                EVENT_NAMESPACE, event, _preload_content=False, _request_timeout=self._timeout
            )
            response.release_conn()
        except Exception as err:
            wrapped = (
                kube_error(f"recording event for node {node_name!r}", err)
                if isinstance(err, (ApiException, *TRANSPORT_ERRORS))
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
            response: Any = self._core.patch_node(
                name,
                dict(patch),
                field_manager=self._field_manager,
                _content_type=MERGE_PATCH,
                _preload_content=False,
                _request_timeout=self._timeout,
            )
            return NodeSnapshot.from_object(read_json(response), self._keys)
        except (ApiException, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err


class NodeWatch:
    """One watch request on one node. Iterate once; ``close()`` stops it from any thread."""

    def __init__(
        self,
        core: kubernetes.client.CoreV1Api,
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
        self._core = core
        self._keys = keys
        self._name = name
        self._timeout_seconds = timeout_seconds
        self._connect_timeout = connect_timeout
        self._response: Any = None
        self._started = False
        self._closed = False

    def __enter__(self) -> NodeWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the watch; an iteration blocked in a read ends quietly."""
        self._closed = True
        response = self._response
        if response is not None:
            # Unblocks a read in another thread (urllib3 >= 2.3).
            with contextlib.suppress(AttributeError, OSError):
                response.shutdown()

    def __iter__(self) -> Iterator[NodeEvent]:
        if self._started:
            raise RuntimeError("a NodeWatch can be iterated only once; start a new watch")
        self._started = True
        return self._events()

    def _events(self) -> Iterator[NodeEvent]:
        action = f"watching node {self._name!r}"
        if self._closed:
            return
        try:
            self._response = self._core.list_node(
                field_selector=f"metadata.name={self._name}",
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._timeout_seconds,
                _preload_content=False,
                _request_timeout=(
                    self._connect_timeout, self._timeout_seconds + WATCH_READ_GRACE
                ),
            )
        except ApiException as err:
            if err.status == 410:
                raise WatchExpired(
                    action, "resourceVersion too old", self.resource_version
                ) from err
            raise kube_error(action, err) from err
        except TRANSPORT_ERRORS as err:
            raise kube_error(action, err) from err
        try:
            for line in self._response:
                if not line.strip():
                    continue
                event = json.loads(line)
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
        except (ApiException, *TRANSPORT_ERRORS) as err:
            if self.closed:
                return
            raise kube_error(action, err) from err
        except ValueError as err:  # a cut-off line: the stream broke mid-event
            if self.closed:
                return
            raise KubeError(action, "malformed watch event", kind="unavailable") from err
        finally:
            response, self._response = self._response, None
            response.close()
            response.release_conn()

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
