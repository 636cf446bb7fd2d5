"""The coordinator's view of the cluster: every Node and every slot Lease, kept by watches.

Two reflectors (client-go's pattern) keep raw objects in memory: one lists then watches
the Nodes (optionally through a label selector), the other the Leases of the
coordinator's namespace (slot Leases, and the leader Lease that carries the global
pause). A watch that expires (410) or fails is re-listed, after a backoff on errors; a
full re-list also runs every ``resync_period`` as a safety net. Every change calls
``on_change`` so the driver plans again at once.

Objects the coordinator itself wrote go into the cache straight from the write's
response (``put_node``, ``put_slot``), so the next plan sees them without waiting for
the watch; an object never goes back to an older resourceVersion.

``ClusterWriter`` holds the node writes: JSON merge patches carrying the
resourceVersion the planner saw (compare-and-swap), and the uncached slot read that
guards every ``reboot-ok=true`` (planner rule 3).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from cluo_coord.leases import slot_from_object
from cluo_coord.planner import MetadataPatch, NodeView, SlotLease, reboot_needed_since
from cluo_host.errors import KubeError, WatchExpired, kind_for_status, kube_error
from cluo_host.kube_nodes import MERGE_PATCH, TRANSPORT_ERRORS, node_patch, read_json
from cluo_host.protocol import (
    LEADER_LEASE_NAME,
    PAUSED_ANNOTATION,
    SLOT_LEASE_LABEL,
    Keys,
    NodeProtocolState,
)

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (5.0, 30.0)
WATCH_TIMEOUT_SECONDS = 300
WATCH_READ_GRACE = 30.0
BACKOFF_START = 0.2
BACKOFF_MAX = 30.0
# How long a slot Lease this coordinator wrote overrides the watched one: the watch
# delivers it well before; a Lease deleted meanwhile reappears for at most this long.
WRITTEN_SLOT_TTL = 10.0

Obj = dict[str, Any]


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def newer_or_same(candidate: str, current: str) -> bool:
    """Whether an object at ``candidate`` may replace the cached one at ``current``.

    Resource versions are etcd revisions in every API server in use; should one not be a
    number, the later arrival wins.
    """
    try:
        return int(candidate) >= int(current)
    except ValueError:
        return True


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def node_view(obj: Mapping[str, Any], keys: Keys, coordinator_node: str = "") -> NodeView:
    """A planner NodeView from a Node object as the API server sends it."""
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
    labels = {str(k): str(v) for k, v in (metadata.get("labels") or {}).items()}
    ready, ready_since = False, None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
            ready_since = _time(condition.get("lastTransitionTime")) if ready else None
    state = NodeProtocolState.from_metadata(keys, annotations, labels)
    name = str(metadata.get("name") or "")
    return NodeView(
        name=name,
        state=state,
        resource_version=_version(obj),
        ready=ready,
        ready_since=ready_since,
        boot_id=str((status.get("nodeInfo") or {}).get("bootID") or ""),
        annotations=annotations,
        unschedulable=bool((obj.get("spec") or {}).get("unschedulable")),
        runs_coordinator=bool(coordinator_node) and name == coordinator_node,
        reboot_needed_since=reboot_needed_since(state),
    )


class _Store:
    """Objects by name; an object never goes back to an older resourceVersion."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, Obj] = {}

    def put(self, obj: Obj) -> bool:
        name = str((obj.get("metadata") or {}).get("name") or "")
        with self._lock:
            current = self._objects.get(name)
            if current is not None and not newer_or_same(_version(obj), _version(current)):
                return False
            if current is not None and _version(current) == _version(obj):
                return False
            self._objects[name] = obj
            return True

    def delete(self, obj: Obj) -> bool:
        name = str((obj.get("metadata") or {}).get("name") or "")
        with self._lock:
            return self._objects.pop(name, None) is not None

    def replace(self, objects: list[Obj], list_version: str) -> None:
        """A fresh list: keep only listed objects, unless the cache has a newer one."""
        with self._lock:
            fresh = {str(o["metadata"]["name"]): o for o in objects}
            for name, current in self._objects.items():
                if name in fresh:
                    if not newer_or_same(_version(fresh[name]), _version(current)):
                        fresh[name] = current
                elif not newer_or_same(list_version, _version(current)):
                    fresh[name] = current  # written after the list was taken
            self._objects = fresh

    def values(self) -> list[Obj]:
        with self._lock:
            return list(self._objects.values())


class Reflector:
    """List then watch one collection into a ``_Store``, in its own thread."""

    def __init__(
        self,
        what: str,
        call: Callable[..., Any],
        store: _Store,
        on_change: Callable[[Obj | None], None],
        *,
        resync_period: float,
    ) -> None:
        self.what = what
        self._call = call
        self._store = store
        self._on_change = on_change
        self._resync_period = resync_period
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._relist = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"reflector-{what}", daemon=True)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._close_watch()
        self._thread.join(timeout)

    def relist(self) -> None:
        """Ask for a fresh list now (the watch is restarted from it)."""
        self._relist.set()
        self._close_watch()

    def list_now(self) -> None:
        """List synchronously (in the caller's thread) and replace the store."""
        items, version = self._list()
        self._store.replace(items, version)

    def _close_watch(self) -> None:
        response = self._response
        if response is not None:
            with contextlib.suppress(AttributeError, OSError):
                response.shutdown()

    def _list(self) -> tuple[list[Obj], str]:
        action = f"listing {self.what}"
        try:
            response = self._call(_preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err
        body = read_json(response)
        return list(body.get("items") or []), _version(body)

    def _run(self) -> None:
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                self._relist.clear()
                items, version = self._list()
                self._store.replace(items, version)
                self._synced.set()
                self._on_change(None)
                listed_at = time.monotonic()
                while not self._stop.is_set() and not self._relist.is_set():
                    if time.monotonic() - listed_at > self._resync_period:
                        break
                    version = self._watch(version)
                    backoff = BACKOFF_START
            except WatchExpired:
                log.info("watch expired, listing again", extra={"WHAT": self.what})
            except KubeError as err:
                log.warning("list or watch failed, retrying", extra={
                    "WHAT": self.what, "ERROR": str(err), "ERROR_KIND": err.kind,
                    "RETRY_IN": round(backoff, 2)})
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as err:
                log.exception("reflector failed unexpectedly", extra={
                    "WHAT": self.what, "ERROR": repr(err)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _watch(self, version: str) -> str:
        """One watch request from ``version``; returns the version to continue from."""
        action = f"watching {self.what}"
        try:
            self._response = self._call(
                watch=True, resource_version=version, allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT_SECONDS, _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_TIMEOUT_SECONDS + WATCH_READ_GRACE),
            )
        except ApiException as err:
            if err.status == 410:
                raise WatchExpired(action, "resourceVersion too old", version) from err
            raise kube_error(action, err) from err
        except TRANSPORT_ERRORS as err:
            raise kube_error(action, err) from err
        try:
            for event in self._events(action):
                kind = str(event.get("type") or "")
                obj = event.get("object") or {}
                version = _version(obj) or version
                if kind == "BOOKMARK":
                    continue
                changed = self._store.delete(obj) if kind == "DELETED" else self._store.put(obj)
                if changed:
                    self._on_change(obj)
        except (ApiException, *TRANSPORT_ERRORS) as err:
            if self._stop.is_set() or self._relist.is_set():
                return version
            raise kube_error(action, err) from err
        finally:
            response, self._response = self._response, None
            if response is not None:
                response.close()
                response.release_conn()
        return version

    def _events(self, action: str) -> Iterator[Obj]:
        for line in iter_resp_lines(self._response):  # type: ignore[no-untyped-call]
            if self._stop.is_set() or self._relist.is_set():
                return
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as err:
                raise KubeError(action, "malformed watch event", kind="unavailable") from err
            if event.get("type") == "ERROR":
                status = event.get("object") or {}
                code = int(status.get("code") or 0)
                if code == 410:
                    raise WatchExpired(action, str(status.get("message") or ""), None)
                raise KubeError(action, str(status.get("message") or ""),
                                kind=kind_for_status(code), status=code)
            yield event


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[NodeView, ...]
    slots: tuple[SlotLease, ...]
    paused_by_admin: bool


class ClusterCache:
    """Nodes and Leases kept by two reflectors; ``snapshot()`` gives the planner's input."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        namespace: str,
        keys: Keys,
        *,
        node_selector: str = "",
        coordinator_node: str = "",
        resync_period: float = 600.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        core = kubernetes.client.CoreV1Api(api)
        coordination = kubernetes.client.CoordinationV1Api(api)
        self._keys = keys
        self._coordinator_node = coordinator_node
        self._nodes = _Store()
        self._leases = _Store()
        self._written_lock = threading.Lock()
        self._written: dict[int, tuple[SlotLease, float]] = {}

        def list_nodes(**kwargs: Any) -> Any:
            if node_selector:
                kwargs["label_selector"] = node_selector
            return core.list_node(**kwargs)

        def list_leases(**kwargs: Any) -> Any:
            return coordination.list_namespaced_lease(namespace, **kwargs)

        self._on_change = on_change
        self._paused_seen: bool | None = None
        self._reflectors = (
            Reflector("nodes", list_nodes, self._nodes, lambda _: on_change(),
                      resync_period=resync_period),
            Reflector(f"leases in {namespace}", list_leases, self._leases,
                      self._lease_changed, resync_period=resync_period),
        )

    def _lease_changed(self, obj: Obj | None) -> None:
        """Wake the driver, except for leader Lease renewals that leave the pause alone."""
        metadata = (obj or {}).get("metadata") or {}
        if metadata.get("name") == LEADER_LEASE_NAME:
            paused = (metadata.get("annotations") or {}).get(PAUSED_ANNOTATION) == "true"
            if paused == self._paused_seen:
                return
            self._paused_seen = paused
        self._on_change()

    @property
    def synced(self) -> bool:
        return all(reflector.synced for reflector in self._reflectors)

    def start(self) -> None:
        for reflector in self._reflectors:
            reflector.start()

    def stop(self) -> None:
        for reflector in self._reflectors:
            reflector.stop()

    def refresh(self) -> None:
        """Re-list both collections now, in the caller's thread (after a conflict)."""
        for reflector in self._reflectors:
            reflector.list_now()

    def put_node(self, obj: Obj) -> None:
        self._nodes.put(obj)

    def put_slot(self, slot: SlotLease) -> None:
        """A slot Lease as this coordinator just wrote it (until the watch catches up)."""
        with self._written_lock:
            self._written[slot.index] = (slot, time.monotonic())

    def snapshot(self) -> ClusterSnapshot:
        views = tuple(
            node_view(obj, self._keys, self._coordinator_node) for obj in self._nodes.values()
        )
        slots: list[SlotLease] = []
        paused = False
        for obj in self._leases.values():
            metadata = obj.get("metadata") or {}
            if metadata.get("name") == LEADER_LEASE_NAME:
                paused = (metadata.get("annotations") or {}).get(PAUSED_ANNOTATION) == "true"
                continue
            if SLOT_LEASE_LABEL not in (metadata.get("labels") or {}):
                continue
            slot = slot_from_object(obj)
            if slot is not None:
                slots.append(slot)
        slots = self._with_written(slots)
        return ClusterSnapshot(
            tuple(sorted(views, key=lambda v: v.name)),
            tuple(sorted(slots, key=lambda s: s.index)),
            paused,
        )


    def _with_written(self, watched: list[SlotLease]) -> list[SlotLease]:
        by_index = {slot.index: slot for slot in watched}
        now = time.monotonic()
        with self._written_lock:
            for index, (slot, at) in list(self._written.items()):
                seen = by_index.get(index)
                caught_up = seen is not None and newer_or_same(
                    seen.resource_version or "0", slot.resource_version or "0")
                if caught_up or now - at > WRITTEN_SLOT_TTL:
                    del self._written[index]
                else:
                    by_index[index] = slot
        return list(by_index.values())


class ClusterWriter:
    """Node writes with compare-and-swap, and uncached Lease reads."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, keys: Keys) -> None:
        self._core = kubernetes.client.CoreV1Api(api)
        self._coordination = kubernetes.client.CoordinationV1Api(api)
        self._namespace = namespace
        self._keys = keys

    def patch_node(self, name: str, patch: MetadataPatch, resource_version: str) -> Obj:
        """Apply ``patch`` only if the node is still at ``resource_version`` (else 409)."""
        action = f"patching node {name!r} at resourceVersion {resource_version}"
        body = node_patch(
            annotations=patch.annotations, labels=patch.labels,
            resource_version=resource_version,
        )
        try:
            response = self._core.patch_node(
                name, body, _content_type=MERGE_PATCH, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (ApiException, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err
        obj = read_json(response)
        assert isinstance(obj, dict)
        return obj

    def read_lease(self, name: str) -> Obj | None:
        """One Lease, read from the API server (not the cache); None if missing."""
        try:
            response = self._coordination.read_namespaced_lease(
                name, self._namespace, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (ApiException, *TRANSPORT_ERRORS) as err:
            error = kube_error(f"reading lease {name!r}", err)
            if error.kind == "not_found":
                return None
            raise error from err
        obj = read_json(response)
        assert isinstance(obj, dict)
        return obj
