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

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cluo.errors import KubeError, WatchExpired, kind_for_status, kube_error
from cluo.kube.client import TRANSPORT_ERRORS, ApiError, KubeClient, WatchStream, segment
from cluo.kube.nodes import MERGE_PATCH, NODES_PATH, node_patch
from cluo.protocol import (
    LEADER_LEASE_NAME,
    PAUSED_ANNOTATION,
    SLOT_LEASE_LABEL,
    Keys,
    NodeProtocolState,
)
from cluo_coord.leases import LEASE_PATH, api_time, slot_from_object
from cluo_coord.planner import MetadataPatch, NodeView, SlotLease, reboot_needed_since

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
            ready_since = api_time(condition.get("lastTransitionTime")) if ready else None
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


NodeChange = tuple[str, NodeView | None, NodeView | None]  # name, before, after (None: absent)


class NodeViewCache:
    """Planner NodeViews, each built once per Node resourceVersion, kept in name order.

    A Node object at a given resourceVersion never changes (every write gives it a new
    one), so the view built from it is kept until the version moves. ``update()`` looks
    only at the nodes a watch changed; ``rebuild()`` (after a fresh list) looks at every
    node but still rebuilds only those whose version moved. Either way the sorted tuple is
    re-sorted only when nodes come or go. An object without a resourceVersion (never seen
    from an API server) is always rebuilt.
    """

    def __init__(self, keys: Keys, coordinator_node: str = "") -> None:
        self._keys = keys
        self._coordinator_node = coordinator_node
        self._views: dict[str, NodeView] = {}
        self._ordered: list[NodeView] = []
        self._position: dict[str, int] = {}
        self._frozen: tuple[NodeView, ...] = ()
        self.built = 0  # views built so far (tests and profiles read it)
        # What the last update() or rebuild() changed: (name, view before, view after).
        self.changes: tuple[NodeChange, ...] = ()

    @property
    def views(self) -> tuple[NodeView, ...]:
        """Every node's view, sorted by name."""
        return self._frozen

    def rebuild(self, objects: Iterable[Mapping[str, Any]]) -> tuple[NodeView, ...]:
        """All current Nodes (a fresh list): forget the ones missing from ``objects``."""
        listed: dict[str, Mapping[str, Any] | None] = {
            str((obj.get("metadata") or {}).get("name") or ""): obj for obj in objects}
        for name in self._views:
            listed.setdefault(name, None)
        return self.update(listed)

    def update(self, changed: Mapping[str, Mapping[str, Any] | None]) -> tuple[NodeView, ...]:
        """Apply the Nodes that changed by name (None: deleted); returns ``views``."""
        moved: list[NodeView] = []
        changes: list[NodeChange] = []
        added_or_gone = False
        for name, obj in changed.items():
            current = self._views.get(name)
            if obj is None:
                if current is not None:
                    del self._views[name]
                    added_or_gone = True
                    changes.append((name, current, None))
                continue
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if current is not None and version and current.resource_version == version:
                continue
            view = node_view(obj, self._keys, self._coordinator_node)
            self.built += 1
            self._views[name] = view
            changes.append((name, current, view))
            if current is None:
                added_or_gone = True
            else:
                moved.append(view)
        self.changes = tuple(changes)
        if added_or_gone:
            self._ordered = [self._views[name] for name in sorted(self._views)]
            self._position = {view.name: i for i, view in enumerate(self._ordered)}
        else:
            for view in moved:
                self._ordered[self._position[view.name]] = view
        if added_or_gone or moved:
            self._frozen = tuple(self._ordered)
        return self._frozen


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


class _NodeStore(_Store):
    """The Node store; it also remembers which names changed since ``take_changes()``."""

    def __init__(self) -> None:
        super().__init__()
        self._changes_lock = threading.Lock()
        self._changed: set[str] | None = None  # None: any may have (a fresh list)

    def put(self, obj: Obj) -> bool:
        return self._mark(obj, super().put(obj))

    def delete(self, obj: Obj) -> bool:
        return self._mark(obj, super().delete(obj))

    def replace(self, objects: list[Obj], list_version: str) -> None:
        super().replace(objects, list_version)
        with self._changes_lock:
            self._changed = None

    def _mark(self, obj: Obj, changed: bool) -> bool:
        if changed:
            with self._changes_lock:
                if self._changed is not None:
                    self._changed.add(_name(obj))
        return changed

    def take_changes(self) -> tuple[bool, dict[str, Obj | None]]:
        """``(complete, objects)``: every object when ``complete`` (after a list), else
        only those changed since the last call (None: deleted).

        A change is marked right after the store took it and the watcher's wake-up comes
        after the mark, so a snapshot that runs in between and misses it is followed by
        one that sees it.
        """
        with self._changes_lock:
            changed, self._changed = self._changed, set()
        with self._lock:
            if changed is None:
                return True, dict(self._objects)
            return False, {name: self._objects.get(name) for name in changed}


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


class Reflector:
    """List then watch one collection into a ``_Store``, in its own thread."""

    def __init__(
        self,
        what: str,
        client: KubeClient,
        path: str,
        store: _Store,
        on_change: Callable[[Obj | None], None],
        *,
        resync_period: float,
        label_selector: str = "",
    ) -> None:
        self.what = what
        self._client = client
        self._path = path
        self._label_selector = label_selector or None
        self._store = store
        self._on_change = on_change
        self._resync_period = resync_period
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._relist = threading.Event()
        self._stream: WatchStream | None = None
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
        stream = self._stream
        if stream is not None:
            stream.close()  # unblocks the watcher's read

    def _list(self) -> tuple[list[Obj], str]:
        action = f"listing {self.what}"
        try:
            body = self._client.request(
                "GET", self._path, query={"labelSelector": self._label_selector},
                timeout=REQUEST_TIMEOUT,
            )
        except (ApiError, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err
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
        stream = self._stream = self._client.watch(self._path, query={
            "labelSelector": self._label_selector,
            "watch": True,
            "resourceVersion": version,
            "allowWatchBookmarks": True,
            "timeoutSeconds": WATCH_TIMEOUT_SECONDS,
        }, timeout=(REQUEST_TIMEOUT[0], WATCH_TIMEOUT_SECONDS + WATCH_READ_GRACE))
        if self._stop.is_set() or self._relist.is_set():  # asked while it was being made
            stream.close()
        try:
            for event in self._events(stream, action):
                kind = str(event.get("type") or "")
                obj = event.get("object") or {}
                version = _version(obj) or version
                if kind == "BOOKMARK":
                    continue
                changed = self._store.delete(obj) if kind == "DELETED" else self._store.put(obj)
                if changed:
                    self._on_change(obj)
        except ApiError as err:
            if err.status == 410:
                raise WatchExpired(action, "resourceVersion too old", version) from err
            raise kube_error(action, err) from err
        except TRANSPORT_ERRORS as err:  # a garbled event too
            if self._stop.is_set() or self._relist.is_set():
                return version
            raise kube_error(action, err) from err
        finally:
            self._stream = None
            stream.close()
        return version

    def _events(self, stream: WatchStream, action: str) -> Iterator[Obj]:
        for event in stream:
            if self._stop.is_set() or self._relist.is_set():
                return
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
    """The planner's input. ``expires_in``: seconds after which the cache may read
    differently with no watch event (a slot Lease this coordinator wrote stops overriding
    the watched one, see ``WRITTEN_SLOT_TTL``); None when only an event can change it.
    ``node_changes``: the node views that changed since the previous snapshot (name,
    before, after), None when unknown (after a fresh list)."""

    nodes: tuple[NodeView, ...]
    slots: tuple[SlotLease, ...]
    paused_by_admin: bool
    expires_in: float | None = None
    node_changes: tuple[NodeChange, ...] | None = None


class ClusterCache:
    """Nodes and Leases kept by two reflectors; ``snapshot()`` gives the planner's input."""

    def __init__(
        self,
        api: KubeClient,
        namespace: str,
        keys: Keys,
        *,
        node_selector: str = "",
        coordinator_node: str = "",
        resync_period: float = 600.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._keys = keys
        self._coordinator_node = coordinator_node
        self._nodes = _NodeStore()
        self._leases = _Store()
        self._views = NodeViewCache(keys, coordinator_node)
        self._written_lock = threading.Lock()
        self._written: dict[int, tuple[SlotLease, float]] = {}

        self._on_change = on_change
        self._paused_seen: bool | None = None
        self._reflectors = (
            Reflector("nodes", api, NODES_PATH, self._nodes, lambda _: on_change(),
                      resync_period=resync_period, label_selector=node_selector),
            Reflector(f"leases in {namespace}", api,
                      LEASE_PATH.format(namespace=segment(namespace)), self._leases,
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
        """The planner's input; node views are rebuilt only for nodes that changed."""
        complete, changed = self._nodes.take_changes()
        views = (self._views.rebuild(obj for obj in changed.values() if obj is not None)
                 if complete else self._views.update(changed))
        node_changes = None if complete else self._views.changes
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
        slots, expires_in = self._with_written(slots)
        return ClusterSnapshot(
            views,
            tuple(sorted(slots, key=lambda s: s.index)),
            paused,
            expires_in,
            node_changes,
        )

    def _with_written(self, watched: list[SlotLease]) -> tuple[list[SlotLease], float | None]:
        """The watched slots with the ones written since; and when the first override ends."""
        by_index = {slot.index: slot for slot in watched}
        now = time.monotonic()
        expires_in: float | None = None
        with self._written_lock:
            for index, (slot, at) in list(self._written.items()):
                seen = by_index.get(index)
                caught_up = seen is not None and newer_or_same(
                    seen.resource_version or "0", slot.resource_version or "0")
                if caught_up or now - at > WRITTEN_SLOT_TTL:
                    del self._written[index]
                else:
                    by_index[index] = slot
                    left = max(at + WRITTEN_SLOT_TTL - now, 0.0)
                    expires_in = left if expires_in is None else min(expires_in, left)
        return list(by_index.values()), expires_in


class ClusterWriter:
    """Node writes with compare-and-swap, and uncached Lease reads."""

    def __init__(self, api: KubeClient, namespace: str, keys: Keys) -> None:
        self._api = api
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
            obj = self._api.request(
                "PATCH", f"{NODES_PATH}/{segment(name)}", body=body, content_type=MERGE_PATCH,
                timeout=REQUEST_TIMEOUT,
            )
        except (ApiError, *TRANSPORT_ERRORS) as err:
            raise kube_error(action, err) from err
        assert isinstance(obj, dict)
        return obj

    def read_lease(self, name: str) -> Obj | None:
        """One Lease, read from the API server (not the cache); None if missing."""
        path = f"{LEASE_PATH.format(namespace=segment(self._namespace))}/{segment(name)}"
        try:
            obj = self._api.request("GET", path, timeout=REQUEST_TIMEOUT)
        except (ApiError, *TRANSPORT_ERRORS) as err:
            error = kube_error(f"reading lease {name!r}", err)
            if error.kind == "not_found":
                return None
            raise error from err
        assert isinstance(obj, dict)
        return obj
