"""The coordinator's view of the cluster: every Node and every slot Lease, kept by watches.

Two reflectors (``cluo.kube.watch.Reflector``, client-go's pattern) keep raw objects in
memory: one lists then watches the Nodes (optionally through a label selector), the
other the Leases of the coordinator's namespace (slot Leases, and the leader Lease that
carries the global pause). A watch that expires (410) or fails is re-listed, after a
backoff on errors; with a ``resync_period`` (0: never, the default) a full re-list
also runs that often as a safety net.
Every change calls ``on_change`` so the driver plans again at once. Node views are built
from the one Node parser, ``NodeSnapshot.from_object``.

Objects the coordinator itself wrote go into the cache straight from the write's
response (``put_node``, ``put_slot``), so the next plan sees them without waiting for
the watch; an object never goes back to an older resourceVersion.

``ClusterWriter`` holds the node writes: JSON merge patches carrying the
resourceVersion the planner saw (compare-and-swap), the uncached node read that stands
in for a write that would change nothing (``check_node``), and the uncached slot read
that guards every ``reboot-ok=true`` (planner rule 3).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo.kube.nodes import KubeNodes, NodeSnapshot, node_patch
from cluo.kube.objects import Obj, name_of, newer_or_same, version_of
from cluo.kube.resources import NODES_PATH, leases_path, node_path
from cluo.kube.watch import ObjectStore, Reflector
from cluo.protocol import (
    LEADER_LEASE_NAME,
    SLOT_LEASE_LABEL,
    Keys,
    MetadataPatch,
)
from cluo_coord.brake import RollState
from cluo_coord.leases import KubeSlots, slot_from_object
from cluo_coord.planner import NodeIndex, NodeView, SlotLease, reboot_needed_since

# How long a slot Lease this coordinator wrote overrides the watched one: the watch
# delivers it well before; a Lease deleted meanwhile reappears for at most this long.
WRITTEN_SLOT_TTL = 10.0


def node_view(obj: Mapping[str, Any], keys: Keys, coordinator_node: str = "") -> NodeView:
    """A planner NodeView from a Node object as the API server sends it."""
    node = NodeSnapshot.from_object(obj, keys)
    return NodeView(
        name=node.name,
        state=node.state,
        resource_version=node.resource_version,
        uid=node.uid,
        ready=node.ready,
        ready_since=node.ready_since,
        boot_id=node.boot_id,
        annotations=node.annotations,
        unschedulable=node.unschedulable,
        runs_coordinator=bool(coordinator_node) and node.name == coordinator_node,
        reboot_needed_since=reboot_needed_since(node.state),
        os_version=node.labels.get(keys.version, ""),
        labels=node.labels,
        deleting=bool((obj.get("metadata") or {}).get("deletionTimestamp")),
    )


NodeChange = tuple[str, NodeView | None, NodeView | None]  # name, before, after (None: absent)


class NodeViewCache:
    """Planner NodeViews, each built once per Node resourceVersion, kept in name order.

    A Node object at a given resourceVersion never changes (every write gives it a new
    one), so the view built from it is kept until the version moves. ``update()`` looks
    only at the nodes a watch changed; ``rebuild()`` (after a fresh list) looks at every
    node but still rebuilds only those whose version moved. Either way the sorted tuple is
    re-sorted only when nodes come or go, and it is the planner's ``NodeIndex``, derived
    from the previous one and the views that changed. An object without a resourceVersion
    (never seen from an API server) is always rebuilt.
    """

    def __init__(self, keys: Keys, coordinator_node: str = "") -> None:
        self._keys = keys
        self._coordinator_node = coordinator_node
        self._views: dict[str, NodeView] = {}
        self._ordered: list[NodeView] = []
        self._position: dict[str, int] = {}
        self._frozen = NodeIndex.of(())
        self.built = 0  # views built so far (tests and profiles read it)
        # What the last update() or rebuild() changed: (name, view before, view after).
        self.changes: tuple[NodeChange, ...] = ()

    @property
    def views(self) -> NodeIndex:
        """Every node's view, sorted by name, indexed for the planner."""
        return self._frozen

    def rebuild(self, objects: Iterable[Mapping[str, Any]]) -> NodeIndex:
        """All current Nodes (a fresh list): forget the ones missing from ``objects``."""
        listed: dict[str, Mapping[str, Any] | None] = {name_of(obj): obj for obj in objects}
        for name in self._views:
            listed.setdefault(name, None)
        return self.update(listed)

    def update(self, changed: Mapping[str, Mapping[str, Any] | None]) -> NodeIndex:
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
            version = version_of(obj)
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
            self._frozen = self._frozen.updated(self._ordered, self.changes)
        return self._frozen


class _NodeStore(ObjectStore):
    """The Node store; it also remembers which names changed since ``take_changes()``."""

    def __init__(self) -> None:
        super().__init__()
        self._changes_lock = threading.Lock()
        self._changed: set[str] | None = None  # None: any may have (a fresh list)

    def put(self, obj: Obj) -> bool:
        return self._mark(obj, super().put(_trimmed(obj)))

    def delete(self, obj: Obj) -> bool:
        return self._mark(obj, super().delete(obj))

    def kept(self, obj: Obj) -> Obj:
        return _trimmed(obj)

    def replace(self, objects: list[Obj], list_version: str) -> None:
        super().replace(objects, list_version)
        with self._changes_lock:
            self._changed = None

    def _mark(self, obj: Obj, changed: bool) -> bool:
        if changed:
            with self._changes_lock:
                if self._changed is not None:
                    self._changed.add(name_of(obj))
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
        if changed is None:
            return True, self.by_name()
        return False, self.by_name(changed)


def _trimmed(node: Obj) -> Obj:
    """The Node as far as ``node_view`` reads it, all a large cluster should pay for in
    memory: the name, uid, resourceVersion, labels (group selectors, the control-plane
    and version labels), annotations (cluo's and the hook annotations, user-chosen) and
    deletionTimestamp; ``spec.unschedulable``; the Ready condition's status and
    transition time; ``status.nodeInfo.bootID``. Not kept: managedFields, the other
    conditions, capacity, images, addresses, the rest of nodeInfo. Label and annotation
    keys and values are interned (every node repeats the same keys, and most values)."""
    metadata, spec, status = (node.get(part) or {} for part in ("metadata", "spec", "status"))
    kept = {key: metadata[key] for key in _METADATA_KEPT if key in metadata}
    for key in ("labels", "annotations"):
        if isinstance(kept.get(key), dict):
            kept[key] = {_intern(k): _intern(v) for k, v in kept[key].items()}
    trimmed: Obj = {"metadata": kept}
    if "unschedulable" in spec:
        trimmed["spec"] = {"unschedulable": spec["unschedulable"]}
    trimmed["status"] = {
        "conditions": [{key: condition[key] for key in _CONDITION_KEPT if key in condition}
                       for condition in status.get("conditions") or []
                       if isinstance(condition, dict) and condition.get("type") == "Ready"],
        "nodeInfo": {"bootID": (status.get("nodeInfo") or {}).get("bootID")},
    }
    return trimmed


_METADATA_KEPT = ("name", "uid", "resourceVersion", "labels", "annotations",
                  "deletionTimestamp")
_CONDITION_KEPT = ("type", "status", "lastTransitionTime")


def _intern(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class ClusterSnapshot:
    """The planner's input. ``expires_in``: seconds after which the cache may read
    differently with no watch event (a slot Lease this coordinator wrote stops overriding
    the watched one, see ``WRITTEN_SLOT_TTL``); None when only an event can change it.
    ``node_changes``: the node views that changed since the previous snapshot (name,
    before, after), None when unknown (after a fresh list). ``roll``: the pause, who
    paused and why, and the brake's record, as the leader Lease carries them
    (``paused_by_admin`` is ``roll.paused``, whoever paused)."""

    nodes: tuple[NodeView, ...]
    slots: tuple[SlotLease, ...]
    paused_by_admin: bool
    expires_in: float | None = None
    node_changes: tuple[NodeChange, ...] | None = None
    roll: RollState = field(default_factory=RollState)


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
        resync_period: float = 0.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._keys = keys
        self._coordinator_node = coordinator_node
        self._nodes = _NodeStore()
        self._leases = ObjectStore()
        self._views = NodeViewCache(keys, coordinator_node)
        self._written_lock = threading.Lock()
        self._written: dict[tuple[str, int], tuple[SlotLease, float]] = {}

        self._on_change = on_change
        self._roll_seen: RollState | None = None
        self._reflectors = (
            Reflector("nodes", api, NODES_PATH, self._nodes, lambda _: on_change(),
                      resync_period=resync_period, label_selector=node_selector),
            Reflector(f"leases in {namespace}", api, leases_path(namespace), self._leases,
                      self._lease_changed, resync_period=resync_period),
        )

    def _lease_changed(self, obj: Obj | None) -> None:
        """Wake the driver, except for leader Lease renewals that leave the roll state
        (the pause, the brake's record) alone."""
        metadata = (obj or {}).get("metadata") or {}
        if metadata.get("name") == LEADER_LEASE_NAME:
            roll = RollState.from_annotations(metadata.get("annotations"))
            if roll == self._roll_seen:
                return
            self._roll_seen = roll
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

    def node(self, name: str) -> Obj | None:
        """The cached Node (as ``_trimmed`` keeps it: its labels and annotations whole)."""
        return self._nodes.by_name([name])[name]

    def put_lease(self, obj: Obj) -> None:
        """A Lease as this coordinator just wrote it (the leader Lease's roll state)."""
        self._leases.put(obj)

    def put_slot(self, slot: SlotLease) -> None:
        """A slot Lease as this coordinator just wrote it (until the watch catches up)."""
        with self._written_lock:
            self._written[slot.group, slot.index] = (slot, time.monotonic())

    def snapshot(self) -> ClusterSnapshot:
        """The planner's input; node views are rebuilt only for nodes that changed."""
        complete, changed = self._nodes.take_changes()
        views = (self._views.rebuild(obj for obj in changed.values() if obj is not None)
                 if complete else self._views.update(changed))
        node_changes = None if complete else self._views.changes
        slots: list[SlotLease] = []
        roll = RollState()
        for obj in self._leases.values():
            metadata = obj.get("metadata") or {}
            if metadata.get("name") == LEADER_LEASE_NAME:
                roll = RollState.from_annotations(metadata.get("annotations"))
                continue
            if SLOT_LEASE_LABEL not in (metadata.get("labels") or {}):
                continue
            slot = slot_from_object(obj)
            if slot is not None:
                slots.append(slot)
        slots, expires_in = self._with_written(slots)
        return ClusterSnapshot(
            views,
            tuple(sorted(slots, key=lambda s: (s.group, s.index))),
            roll.paused,
            expires_in,
            node_changes,
            roll,
        )

    def _with_written(self, watched: list[SlotLease]) -> tuple[list[SlotLease], float | None]:
        """The watched slots with the ones written since; and when the first override ends."""
        by_index = {(slot.group, slot.index): slot for slot in watched}
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
        self._nodes = KubeNodes(api, keys)
        self._slots = KubeSlots(api, namespace)

    def patch_node(self, name: str, patch: MetadataPatch, resource_version: str, *,
                   unschedulable: bool | None = None) -> Obj:
        """Apply ``patch`` (and ``unschedulable`` to spec.unschedulable, unless None) in
        one write, only if the node is still at ``resource_version`` (else 409)."""
        body = node_patch(
            annotations=patch.annotations, labels=patch.labels,
            unschedulable=unschedulable, resource_version=resource_version,
        )
        obj = self._nodes.patch_object(
            name, body, action=f"patching node {name!r} at resourceVersion {resource_version}")
        assert isinstance(obj, dict)
        return obj

    def check_node(self, name: str, resource_version: str) -> None:
        """Fail as ``patch_node`` would if the node is no longer at ``resource_version``
        (a conflict, 409; not found, 404), by an uncached read (a quorum read from etcd):
        the check a write that would change nothing gives, without the write."""
        action = f"checking node {name!r} at resourceVersion {resource_version}"
        found = version_of(self._api.call(action, "GET", node_path(name)))
        if found != resource_version:
            raise KubeError(action, f"the node is at resourceVersion {found}",
                            kind="conflict", status=409, reason="Conflict")

    def read_lease(self, name: str) -> Obj | None:
        """One Lease, read from the API server (not the cache); None if missing."""
        return self._slots.read(name)

    def node_exists(self, name: str) -> bool:
        """Whether the API server (not the cache) has a Node of that name."""
        try:
            self._api.call(f"reading node {name!r}", "GET", node_path(name))
        except KubeError as err:
            if err.kind == "not_found":
                return False
            raise
        return True
