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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from cluo.cycle.agent_core import DrainStatus
from cluo.cycle.drain_plan import BlockReason, DrainOptions, PodSummary
from cluo.cycle.drainer import Drainer, DrainTuning
from cluo.cycle.eviction import BlockedByBudget, KubePods, PodApi, pod_summary
from cluo.errors import KubeError
from cluo.kube.client import ApiError
from cluo.kube.nodes import NodeApi
from tests.unit.agent_rig import (
    BUDGET,
    GRACE,
    HOST,
    NODE,
    FakeNode,
    FakePods,
    Journal,
    run_agent,
    workload,
)
from tests.unit.virtual_time import elapsed, run

# Each test takes well under a second; one whose code under test spins without yielding
# to the loop (fake time cannot move then) fails here instead of hanging for the default.
pytestmark = pytest.mark.timeout(30)

TUNING = DrainTuning()  # the defaults: fake time makes them cost nothing


# -- the drainer alone --------------------------------------------------------------------


@dataclass
class DrainRun:
    journal: Journal
    statuses: list[tuple[float, DrainStatus]]  # (fake time, status) of every report
    done_at: float | None  # when run() returned; None: still running at the end


def drain(setup: Callable[[FakePods], object], *, until: float = 300.0,
          force_at: float | None = None, list_failures: int = 0,
          pods_type: type[FakePods] = FakePods) -> DrainRun:
    """Run a Drainer on the pods ``setup`` adds until it completes or ``until`` fake
    seconds pass (then it is cancelled, as the agent's AbortDrain does); ``force()`` it at
    ``force_at``; its first ``list_failures`` lists fail."""
    result = DrainRun(Journal(), [], None)

    async def main() -> None:
        pods = pods_type(result.journal)
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


class UnwatchablePods(FakePods):
    """Pods whose watch the API server refuses (a credential that may list pods but not
    watch them, as cluo-coord's for FleetLock nodes)."""

    def await_departures(self, node: str, uids: frozenset[str], timeout: float) -> bool:
        self.journal.add("watch", "refused")
        raise KubeError(f"watching the pods on node {node!r}", "forbidden", kind="forbidden",
                        status=403)


def test_a_drain_that_may_not_watch_the_pods_polls_for_them_instead() -> None:
    result = drain(workload, pods_type=UnwatchablePods)
    assert result.journal.times("watch") == [0]  # tried once, then never again
    assert sorted(c.detail for c in result.journal.of("evict")) == ["web-1", "web-2"]
    assert result.done_at is not None
    assert GRACE <= result.done_at <= GRACE + TUNING.poll_interval
    assert len(result.journal.of("list")) >= GRACE / TUNING.poll_interval


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


@pytest.mark.parametrize(("spec", "grace"), [
    ({"terminationGracePeriodSeconds": 300}, 300),
    ({"terminationGracePeriodSeconds": 0}, 0),
    ({}, 30),  # unset: the API server's default
])
def test_the_pod_summary_carries_the_termination_grace_period(
    spec: dict[str, Any], grace: int
) -> None:
    summary = pod_summary({"metadata": {"namespace": "default", "name": "db-0", "uid": "u"},
                           "spec": spec, "status": {"phase": "Running"}})
    assert summary.grace_seconds == grace


def test_a_refused_pod_keeps_its_own_retry_delay_while_others_terminate() -> None:
    def budget_and_workload(pods: FakePods) -> None:
        pods.add("db-0", refusals=-1)
        pods.add("web-1")  # terminating for GRACE seconds: the drain polls meanwhile

    result = drain(budget_and_workload, until=GRACE)
    assert result.journal.times("evict", "web-1") == [0]
    assert result.journal.times("evict", "db-0 refused") == [0, 1, 3, 7, 15, 25]
    assert len(result.journal.of("list")) > 100, "the drain polled the terminating pod"


def test_once_a_budget_lets_a_refused_pod_go_the_others_retry_from_the_first_delay() -> None:
    def budget_moving_slowly(pods: FakePods) -> None:
        pods.add("db-0", refusals=1)
        pods.add("db-1", refusals=4)

    result = drain(budget_moving_slowly)
    assert result.journal.times("evict", "db-0 refused") == [0]
    assert result.journal.times("evict", "db-0") == [1]
    # Refused at 0 and 1 (the 1 s retry, in the round db-0 went): its backoff starts again
    # from 1 s there, instead of doubling on to 2, 4 and 8 s (retries at 3, 7 and 15).
    assert result.journal.times("evict", "db-1 refused") == [0, 1, 2, 4]
    assert result.journal.times("evict", "db-1") == [8]


def test_a_budget_moving_does_not_bring_a_retry_before_its_retry_after() -> None:
    def budget_and_a_slow_one(pods: FakePods) -> None:
        pods.add("db-0", refusals=1)
        pods.add("db-1", refusals=1, retry_after=5.0)

    result = drain(budget_and_a_slow_one)
    assert result.journal.times("evict", "db-0") == [1]
    assert result.journal.times("evict", "db-1") == [5]


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
