"""A rig for the agent on fake time: in-memory pods, node, update_engine and logind.

Every call to a fake is journaled with the fake time it was made at (tests/unit/
virtual_time.py), so a test reads the order a user would see: cordon, evictions, the pods
gone, patches, Events, the reboot. ``run_agent`` runs the real ``Agent`` driver (decide,
act, the drainer) on that loop from its start until a fake instant, then stops it as
SIGTERM does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from cluo.cycle.drain_plan import OwnerRef, PodSummary
from cluo.cycle.eviction import (
    BlockedByBudget,
    Deleted,
    DeletionOutcome,
    Evicted,
    EvictionOutcome,
    PodState,
)
from cluo.cycle.inhibitors import Inhibitor
from cluo.cycle.update_status import UpdateEngineStatus
from cluo.errors import KubeError
from cluo.kube.nodes import NodeChange, NodeEvent, NodeSnapshot
from cluo.protocol import Keys
from cluo_host.agent import Agent
from cluo_host.config import AgentSettings, load_settings
from cluo_host.host_facts import HostFacts
from cluo_host.update_engine import StatusIgnored, StatusUpdated, UpdateEngineEvent
from tests.unit.virtual_time import elapsed, run

NODE = "worker-1"
GRACE = 30.0  # seconds an evicted pod takes to go
STOP_TIMEOUT = 60.0  # the unit's TimeoutStopSec=
BUDGET = "Cannot evict pod as it would violate the pod's disruption budget."

# -- the journal and the pod API ---------------------------------------------------------


@dataclass(frozen=True)
class Call:
    t: float  # fake seconds since the start
    call: str  # "list", "evict", "delete", "patch", "cordon", "uncordon", "reboot", ...
    detail: str = ""  # the pod's name, the patch, the Event's reason, ...


@dataclass
class Journal:
    calls: list[Call] = field(default_factory=list)
    # Seconds since the start: fake time by default; a real clock when the fakes are
    # called from threads of a real event loop (tests/dbus).
    clock: Callable[[], float] = elapsed

    def add(self, call: str, detail: str = "") -> None:
        self.calls.append(Call(round(self.clock(), 6), call, detail))

    def of(self, *calls: str) -> list[Call]:
        return [c for c in self.calls if c.call in calls]

    def times(self, call: str, detail: str | None = None) -> list[float]:
        return [c.t for c in self.of(call) if detail is None or c.detail == detail]

    def first(self, call: str, detail: str | None = None, *, setting: str = "") -> int:
        """The position of the first such call (with this detail; or whose detail has the
        ``key=value`` pair ``setting``)."""
        return next(i for i, c in enumerate(self.calls)
                    if c.call == call and (detail is None or c.detail == detail)
                    and (not setting or setting in c.detail.split()))


@dataclass
class FakePod:
    summary: PodSummary
    refusals: int = 0  # evictions a budget refuses before one goes through (-1: all)
    gone_at: float | None = None  # an eviction or deletion went through: gone then
    retry_after: float | None = None  # the Retry-After of the refusals
    throttled: int = 0  # evictions the API server throttles (429, not a budget) first


class FakePods:
    """The pods bound to the node; the kubelet removes a terminating pod after GRACE."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.pods: dict[str, FakePod] = {}
        self.list_failures: list[KubeError] = []

    def add(self, name: str, *, owner: str = "ReplicaSet", mirror: bool = False,
            phase: str = "Running", deleting: bool = False, refusals: int = 0,
            retry_after: float | None = None, throttled: int = 0) -> None:
        owners = (OwnerRef(owner, f"{name}-owner", controller=True),) if owner else ()
        summary = PodSummary("default", name, f"uid-{name}", owners, mirror, phase)
        pod = self.pods[name] = FakePod(summary, refusals, retry_after=retry_after,
                                        throttled=throttled)
        if deleting:  # someone else deleted it just before the drain
            pod.gone_at = elapsed() + GRACE

    def gone(self, name: str) -> bool:
        at = self.pods[name].gone_at
        return at is not None and elapsed() >= at

    def pods_on_node(self, node: str) -> list[PodSummary]:
        assert node == NODE
        if self.list_failures:
            self.journal.add("list", "failed")
            raise self.list_failures.pop(0)
        listed = [replace(pod.summary, deleting=pod.gone_at is not None)
                  for name, pod in self.pods.items() if not self.gone(name)]
        self.journal.add("list", " ".join(pod.name for pod in listed))
        return listed

    def evict(self, pod: PodSummary, grace_period_seconds: int | None = None
              ) -> EvictionOutcome:
        fake = self.pods[pod.name]
        if fake.throttled:
            fake.throttled -= 1
            self.journal.add("evict", f"{pod.name} throttled")
            raise KubeError(f"evicting pod {pod.ref!r}", "too many requests", kind="blocked",
                            status=429, retry_after=fake.retry_after)
        if fake.refusals:
            fake.refusals -= 1
            self.journal.add("evict", f"{pod.name} refused")
            return BlockedByBudget(BUDGET, fake.retry_after)
        self.journal.add("evict", pod.name)
        fake.gone_at = fake.gone_at or elapsed() + GRACE
        return Evicted()

    def delete(self, pod: PodSummary, grace_period_seconds: int | None = None
               ) -> DeletionOutcome:
        self.journal.add("delete", pod.name)
        fake = self.pods[pod.name]
        fake.gone_at = fake.gone_at or elapsed() + GRACE
        return Deleted()

    def pod_state(self, namespace: str, name: str, uid: str) -> PodState:
        raise AssertionError("the drain does not read single pods")


def workload(pods: FakePods) -> None:
    """Two ReplicaSet pods, and what a drain leaves alone: a DaemonSet's pod, a mirror
    pod, a finished pod. A pod someone else is deleting is waited for, not evicted."""
    pods.add("web-1")
    pods.add("web-2")
    pods.add("node-exporter", owner="DaemonSet")
    pods.add("kube-proxy-static", owner="", mirror=True)
    pods.add("batch-done", owner="Job", phase="Succeeded")
    pods.add("leaving", deleting=True)



HOST = HostFacts(boot_id="boot-1", os_id="flatcar", os_version="4081.2.0", group="stable")
NEED_REBOOT = UpdateEngineStatus(1_700_000_100, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT",
                                 "4081.3.0", 0)


class QuietWatch:
    """A node watch that delivers nothing: the agent learns the node from its writes."""

    resource_version: str | None = None

    def __init__(self) -> None:
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[NodeEvent]:
        self._closed.wait(30)
        return iter(())

    def close(self) -> None:
        self._closed.set()

    def __enter__(self) -> QuietWatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class FakeNode:
    """The agent's Node: reads, merge patches and the cordon, each journaled."""

    def __init__(self, settings: AgentSettings, journal: Journal, *,
                 annotations: Mapping[str, str], cordoned: bool) -> None:
        self.keys = settings.keys
        self.journal = journal
        self.annotations = dict(annotations)
        self.labels: dict[str, str] = {}
        self.unschedulable = cordoned
        self.version = 1
        self.events: list[tuple[str, str]] = []  # (reason, message) of each Event posted

    def snapshot(self) -> NodeSnapshot:
        return NodeSnapshot.from_object({
            "metadata": {"name": NODE, "uid": "node-uid", "resourceVersion": str(self.version),
                         "annotations": self.annotations, "labels": self.labels},
            "spec": {"unschedulable": self.unschedulable},
            "status": {"nodeInfo": {"bootID": HOST.boot_id},
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }, self.keys)

    def get(self, name: str) -> NodeSnapshot:
        return self.snapshot()

    def patch_metadata(self, name: str, annotations: Mapping[str, str | None] | None = None,
                       labels: Mapping[str, str | None] | None = None) -> NodeSnapshot:
        return self.patch(name, NodeChange(annotations or {}, labels or {}))

    def patch(self, name: str, change: NodeChange) -> NodeSnapshot:
        """One write, journaled as "cordon" or "uncordon" when it sets spec.unschedulable,
        else as "patch"; the detail lists the annotations it writes."""
        for target, values in ((self.annotations, change.annotations),
                               (self.labels, change.labels)):
            for key, value in values.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        if change.unschedulable is not None:
            self.unschedulable = change.unschedulable
        call = {None: "patch", True: "cordon", False: "uncordon"}[change.unschedulable]
        self.journal.add(call, " ".join(sorted(
            f"{k.rsplit('/', 1)[-1]}={v}" for k, v in change.annotations.items())))
        self.version += 1
        return self.snapshot()

    def update(self, name: str, mutate: Any, *, attempts: int = 5) -> NodeSnapshot:
        raise AssertionError("the agent does not use update()")

    def watch(self, name: str, resource_version: str | None, timeout_seconds: int
              ) -> QuietWatch:
        return QuietWatch()

    def emit_event(self, node_name: str, reason: str, message: str, *,
                   type: str = "Normal", component: str = "cluo-agent",
                   instance: str | None = None) -> None:
        self.journal.add("event", reason)
        self.events.append((reason, message))


class FakeEngine:
    """update_engine: its status at connect, then whatever a test publishes."""

    def __init__(self, on_event: Callable[[UpdateEngineEvent], None],
                 status: UpdateEngineStatus) -> None:
        self._on_event = on_event
        self.status = status

    def publish(self, status: UpdateEngineStatus) -> None:
        """A ``StatusUpdate`` signal from update_engine itself."""
        self.status = status
        self._on_event(StatusUpdated(status, sender=":1.7", from_owner=True))

    def ignore(self, sender: str, reason: str) -> None:
        """A ``StatusUpdate`` the adapter did not accept (a sender not root, or gone)."""
        self._on_event(StatusIgnored(sender, reason))

    async def connect(self, bus_address: str | None = None) -> UpdateEngineStatus:
        return self.status

    async def get_status(self) -> UpdateEngineStatus:
        return self.status

    async def close(self) -> None:
        pass


class FakeLogind:
    """logind: ``inhibitors`` are listed; ``wedged``: ListInhibitors never answers."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.inhibitors: list[Inhibitor] = []
        self.wedged = False

    async def list_inhibitors(self) -> list[Inhibitor]:
        if self.wedged:
            self.journal.add("wedged")
            await asyncio.Event().wait()  # an await nothing ends: a hung call
        return list(self.inhibitors)

    async def blocking_shutdown_inhibitors(self) -> list[Inhibitor]:
        return [i for i in self.inhibitors if i.blocks_reboot]

    async def reboot(self) -> None:
        self.journal.add("reboot")


class JournaledNotifier:
    """What systemd would receive on NOTIFY_SOCKET: WATCHDOG=1 and STATUS= are journaled."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def ready(self, status: str | None = None) -> None:
        self.journal.add("ready", status or "")

    def status(self, text: str) -> None:
        self.journal.add("status", text)

    def watchdog(self) -> None:
        self.journal.add("watchdog")

    def stopping(self, status: str | None = None) -> None:
        self.journal.add("stopping", status or "")

    def extend_timeout(self, seconds: float) -> None:
        pass


@dataclass
class AgentRun:
    journal: Journal
    node: FakeNode
    keys: Keys
    engine: FakeEngine | None = None
    killed: bool = False  # it did not stop within STOP_TIMEOUT of SIGTERM
    agent: Agent | None = None


def granted(keys: Keys) -> dict[str, str]:
    """A node that needs a reboot and was granted one."""
    return {keys.reboot_needed: "true", keys.reboot_ok: "true"}


def run_agent(pods_setup: Callable[[FakePods], object] = lambda pods: None, *, until: float,
              cordoned: bool = False,
              annotations: Callable[[Keys], Mapping[str, str]] = granted,
              status: UpdateEngineStatus = NEED_REBOOT,
              logind: Callable[[FakeLogind], object] = lambda logind: None,
              watchdog_interval: float | None = None,
              script: Callable[[AgentRun], object] = lambda run: None) -> AgentRun:
    """The agent of a node (by default one the coordinator granted a reboot) from its
    start until ``until`` fake seconds, then stopped as SIGTERM does (and killed if it is not
    done ``STOP_TIMEOUT`` later). ``script`` is called
    once the agent exists, to schedule what happens meanwhile (``loop.call_later``)."""
    settings = load_settings(["--node-name", NODE], {})
    keys = settings.keys
    journal = Journal()
    node = FakeNode(settings, journal, cordoned=cordoned, annotations=annotations(keys))
    result = AgentRun(journal, node, keys)

    def engine_factory(on_event: Callable[[UpdateEngineEvent], None]) -> FakeEngine:
        result.engine = FakeEngine(on_event, status)
        return result.engine

    async def main() -> None:
        pods = FakePods(journal)
        pods_setup(pods)
        rebooter = FakeLogind(journal)
        logind(rebooter)
        agent = Agent(settings, host=HOST, nodes=node, pods_factory=lambda: pods,
                      engine_factory=engine_factory, rebooter=rebooter,
                      notifier=JournaledNotifier(journal), watchdog_interval=watchdog_interval)
        result.agent = agent
        script(result)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(until, stop.set)
        running = asyncio.create_task(agent.run(stop))
        done, _pending = await asyncio.wait({running}, timeout=until + STOP_TIMEOUT)
        if done:
            assert running.result() == 0
        else:  # as systemd's SIGKILL after TimeoutStopSec=
            running.cancel()
            result.killed = True

    run(main())
    return result
