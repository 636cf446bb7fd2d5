"""The reconcile loop plans on events and deadlines only, never by polling.

The loop runs in a thread against an in-memory cluster (fakes of the cache and the
writers) with an injected clock: an idle loop makes no plan, and a rule that depends on
time alone (a reboot timeout, a window opening, a cache entry expiring) still fires on
time, with no watch event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cluo.protocol import TRUE, Keys, NodeProtocolState
from cluo_coord.cluster import ClusterSnapshot
from cluo_coord.coordinator import Coordinator, Leadership
from cluo_coord.metrics import CoordMetrics
from cluo_coord.planner import (
    AcquireSlot,
    MarkStuck,
    MetadataPatch,
    NodeView,
    Policy,
    ReleaseSlot,
    SlotLease,
)
from cluo_coord.windows import parse_windows
from tests.testbed.waiting import assert_stays, wait_for

KEYS = Keys()
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday
TICK = 0.02  # the loop's tick in these tests (production: 2 s)
BEFORE_HOOK = "hooks.example.com/before-check"


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, by: timedelta) -> None:
        with self._lock:
            self.now += by


@dataclass
class Cluster:
    """Nodes (annotations and labels) and slot Leases; the fakes below read and write it."""

    annotations: dict[str, dict[str, str]] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    slots: dict[int, SlotLease] = field(default_factory=dict)
    expires_in: float | None = None
    snapshots: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_node(self, name: str, **annotations: str) -> None:
        self.annotations[name] = dict(annotations)
        self.labels[name] = {}
        self.versions[name] = 1

    def view(self, name: str) -> NodeView:
        state = NodeProtocolState.from_metadata(KEYS, self.annotations[name], self.labels[name])
        return NodeView(name, state, str(self.versions[name]), ready=True,
                        ready_since=T0 - timedelta(days=1), boot_id=f"boot-{name}",
                        annotations=dict(self.annotations[name]))


class FakeCache:
    """Snapshots of the Cluster, with the node views that changed since the last one."""

    synced = True

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._seen: dict[str, NodeView] | None = None

    def snapshot(self) -> ClusterSnapshot:
        c = self.cluster
        with c.lock:
            c.snapshots += 1
            expires_in, c.expires_in = c.expires_in, None  # an override expires once
            views = {name: c.view(name) for name in sorted(c.annotations)}
            changes = None if self._seen is None else tuple(
                (name, self._seen.get(name), views.get(name))
                for name in sorted(set(self._seen) | set(views))
                if self._seen.get(name) != views.get(name))
            self._seen = views
            return ClusterSnapshot(tuple(views.values()),
                                   tuple(c.slots[i] for i in sorted(c.slots)), False,
                                   expires_in, changes)

    def put_node(self, obj: Any) -> None:
        pass

    def put_slot(self, slot: SlotLease) -> None:
        pass

    def refresh(self) -> None:
        pass


class FakeWriter:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def patch_node(self, name: str, patch: MetadataPatch, resource_version: str) -> Any:
        c = self.cluster
        with c.lock:
            assert str(c.versions[name]) == resource_version
            for target, changes in ((c.annotations[name], patch.annotations),
                                    (c.labels[name], patch.labels)):
                for key, value in changes.items():
                    if value is None:
                        target.pop(key, None)
                    else:
                        target[key] = value
            c.versions[name] += 1
        return {}

    def read_lease(self, name: str) -> Any:
        raise AssertionError("no grant in these tests")


class FakeSlots:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.written: list[Any] = []

    def _write(self, change: Any, slot: SlotLease) -> SlotLease:
        with self.cluster.lock:
            self.written.append(change)
            self.cluster.slots[slot.index] = slot
        return slot

    def acquire(self, change: AcquireSlot) -> SlotLease:
        return self._write(change, SlotLease(change.slot, change.node, "s1", change.at,
                                             change.holder_boot_id))

    def mark_stuck(self, change: MarkStuck) -> SlotLease:
        return self._write(change, replace(self.cluster.slots[change.slot], stuck=True,
                                           resource_version="s2"))

    def release(self, change: ReleaseSlot) -> SlotLease:
        return self._write(change, SlotLease(change.slot, None, "s3", released_at=change.at))

    def of(self, kind: type) -> list[Any]:
        with self.cluster.lock:
            return [change for change in self.written if isinstance(change, kind)]


class FakeNodes:
    def emit_event(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class Loop:
    coordinator: Coordinator
    cluster: Cluster
    slots: FakeSlots
    clock: FakeClock

    def plans_settle(self) -> int:
        """Wait until the loop stopped planning; returns how many plans it made."""
        wait_for(self._quiet, 5, "the loop to stop planning")
        return self.coordinator.plans

    def _quiet(self) -> bool:
        before = self.coordinator.plans
        if before == 0:
            return False  # not started planning yet
        threading.Event().wait(TICK * 5)
        return self.coordinator.plans == before


@pytest.fixture
def start_loop() -> Iterator[Callable[..., Loop]]:
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def start(cluster: Cluster, policy: Policy, now: datetime = T0,
              leadership: Leadership | None = None) -> Loop:
        clock = FakeClock(now)
        slots = FakeSlots(cluster)
        coordinator = Coordinator(
            FakeCache(cluster), writer=FakeWriter(cluster), slots=slots,  # type: ignore[arg-type]
            nodes=FakeNodes(), policy=policy, metrics=CoordMetrics(),  # type: ignore[arg-type]
            clock=clock, tick=TICK, leadership=leadership)
        stop = threading.Event()
        thread = threading.Thread(target=coordinator.run, args=(stop,), daemon=True)
        thread.start()
        stops.append((stop, thread))
        return Loop(coordinator, cluster, slots, clock)

    yield start
    for stop, thread in stops:
        stop.set()
        thread.join(5)


def test_idle_loop_makes_no_plan_between_events(start_loop: Callable[..., Loop]) -> None:
    cluster = Cluster()
    cluster.add_node("a")
    loop = start_loop(cluster, Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    plans = loop.plans_settle()
    assert plans == 1
    assert_stays(lambda: loop.coordinator.plans == plans, TICK * 20,
                 "no plan while nothing changes")
    loop.coordinator.wake()  # a watch event that changed nothing
    assert_stays(lambda: loop.coordinator.plans == plans, TICK * 10,
                 "no plan for an event that changed nothing")
    with cluster.lock:
        cluster.annotations["a"][KEYS.reboot_needed] = TRUE
        cluster.versions["a"] += 1
    loop.coordinator.wake()  # what the watch does for that change
    wait_for(lambda: loop.coordinator.plans > plans, 2, "a plan after the event")
    assert loop.slots.of(AcquireSlot)


def test_reboot_timeout_fires_on_time_without_any_event(start_loop: Callable[..., Loop]) -> None:
    cluster = Cluster()
    cluster.add_node("a", **{KEYS.reboot_needed: TRUE, KEYS.reboot_ok: TRUE,
                             KEYS.reboot_in_progress: TRUE})
    cluster.slots[0] = SlotLease(0, "a", "s0", T0 - timedelta(minutes=50), "boot-a")
    loop = start_loop(cluster, Policy(reboot_timeout=timedelta(hours=1)))
    plans = loop.plans_settle()
    assert_stays(lambda: not loop.slots.of(MarkStuck), TICK * 20,
                 "no stuck mark before the timeout")
    assert loop.coordinator.plans == plans

    loop.clock.advance(timedelta(minutes=9, seconds=59))
    assert_stays(lambda: not loop.slots.of(MarkStuck), TICK * 10,
                 "no stuck mark a second before the timeout")
    loop.clock.advance(timedelta(seconds=1))
    wait_for(lambda: loop.slots.of(MarkStuck), 2, "the holder marked stuck at the timeout")
    assert loop.slots.of(MarkStuck) == [MarkStuck(0, "a", "s0")]


def test_new_slots_are_taken_when_the_window_opens_without_any_event(
    start_loop: Callable[..., Loop],
) -> None:
    cluster = Cluster()
    cluster.add_node("a", **{KEYS.reboot_needed: TRUE})
    policy = Policy(windows=parse_windows("Mon 10:00 1h"), before_reboot_annotations=(BEFORE_HOOK,))
    loop = start_loop(cluster, policy, now=datetime(2026, 3, 2, 9, 59, 30, tzinfo=UTC))
    plans = loop.plans_settle()
    assert_stays(lambda: not loop.slots.of(AcquireSlot), TICK * 20,
                 "no slot before the window opens")
    assert loop.coordinator.plans == plans

    loop.clock.advance(timedelta(seconds=30))
    wait_for(lambda: loop.slots.of(AcquireSlot), 2, "a slot once the window opened")
    (acquired,) = loop.slots.of(AcquireSlot)
    assert (acquired.node, acquired.at) == ("a", datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    # The node now waits for its before-reboot hook: only an event can move it on.
    settled = loop.plans_settle()
    assert_stays(lambda: loop.coordinator.plans == settled, TICK * 20,
                 "no plan while the node waits for its hook")


def test_cache_override_expiring_replans_without_any_event(
    start_loop: Callable[..., Loop],
) -> None:
    cluster = Cluster()
    cluster.add_node("a")
    cluster.expires_in = TICK * 3  # a slot this coordinator wrote stops overriding the watch
    loop = start_loop(cluster, Policy())
    wait_for(lambda: loop.coordinator.plans >= 2, 2, "a plan when the snapshot expired")
    plans = loop.plans_settle()
    assert plans == 2


def test_changes_the_planner_ignores_make_no_plan(start_loop: Callable[..., Loop]) -> None:
    cluster = Cluster()
    cluster.add_node("a", **{KEYS.last_checked_time: "1700000000"})
    cluster.add_node("b")
    loop = start_loop(cluster, Policy(before_reboot_annotations=(BEFORE_HOOK,)))
    plans = loop.plans_settle()
    snapshots = cluster.snapshots

    with cluster.lock:  # the agent refreshes last-checked-time: no cycle, no reboot needed
        cluster.annotations["a"][KEYS.last_checked_time] = "1700003600"
        cluster.versions["a"] += 1
    loop.coordinator.wake()
    wait_for(lambda: cluster.snapshots > snapshots, 2, "the loop to look at the change")
    assert_stays(lambda: loop.coordinator.plans == plans, TICK * 10,
                 "no plan for a change the planner ignores")

    with cluster.lock:  # now it needs a reboot: that changes the plan
        cluster.annotations["a"][KEYS.reboot_needed] = TRUE
        cluster.versions["a"] += 1
    loop.coordinator.wake()
    wait_for(lambda: loop.slots.of(AcquireSlot), 2, "a slot for the node needing a reboot")


def test_a_change_to_a_slot_holder_is_planned_even_when_it_looks_idle(
    start_loop: Callable[..., Loop],
) -> None:
    cluster = Cluster()
    cluster.add_node("a", **{KEYS.reboot_needed: TRUE, KEYS.reboot_ok: TRUE,
                             KEYS.reboot_in_progress: TRUE})
    cluster.slots[0] = SlotLease(0, "a", "s0", T0 - timedelta(minutes=5), "boot-a")
    loop = start_loop(cluster, Policy(), now=T0)
    plans = loop.plans_settle()

    with cluster.lock:  # the agent is back: no flag left, but the slot still names it
        for key in (KEYS.reboot_needed, KEYS.reboot_ok, KEYS.reboot_in_progress):
            del cluster.annotations["a"][key]
        cluster.versions["a"] += 1
    loop.coordinator.wake()
    wait_for(lambda: loop.slots.of(ReleaseSlot), 2, "the slot released by a plan")
    assert loop.coordinator.plans > plans


def test_a_holder_between_two_ignored_states_is_still_planned(
    start_loop: Callable[..., Loop],
) -> None:
    # The slot names a node that is absent (deleted while it rebooted): the plan changes
    # nothing. Absent and present without flags are both states the planner ignores for
    # an unslotted node; only the slot makes the node's return worth a plan.
    cluster = Cluster()
    cluster.slots[0] = SlotLease(0, "a", "s0", T0 - timedelta(minutes=5), "boot-a")
    loop = start_loop(cluster, Policy(), now=T0)
    plans = loop.plans_settle()
    assert not loop.slots.of(ReleaseSlot)

    cluster.add_node("a")
    loop.coordinator.wake()
    wait_for(lambda: loop.coordinator.plans > plans, 2, "a plan for the holder's return")


class CountingStandby:
    """Never the leader; counts the loop's turns (each asks once)."""

    def __init__(self) -> None:
        self.asked = 0

    @property
    def is_leader(self) -> bool:
        self.asked += 1
        return False


def test_a_standby_sleeps_through_events(start_loop: Callable[..., Loop]) -> None:
    cluster = Cluster()
    cluster.add_node("a")
    standby = CountingStandby()
    loop = start_loop(cluster, Policy(), leadership=standby)
    wait_for(lambda: standby.asked, 5, "the loop to start")
    loop.coordinator.wake()  # a watch event, as a standby's caches see them all the time
    before = standby.asked
    threading.Event().wait(TICK * 25)
    # A tick every TICK: about 25 turns; a loop that did not sleep takes thousands.
    assert standby.asked - before < 100, f"{standby.asked - before} turns in {TICK * 25} s"
    assert loop.coordinator.plans == 0
