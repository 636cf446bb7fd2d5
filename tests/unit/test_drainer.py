"""The drain, on fakes and fake time: alone, then inside the real agent driver.

``Drainer`` runs on an event loop whose clock is fake (tests/unit/virtual_time.py) against
an in-memory pod API: an accepted eviction or deletion makes the pod terminate and go
after its grace period, a PodDisruptionBudget can refuse evictions (429). The second half
runs the real ``Agent`` (decide, act, the drainer) on the same loop with fake node,
update_engine and logind adapters, so the ordering a user sees is checked end to end in
milliseconds: cordon, then evictions, then the pods gone, then the reboot; and a drain
that times out is aborted, uncordoned only if cluo cordoned, reported, never rebooted.
Every call to a fake is journaled with the fake time it was made at.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

from cluo.errors import KubeError
from cluo.kube.client import ApiError
from cluo.kube.nodes import NodeApi, NodeEvent, NodeSnapshot
from cluo_host.agent import Agent
from cluo_host.agent_core import DrainStatus, Inhibitor
from cluo_host.config import AgentSettings, load_settings
from cluo_host.drain_plan import BlockReason, DrainOptions, OwnerRef, PodSummary
from cluo_host.drainer import Drainer, DrainTuning
from cluo_host.eviction import (
    BlockedByBudget,
    Deleted,
    DeletionOutcome,
    Evicted,
    EvictionOutcome,
    KubePods,
    PodApi,
    PodState,
)
from cluo_host.host_facts import HostFacts
from cluo_host.update_status import UpdateEngineStatus
from tests.unit.virtual_time import elapsed, run

# Each test takes well under a second; one whose code under test spins without yielding
# to the loop (fake time cannot move then) fails here instead of hanging for the default.
pytestmark = pytest.mark.timeout(30)

NODE = "worker-1"
TUNING = DrainTuning()  # the defaults: fake time makes them cost nothing
GRACE = 30.0  # seconds an evicted pod takes to go
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

    def add(self, call: str, detail: str = "") -> None:
        self.calls.append(Call(round(elapsed(), 6), call, detail))

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


# -- the drainer alone --------------------------------------------------------------------


@dataclass
class DrainRun:
    journal: Journal
    statuses: list[tuple[float, DrainStatus]]  # (fake time, status) of every report
    done_at: float | None  # when run() returned; None: still running at the end


def drain(setup: Callable[[FakePods], object], *, until: float = 300.0,
          force_at: float | None = None, list_failures: int = 0) -> DrainRun:
    """Run a Drainer on the pods ``setup`` adds until it completes or ``until`` fake
    seconds pass (then it is cancelled, as the agent's AbortDrain does); ``force()`` it at
    ``force_at``; its first ``list_failures`` lists fail."""
    result = DrainRun(Journal(), [], None)

    async def main() -> None:
        pods = FakePods(result.journal)
        setup(pods)
        pods.list_failures = [KubeError("listing pods", "connection refused",
                                        kind="unavailable")] * list_failures
        loop = asyncio.get_running_loop()
        drainer = Drainer(pods, NODE, DrainOptions(),
                          lambda status: result.statuses.append((elapsed(), status)),
                          started_at=loop.time(), clock=loop.time, tuning=TUNING)
        if force_at is not None:
            loop.call_later(force_at, lambda: drainer.force(loop.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drainer.run(), until)
            result.done_at = elapsed()

    run(main())
    return result


def test_evicts_what_must_leave_and_completes_once_those_pods_are_gone() -> None:
    result = drain(workload)
    evicted = [c.detail for c in result.journal.of("evict")]
    assert sorted(evicted) == ["web-1", "web-2"]  # each once, in the first round
    assert result.journal.times("evict") == [0, 0]
    assert not result.journal.of("delete")
    # Complete only once the evicted pods and the one being deleted are gone.
    assert result.done_at is not None
    assert GRACE <= result.done_at <= GRACE + TUNING.poll_interval
    final = result.statuses[-1][1]
    assert final.complete and not final.blockers
    assert all(not status.complete for t, status in result.statuses if t < GRACE)
    waiting = result.statuses[0][1].blockers
    assert {(b.name, b.reason) for b in waiting} == {
        ("web-1", BlockReason.TERMINATING), ("web-2", BlockReason.TERMINATING),
        ("leaving", BlockReason.TERMINATING)}


def test_a_drain_with_nothing_to_move_completes_at_once() -> None:
    def leftovers(pods: FakePods) -> None:
        pods.add("node-exporter", owner="DaemonSet")
        pods.add("kube-proxy-static", owner="", mirror=True)

    result = drain(leftovers)
    assert result.done_at == 0
    assert not result.journal.of("evict", "delete")


def test_an_eviction_a_budget_refuses_is_retried_with_a_doubling_delay() -> None:
    result = drain(lambda pods: pods.add("db-0", refusals=5))
    # Refused at 0, 1, 3, 7, 15 (1 s doubling), then 25 (capped at 10 s): accepted.
    assert result.journal.times("evict") == [0, 1, 3, 7, 15, 25]
    assert result.journal.of("evict")[-1].detail == "db-0"
    assert result.done_at is not None and result.done_at >= 25 + GRACE
    refused = [status for t, status in result.statuses if t < 25]
    assert all(b.reason is BlockReason.DISRUPTION_BUDGET and b.detail == BUDGET
               for status in refused for b in status.blockers)


def test_a_budget_refusal_is_retried_no_sooner_than_its_retry_after() -> None:
    result = drain(lambda pods: pods.add("db-0", refusals=4, retry_after=6.0))
    # The backoff (1, 2, 4, 8 s) where longer, else the server's 6 s.
    assert result.journal.times("evict") == [0, 6, 12, 18, 26]


def test_an_eviction_the_api_server_throttles_is_retried_after_its_retry_after() -> None:
    result = drain(lambda pods: pods.add("web-1", throttled=1, retry_after=7.0))
    assert TUNING.error_retry < 7.0
    assert result.journal.times("evict") == [0, 7]
    assert result.journal.of("evict")[-1].detail == "web-1"


class RefusingClient:
    """``KubeClient.request`` answering every eviction with ``error``."""

    def __init__(self, error: ApiError) -> None:
        self.error = error

    def request(self, method: str, path: str, **_: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(("body", "outcome"), [
    ('{"kind": "Status", "code": 429, "message": "' + BUDGET + '", "details": {"causes": '
     '[{"reason": "DisruptionBudget", "message": "The disruption budget db needs 1"}]}}',
     "budget"),
    ('{"kind": "Status", "code": 429, "message": "Too many requests, try again later"}',
     "throttled"),
])
def test_the_eviction_adapter_hands_on_the_retry_after_of_a_429(body: str, outcome: str) -> None:
    client = RefusingClient(ApiError(429, "Too Many Requests", body, retry_after=6.0))
    pods = KubePods(client)  # type: ignore[arg-type]
    pod = PodSummary("default", "db-0", "uid-db-0", (), False, "Running")
    if outcome == "budget":
        refused = pods.evict(pod)
        assert isinstance(refused, BlockedByBudget) and refused.retry_after == 6.0
    else:
        with pytest.raises(KubeError) as caught:
            pods.evict(pod)
        assert (caught.value.kind, caught.value.retry_after) == ("blocked", 6.0)


def test_a_refused_pod_keeps_its_own_retry_delay_while_others_terminate() -> None:
    def budget_and_workload(pods: FakePods) -> None:
        pods.add("db-0", refusals=-1)
        pods.add("web-1")  # terminating for GRACE seconds: the drain polls meanwhile

    result = drain(budget_and_workload, until=GRACE)
    assert result.journal.times("evict", "web-1") == [0]
    assert result.journal.times("evict", "db-0 refused") == [0, 1, 3, 7, 15, 25]
    assert len(result.journal.of("list")) > 100, "the drain polled the terminating pod"


def test_force_deletes_at_once_even_while_a_budget_retry_is_pending() -> None:
    # Refused at 0, 1, 3: the next retry is due at 7. Forced at 5, the drain does not
    # sleep on until then.
    result = drain(lambda pods: pods.add("db-0", refusals=-1), force_at=5, until=60)
    assert result.journal.times("evict") == [0, 1, 3]
    assert result.journal.times("delete") == [5]
    assert result.done_at is not None and result.done_at >= 5 + GRACE
    forced = [status for t, status in result.statuses if t >= 5]
    assert forced and all(status.forced_at == pytest.approx(1005.0) for status in forced)


def test_a_failed_list_is_retried_after_a_pause() -> None:
    result = drain(workload, list_failures=2)
    assert result.journal.times("list")[:3] == [0, TUNING.error_retry, 2 * TUNING.error_retry]
    assert result.journal.times("evict") == [2 * TUNING.error_retry] * 2


def test_a_cancelled_drain_evicts_nothing_more() -> None:
    # What the agent's AbortDrain does: cancel the drain's task.
    result = drain(lambda pods: pods.add("db-0", refusals=-1), until=10)
    assert result.done_at is None
    assert result.journal.times("evict") == [0, 1, 3, 7]
    assert not [c for c in result.journal.calls if c.t > 10]


# -- the drain inside the agent -----------------------------------------------------------


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
        for target, values in ((self.annotations, annotations), (self.labels, labels)):
            for key, value in (values or {}).items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        self.journal.add("patch", " ".join(sorted(
            f"{k.rsplit('/', 1)[-1]}={v}" for k, v in (annotations or {}).items())))
        self.version += 1
        return self.snapshot()

    def set_unschedulable(self, name: str, value: bool) -> NodeSnapshot:
        self.journal.add("cordon" if value else "uncordon")
        self.unschedulable = value
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


class FakeEngine:
    async def connect(self, bus_address: str | None = None) -> UpdateEngineStatus:
        return NEED_REBOOT

    async def get_status(self) -> UpdateEngineStatus:
        return NEED_REBOOT

    async def close(self) -> None:
        pass


class FakeLogind:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def list_inhibitors(self) -> list[Inhibitor]:
        return []

    async def blocking_shutdown_inhibitors(self) -> list[Inhibitor]:
        return []

    async def reboot(self) -> None:
        self.journal.add("reboot")


class SilentNotifier:
    def ready(self, status: str | None = None) -> None: ...

    def status(self, text: str) -> None: ...

    def watchdog(self) -> None: ...

    def stopping(self, status: str | None = None) -> None: ...

    def extend_timeout(self, seconds: float) -> None: ...


@dataclass
class AgentRun:
    journal: Journal
    node: FakeNode
    keys: Any


def run_agent(pods_setup: Any, *, until: float, cordoned: bool = False) -> AgentRun:
    """The agent of a node the coordinator granted a reboot, from its start until ``until``
    fake seconds (then stopped, as SIGTERM does)."""
    settings = load_settings(["--node-name", NODE], {})
    keys = settings.keys
    journal = Journal()
    node = FakeNode(settings, journal, cordoned=cordoned,
                    annotations={keys.reboot_needed: "true", keys.reboot_ok: "true"})

    async def main() -> None:
        pods = FakePods(journal)
        pods_setup(pods)
        agent = Agent(settings, host=HOST, nodes=node, pods=pods,
                      engine_factory=lambda on_event: FakeEngine(),
                      rebooter=FakeLogind(journal), notifier=SilentNotifier())
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(until, stop.set)
        assert await agent.run(stop) == 0

    run(main())
    return AgentRun(journal, node, keys)


def test_the_agent_cordons_then_evicts_then_reboots_once_the_pods_are_gone() -> None:
    result = run_agent(workload, until=120)
    journal = result.journal
    cordon = journal.first("cordon")
    first_eviction = journal.first("evict")
    drained = journal.first("list", "node-exporter kube-proxy-static batch-done")
    boot_id = journal.first("patch", setting=f"boot-id-before-reboot={HOST.boot_id}")
    reboot = journal.first("reboot")
    assert cordon < first_eviction < drained < boot_id < reboot
    assert journal.calls[reboot].t >= GRACE, "no reboot before the evicted pods are gone"
    assert sorted(c.detail for c in journal.of("evict")) == ["web-1", "web-2"]
    assert len(journal.of("reboot")) == 1
    assert not journal.of("uncordon")


def test_a_drain_that_times_out_is_aborted_uncordoned_and_never_rebooted() -> None:
    result = run_agent(lambda pods: pods.add("db-0", refusals=-1), until=900)
    journal, keys = result.journal, result.keys
    abort = journal.first("event", "DrainTimedOut")
    assert journal.calls[abort].t == 600  # --drain-timeout's default: 10 minutes
    assert journal.first("cordon") < journal.first("evict") < abort
    assert not journal.of("reboot")
    # Reported on the node (the grant is handed back with the reason), then uncordoned:
    # cluo cordoned it.
    handed_back = journal.first("patch", setting="reboot-in-progress=false")
    assert handed_back < journal.first("uncordon")
    assert not result.node.unschedulable
    reason = result.node.annotations[keys.blocked_reason]
    assert "drain timed out" in reason and "default/db-0" in reason and BUDGET in reason
    assert result.node.annotations[keys.reboot_needed] == "true"
    assert all(c.t <= journal.calls[abort].t for c in journal.of("evict")), \
        "no eviction after the abort"


def test_a_drain_timeout_on_an_admin_cordoned_node_leaves_it_cordoned() -> None:
    result = run_agent(lambda pods: pods.add("db-0", refusals=-1), until=900, cordoned=True)
    journal = result.journal
    assert journal.of("evict")
    assert journal.first("event", "DrainTimedOut")
    assert not journal.of("cordon", "uncordon", "reboot")
    assert result.node.unschedulable


if TYPE_CHECKING:  # the fakes satisfy the protocols of the real adapters
    _PODS: type[PodApi] = FakePods
    _NODES: type[NodeApi] = FakeNode
