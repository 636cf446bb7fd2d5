"""The coordinator's driver on fakes, in one thread, on fake time.

``CoordRig`` builds a real ``Coordinator`` on in-memory fakes of its Protocols: a
``Cluster`` (nodes and slot Leases with resourceVersions; every write is a
compare-and-swap, as on the API server), a cache view of it that can lag behind, and an
event sink. ``FakeTime`` is the driver's wall clock, its monotonic clock and its
``Waiter`` at once: a wait advances fake time instead of sleeping, and things scheduled
with ``at()`` (a watch event, a wall-clock step) happen when a wait passes their time.
``run(until)`` runs the loop in the test's thread until fake time reaches ``until``
seconds, so every test is deterministic and takes milliseconds. Every call the driver
makes is written to a ``Journal`` with the fake time it was made at; tests assert on it.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cluo.errors import KubeError
from cluo.protocol import (
    SLOT_LEASE_LABEL,
    TRUE,
    Keys,
    MetadataPatch,
    NodeProtocolState,
    slot_lease_name,
)
from cluo_coord.cluster import ClusterSnapshot
from cluo_coord.coordinator import (
    IDLE_TICK,
    Blockers,
    ClusterView,
    Coordinator,
    EventSink,
    HealthGates,
    Leadership,
    NodeWriter,
    SlotStore,
    Waiter,
)
from cluo_coord.leases import micro_time
from cluo_coord.metrics import CoordMetrics
from cluo_coord.planner import (
    AcquireSlot,
    MarkStuck,
    NodeView,
    Policy,
    ReleaseSlot,
    SlotLease,
)
from cluo_coord.roll_events import RollNotifier

KEYS = Keys()
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday
START = 1000.0  # the fake monotonic clock at t=0
# Clock reads without fake time moving on, past which the loop is taken to spin (a loop
# that waits reads the clock a few times per turn; 50 plans in a row read it ~300 times).
SPIN_LIMIT = 5000

Obj = dict[str, Any]


class Spinning(AssertionError):
    """The loop ran on and on without ever letting (fake) time pass."""


# ------------------------------------------------------------------------ time and journal


class FakeTime:
    """The driver's clocks and ``Waiter``, on one fake timeline starting at t=0.

    The wall clock moves with the monotonic one unless a test steps it (``step_wall``).
    """

    def __init__(self, wall: datetime) -> None:
        self._now = START
        self._wall_at_start = wall
        self._wall_step = timedelta(0)
        self._set = False
        self._scheduled: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()
        self._reads_without_progress = 0
        self.until = float("inf")
        self.stop = threading.Event()

    @property
    def t(self) -> float:
        """Fake seconds since the start."""
        return self._now - START

    def monotonic(self) -> float:
        self._reads_without_progress += 1
        if self._reads_without_progress > SPIN_LIMIT:
            raise Spinning(f"the loop read the clock {SPIN_LIMIT} times at t={self.t:g}s "
                           "without waiting")
        return self._now

    def wall(self) -> datetime:
        return self._wall_at_start + timedelta(seconds=self.t) + self._wall_step

    def step_wall(self, by: timedelta) -> None:
        """The wall clock jumps (NTP, a VM resumed); the monotonic clock does not."""
        self._wall_step += by

    def at(self, t: float, action: Callable[[], object]) -> None:
        """Do ``action`` once fake time reaches ``t`` (during the loop's wait across it)."""
        heapq.heappush(self._scheduled, (t, next(self._order), action))

    # -- Waiter ----------------------------------------------------------------------

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Up to ``timeout`` fake seconds, or until a scheduled action sets the waiter."""
        if self._set:
            return True
        assert timeout is not None, "the loop must never wait without a timeout"
        target = self._now + timeout
        while self._scheduled and START + self._scheduled[0][0] <= target:
            t, _, action = heapq.heappop(self._scheduled)
            self._advance(max(START + t, self._now))
            action()
            if self.is_set():  # the action woke the driver
                return True
        self._advance(target)
        return False

    def _advance(self, to: float) -> None:
        if to > self._now:
            self._reads_without_progress = 0
        self._now = to
        if self.t >= self.until:
            self.stop.set()


@dataclass(frozen=True)
class Entry:
    t: float  # fake seconds since the start
    call: str  # "plan", "snapshot", "refresh", "patch_node", "check_node", ...
    node: str = ""
    detail: str = ""
    failed: str = ""  # the error kind, when the call raised


@dataclass
class Journal:
    time: FakeTime
    entries: list[Entry] = field(default_factory=list)

    def add(self, call: str, node: str = "", detail: str = "", failed: str = "") -> None:
        self.entries.append(Entry(self.time.t, call, node, detail, failed))

    def of(self, *calls: str, ok: bool | None = None) -> list[Entry]:
        """The entries of these calls; ``ok``: only those that succeeded (True) or failed."""
        return [e for e in self.entries if e.call in calls
                and (ok is None or ok == (not e.failed))]

    def times(self, *calls: str, ok: bool | None = None) -> list[float]:
        return [round(e.t, 6) for e in self.of(*calls, ok=ok)]

    def index(self, entry: Entry) -> int:
        return next(i for i, e in enumerate(self.entries) if e is entry)


# ------------------------------------------------------------------------ the cluster


@dataclass
class FakeNode:
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    version: int = 0
    boot_id: str = ""
    ready: bool = True
    unschedulable: bool = False


def view_of(name: str, node: FakeNode) -> NodeView:
    """The planner's view of a node: Ready for a day (unless it is not), its boot id as the
    kubelet reports it."""
    state = NodeProtocolState.from_metadata(KEYS, node.annotations, node.labels)
    return NodeView(name, state, str(node.version), ready=node.ready,
                    ready_since=T0 - timedelta(days=1) if node.ready else None,
                    boot_id=node.boot_id, annotations=dict(node.annotations),
                    unschedulable=node.unschedulable)


class Cluster:
    """What the API server holds: nodes and slot Leases, one resourceVersion counter.

    ``fail(call, *errors)``: the next calls of ``call`` (a fake's method name) raise
    these errors, one per call, before doing anything. ``after(call, action)``: ``action``
    runs once, right after the next successful ``call``.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.nodes: dict[str, FakeNode] = {}
        self.slots: dict[int, SlotLease] = {}
        self.revision = 0
        self.expires_in: float | None = None  # given once by the next snapshot
        # reboot-ok=true written while no slot Lease named the node (planner rule 3)
        self.unbacked_grants: list[str] = []
        self.hidden_nodes: set[str] = set()  # exist, but outside the coordinator's selector
        self._failures: dict[str, list[Exception]] = {}
        self._after: dict[str, list[Callable[[], object]]] = {}

    def next_version(self) -> str:
        self.revision += 1
        return str(self.revision)

    def add_node(self, name: str, **annotations: str) -> None:
        self.nodes[name] = FakeNode(dict(annotations), {}, 0, f"boot-{name}")
        self.nodes[name].version = int(self.next_version())

    def set_ready(self, name: str, ready: bool) -> None:
        """The kubelet reports the node (Not)Ready."""
        self.nodes[name].ready = ready
        self.nodes[name].version = int(self.next_version())

    def annotate(self, name: str, **annotations: str | None) -> None:
        """A write by someone else (the agent, a hook, an admin)."""
        node = self.nodes[name]
        for key, value in annotations.items():
            if value is None:
                node.annotations.pop(key, None)
            else:
                node.annotations[key] = value
        node.version = int(self.next_version())

    def hold(self, index: int, node: str, *, acquired_at: datetime,
             holder_boot_id: str = "") -> SlotLease:
        slot = SlotLease(index, node, self.next_version(), acquired_at,
                         holder_boot_id or f"boot-{node}")
        self.slots[index] = slot
        return slot

    def fail(self, call: str, *errors: Exception) -> None:
        self._failures.setdefault(call, []).extend(errors)

    def after(self, call: str, action: Callable[[], object]) -> None:
        self._after.setdefault(call, []).append(action)

    def done(self, call: str, node: str = "", detail: str = "") -> None:
        """Journal a successful call, then run what was to happen after it."""
        self.journal.add(call, node, detail)
        for action in self._after.pop(call, []):
            action()

    def check(self, call: str, node: str = "", detail: str = "") -> None:
        """Raise the next failure planned for ``call``, journaled as failed."""
        queued = self._failures.get(call)
        if queued:
            error = queued.pop(0)
            self.journal.add(call, node, detail, failed=getattr(error, "kind", "error"))
            raise error

    def node_object(self, name: str) -> Obj:
        return node_object(name, self.nodes[name])

    def lease_object(self, index: int) -> Obj | None:
        slot = self.slots.get(index)
        if slot is None:
            return None
        annotations = {"cluo.flatcar-linux.net/holder-boot-id": slot.holder_boot_id}
        if slot.released_at is not None:
            annotations["cluo.flatcar-linux.net/released-at"] = micro_time(slot.released_at)
        if slot.stuck:
            annotations["cluo.flatcar-linux.net/stuck"] = "true"
        spec: dict[str, Any] = {}
        if slot.holder:
            spec["holderIdentity"] = slot.holder
        if slot.acquired_at is not None:
            spec["acquireTime"] = micro_time(slot.acquired_at)
        return {"metadata": {"name": slot_lease_name(index), "resourceVersion":
                             slot.resource_version, "labels": {SLOT_LEASE_LABEL: "true"},
                             "annotations": annotations}, "spec": spec}


def node_object(name: str, node: FakeNode) -> Obj:
    return {"metadata": {"name": name, "resourceVersion": str(node.version),
                         "annotations": dict(node.annotations),
                         "labels": dict(node.labels)},
            "spec": {"unschedulable": True} if node.unschedulable else {}}


def conflict(what: str) -> KubeError:
    return KubeError(what, "the object has been modified", kind="conflict", status=409)


def unavailable(what: str) -> KubeError:
    return KubeError(what, "connection refused", kind="unavailable")


class FakeCache:
    """The cluster as the watches delivered it. By default it sees every write at once;
    after ``lag()`` it keeps serving the cluster as it was then (a stale cache) until
    ``refresh()``, except for what the driver puts back itself."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.synced = True
        self._frozen: tuple[dict[str, FakeNode], dict[int, SlotLease]] | None = None
        self._seen: dict[str, NodeView] | None = None

    def lag(self) -> None:
        self._frozen = (copy.deepcopy(self.cluster.nodes), dict(self.cluster.slots))

    def snapshot(self) -> ClusterSnapshot:
        c = self.cluster
        c.journal.add("snapshot")
        expires_in, c.expires_in = c.expires_in, None  # an override expires once
        nodes, slots = self._frozen if self._frozen is not None else (c.nodes, c.slots)
        views = {name: view_of(name, nodes[name]) for name in sorted(nodes)}
        changes = None if self._seen is None else tuple(
            (name, self._seen.get(name), views.get(name))
            for name in sorted(set(self._seen) | set(views))
            if self._seen.get(name) != views.get(name))
        self._seen = views
        return ClusterSnapshot(tuple(views.values()), tuple(slots[i] for i in sorted(slots)),
                               False, expires_in, changes)

    def refresh(self) -> None:
        self.cluster.check("refresh")
        self.cluster.done("refresh")
        self._frozen = None
        self._seen = None  # a fresh list: what changed is unknown

    def put_node(self, obj: Obj) -> None:
        if self._frozen is not None:
            metadata = obj["metadata"]
            self._frozen[0][metadata["name"]] = replace(
                self.cluster.nodes[metadata["name"]],
                annotations=dict(metadata["annotations"]), labels=dict(metadata["labels"]),
                version=int(metadata["resourceVersion"]))

    def put_slot(self, slot: SlotLease) -> None:
        if self._frozen is not None:
            self._frozen[1][slot.index] = slot

    def node(self, name: str) -> Obj | None:
        nodes = self._frozen[0] if self._frozen is not None else self.cluster.nodes
        return None if name not in nodes else node_object(name, nodes[name])


class FakeWriter:
    """Node merge patches with the resourceVersion precondition; uncached Lease reads."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def patch_node(self, name: str, patch: MetadataPatch, resource_version: str, *,
                   unschedulable: bool | None = None) -> Obj:
        c = self.cluster
        detail = describe(patch) + ("" if unschedulable is None
                                    else f" unschedulable={unschedulable}")
        c.check("patch_node", name, detail)
        node = c.nodes.get(name)
        if node is None or str(node.version) != resource_version:
            c.journal.add("patch_node", name, detail, failed="conflict")
            raise conflict(f"patching node {name!r} at resourceVersion {resource_version}")
        for target, changes in ((node.annotations, patch.annotations),
                                (node.labels, patch.labels)):
            for key, value in changes.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        if unschedulable is not None:
            node.unschedulable = unschedulable
        node.version = int(c.next_version())
        if patch.annotations.get(KEYS.reboot_ok) == TRUE and not any(
                slot.holder == name for slot in c.slots.values()):
            c.unbacked_grants.append(name)
        c.done("patch_node", name, detail)
        return c.node_object(name)

    def read_lease(self, name: str) -> Obj | None:
        c = self.cluster
        c.check("read_lease", detail=name)
        c.done("read_lease", detail=name)
        index = int(name.rsplit("-", 1)[1])
        return c.lease_object(index)

    def check_node(self, name: str, resource_version: str) -> None:
        c = self.cluster
        c.check("check_node", name, resource_version)
        node = c.nodes.get(name)
        if node is None:
            c.journal.add("check_node", name, resource_version, failed="not_found")
            raise KubeError(f"checking node {name!r}", "not found", kind="not_found",
                            status=404)
        if str(node.version) != resource_version:
            c.journal.add("check_node", name, resource_version, failed="conflict")
            raise conflict(f"checking node {name!r} at resourceVersion {resource_version}")
        c.done("check_node", name, resource_version)

    def node_exists(self, name: str) -> bool:
        c = self.cluster
        c.check("node_exists", name)
        c.done("node_exists", name)
        return name in c.nodes or name in c.hidden_nodes


def describe(patch: MetadataPatch) -> str:
    """``key=value`` for every key the patch sets (deletions left out), sorted."""
    pairs = {**patch.labels, **patch.annotations}
    return " ".join(sorted(f"{k}={v}" for k, v in pairs.items() if v is not None))


class FakeSlots:
    """Slot Leases, every write a compare-and-swap on the Lease's resourceVersion."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def acquire(self, change: AcquireSlot, workloads: str | None = None) -> SlotLease:
        slot = self._write("acquire", change.node, change.slot, change.expected_resource_version,
                           lambda version: SlotLease(change.slot, change.node, version,
                                                     change.at, change.holder_boot_id))
        if workloads is not None:  # the health gate's record, in the same write
            self.cluster.journal.add("acquire_workloads", change.node, workloads)
        return slot

    def release(self, change: ReleaseSlot) -> SlotLease:
        return self._write("release", change.node, change.slot, change.expected_resource_version,
                           lambda version: SlotLease(change.slot, None, version,
                                                     released_at=change.at))

    def emit_event(self, index: int, reason: str, message: str, *, type: str,
                   component: str) -> None:
        self.cluster.journal.add("slot_event", detail=f"{index} {reason}")

    def mark_stuck(self, change: MarkStuck) -> SlotLease:
        return self._write("mark_stuck", change.node, change.slot,
                           change.expected_resource_version,
                           lambda version: replace(self.cluster.slots[change.slot], stuck=True,
                                                   resource_version=version))

    def _write(self, call: str, node: str, index: int, expected: str | None,
               written: Callable[[str], SlotLease]) -> SlotLease:
        c = self.cluster
        c.check(call, node, str(index))
        current = c.slots.get(index)
        if (current.resource_version if current is not None else None) != expected:
            c.journal.add(call, node, str(index), failed="conflict")
            raise conflict(f"writing reboot slot {index}")
        slot = c.slots[index] = written(c.next_version())
        c.done(call, node, str(index))
        return slot


class FakeEvents:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def emit_event(self, node_name: str, reason: str, message: str, *,
                   type: str = "Normal", component: str = "cluo-agent") -> None:
        self.journal.add("event", node_name, reason)


class RecordingMetrics(CoordMetrics):
    """The real metrics; each plan (one ``observe_cluster`` per plan, once its writes are
    done) is journaled."""

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self._journal = journal

    def observe_cluster(self, needing_reboot: int, in_flight: int,
                        slots: Iterable[SlotLease]) -> None:
        self._journal.add("plan")
        super().observe_cluster(needing_reboot, in_flight, slots)


class Standby:
    """Leadership that is never held; counts the loop's turns (each asks once)."""

    def __init__(self) -> None:
        self.asked = 0

    @property
    def is_leader(self) -> bool:
        self.asked += 1
        return False


class Switch:
    """Leadership a test takes away (``lose()``), e.g. from inside a fake's call."""

    def __init__(self) -> None:
        self.leader = True

    @property
    def is_leader(self) -> bool:
        return self.leader


# ------------------------------------------------------------------------ the rig


class CoordRig:
    """A Coordinator on the fakes above; ``run(until)`` drives it on fake time."""

    def __init__(self, policy: Policy | None = None, *, wall: datetime = T0,
                 leadership: Leadership | None = None, tick: float = IDLE_TICK,
                 notifier: RollNotifier | None = None, gates: HealthGates | None = None,
                 blockers: Blockers | None = None) -> None:
        self.time = FakeTime(wall)
        self.journal = Journal(self.time)
        self.cluster = Cluster(self.journal)
        self.cache = FakeCache(self.cluster)
        self.coordinator = Coordinator(
            self.cache, writer=FakeWriter(self.cluster), slots=FakeSlots(self.cluster),
            nodes=FakeEvents(self.journal), policy=policy or Policy(),
            metrics=RecordingMetrics(self.journal), leadership=leadership,
            clock=self.time.wall, monotonic=self.time.monotonic, waiter=self.time, tick=tick,
            notifier=notifier, gates=gates, blockers=blockers)

    def at(self, t: float, action: Callable[[], object]) -> None:
        self.time.at(t, action)

    def event_at(self, t: float, change: Callable[[Cluster], object]) -> None:
        """At ``t``, someone changes the cluster and the watch wakes the driver."""
        def happen() -> None:
            change(self.cluster)
            self.coordinator.wake()

        self.at(t, happen)

    def run(self, until: float) -> Journal:
        """Run the loop until fake time reaches ``until`` seconds; returns the journal."""
        self.time.until = until
        self.coordinator.run(self.time.stop)
        return self.journal


def patched(entries: Iterable[Entry], key: str) -> list[Entry]:
    """The successful node patches that set ``key`` (``key=value`` in the detail)."""
    return [e for e in entries if e.call == "patch_node" and not e.failed
            and any(pair.startswith(f"{key}=") for pair in e.detail.split())]


def annotations_of(cluster: Cluster, name: str) -> Mapping[str, str]:
    return cluster.nodes[name].annotations


if TYPE_CHECKING:  # the fakes satisfy the driver's protocols
    _CACHE: type[ClusterView] = FakeCache
    _WRITER: type[NodeWriter] = FakeWriter
    _SLOTS: type[SlotStore] = FakeSlots
    _EVENTS: type[EventSink] = FakeEvents
    _WAITER: type[Waiter] = FakeTime
    _STANDBY: type[Leadership] = Standby
    _SWITCH: type[Leadership] = Switch
