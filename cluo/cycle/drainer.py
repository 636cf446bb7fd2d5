"""The drain: evict every pod that must leave the node and wait until they are gone.

Level-based, like the rest of the agent: each round lists the pods bound to the node,
classifies them (``drain_plan.plan_drain``), evicts the ones that must go through the
Eviction API (PodDisruptionBudgets respected) with bounded concurrency, and waits for
the terminating ones. A round that finds nothing left to move completes the drain. A
restart simply starts the rounds again: evictions of pods already terminating are
harmless.

The evictions go out longest grace period first (``plan_drain``'s order). While pods
terminate, the next round comes when the last of them is gone, seen by a watch of the
node's pods where the pod API offers one (``PodDepartures``; at least every
``departure_wait``), otherwise by polling every ``poll_interval``; a watch that fails
(a credential that may list pods but not watch them) falls back to polling for the rest
of the drain.

A 429 from a PodDisruptionBudget is retried with a per-pod exponential backoff, and
never sooner than the server's Retry-After (so is a failed eviction's retry). Each time
a refused pod is evicted after all, the budgets are moving (one replacement healthy, one
more disruption allowed): the pods still refused start their backoff again from its first
delay, rather than each waiting out a delay that doubled while the others went first. The
drain itself never gives up: the agent's core owns the timeout and the policy (abort, or
``force()``, which deletes the remaining pods ignoring budgets).

The drain reports its progress through ``on_progress`` (a ``DrainStatus``), on the
event loop, after every round that changed what blocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cluo.cycle.agent_core import DrainStatus
from cluo.cycle.config import DrainTuning
from cluo.cycle.drain_plan import BlockReason, DrainOptions, PodBlocker, PodSummary, plan_drain
from cluo.cycle.eviction import BlockedByBudget, PodApi, PodDepartures
from cluo.errors import CluoError

# DrainTuning is defined with the other settings (cluo.cycle.config) and imported from
# here too, with the drain it tunes.
__all__ = ["DrainTuning", "Drainer"]

log = logging.getLogger(__name__)


class Drainer:
    """One drain of one node. ``run()`` until complete or cancelled."""

    def __init__(
        self,
        pods: PodApi,
        node: str,
        options: DrainOptions,
        on_progress: Callable[[DrainStatus], None],
        *,
        started_at: float,
        clock: Callable[[], float],
        tuning: DrainTuning | None = None,
    ) -> None:
        self._pods = pods
        self._node = node
        self._options = options
        self._on_progress = on_progress
        self._clock = clock
        self._tuning = tuning or DrainTuning()
        self._status = DrainStatus(started_at=started_at)
        self._force = False
        self._kick = asyncio.Event()  # set by force(): start the next round now
        self._retry_at: dict[str, float] = {}  # pod uid -> earliest next eviction
        self._refusals: dict[str, int] = {}
        # pod uid -> refusals since a budget last let a refused pod go (sets the delay),
        # and the Retry-After of its last refusal (no retry before it, whatever happens)
        self._streak: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        # pod uid -> why its last eviction did not go through, reported again while its
        # retry is not due (so the reason keeps naming the budget that refused it)
        self._last_blocker: dict[str, PodBlocker] = {}
        self._evicted = 0
        self._departing: frozenset[str] = frozenset()  # uids of the pods terminating
        self._departures = pods if isinstance(pods, PodDepartures) else None

    @property
    def status(self) -> DrainStatus:
        return self._status

    @property
    def evicted(self) -> int:
        """Pods evicted (or deleted) by this drain so far."""
        return self._evicted

    def force(self, now: float) -> None:
        """From now on, delete the pods that must go, ignoring PodDisruptionBudgets."""
        self._force = True
        self._retry_at.clear()
        self._kick.set()
        self._report(DrainStatus(self._status.started_at, False, now, self._status.blockers))

    async def run(self) -> None:
        log.info("drain started", extra={"NODE": self._node})
        while True:
            try:
                done = await self._round()
            except CluoError as err:
                log.warning(
                    "drain round failed, retrying",
                    extra={"NODE": self._node, "ERROR": str(err), "ERROR_KIND": err.kind},
                )
                await self._pause(self._tuning.error_retry)
                continue
            if done:
                log.info("drain complete", extra={"NODE": self._node, "EVICTED": self._evicted})
                return
            if self._departing and self._departures is not None:
                await self._await_departures(self._departures)
            else:
                await self._pause(self._next_wait())

    async def _pause(self, seconds: float) -> None:
        """Sleep until the next round is due, or until force() asks for one now."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), seconds)
        self._kick.clear()

    async def _await_departures(self, departures: PodDepartures) -> None:
        """Until the terminating pods are gone, a retry is due, or force() asks for a round."""
        now = self._clock()
        due = min((at - now for at in self._retry_at.values() if at > now),
                  default=self._tuning.departure_wait)
        seconds = max(0.0, min(due, self._tuning.departure_wait))
        watching = asyncio.ensure_future(asyncio.to_thread(
            departures.await_departures, self._node, self._departing, seconds))
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait((watching, kicked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            # A watch left behind (force() or cancel) ends by itself within `seconds`.
            watching.add_done_callback(_retrieved)
        self._kick.clear()
        if watching.done() and not watching.cancelled():
            err = watching.exception()
            if isinstance(err, CluoError):
                log.info("cannot watch the pods on the node, polling instead",
                         extra={"NODE": self._node, "ERROR": str(err), "ERROR_KIND": err.kind})
                self._departures = None
            elif err is not None:
                raise err

    async def _round(self) -> bool:
        pods = await asyncio.to_thread(self._pods.pods_on_node, self._node)
        plan = plan_drain(pods, self._options)
        if plan.done:
            self._report(DrainStatus(self._status.started_at, True, self._status.forced_at))
            return True
        now = self._clock()
        due = [pod for pod in plan.evict if self._retry_at.get(pod.uid, 0.0) <= now]
        semaphore = asyncio.Semaphore(self._tuning.concurrency)

        async def move(pod: PodSummary) -> PodBlocker | None:
            async with semaphore:
                return await self._move(pod)

        results = await asyncio.gather(*(move(pod) for pod in due))
        for pod, result in zip(due, results, strict=True):
            if result is not None:
                self._last_blocker[pod.uid] = result
        blockers = [b for b in results if b is not None]
        blockers += [
            self._last_blocker.get(pod.uid)
            or PodBlocker(pod.namespace, pod.name, BlockReason.DISRUPTION_BUDGET, "retrying")
            for pod in plan.evict
            if pod not in due
        ]
        blockers += list(plan.blocking)
        blockers += [
            PodBlocker(pod.namespace, pod.name, BlockReason.TERMINATING) for pod in plan.wait_for
        ]
        blockers += [
            PodBlocker(pod.namespace, pod.name, BlockReason.TERMINATING)
            for pod, result in zip(due, results, strict=True)
            if result is None
        ]
        self._departing = frozenset(
            [pod.uid for pod in plan.wait_for]
            + [pod.uid for pod, result in zip(due, results, strict=True) if result is None])
        self._report(DrainStatus(self._status.started_at, False, self._status.forced_at,
                                 tuple(sorted(set(blockers), key=_blocker_key))))
        return False

    async def _move(self, pod: PodSummary) -> PodBlocker | None:
        """Evict (or, forced, delete) one pod. None: it is on its way out."""
        try:
            if self._force:
                await asyncio.to_thread(self._pods.delete, pod)
                outcome: object = None
            else:
                outcome = await asyncio.to_thread(self._pods.evict, pod)
        except CluoError as err:
            self._retry_at[pod.uid] = self._clock() + max(self._tuning.error_retry,
                                                          err.retry_after or 0.0)
            log.warning(
                "eviction failed",
                extra={"NODE": self._node, "POD": pod.ref, "ERROR": str(err),
                       "ERROR_KIND": err.kind},
            )
            return PodBlocker(pod.namespace, pod.name, BlockReason.EVICTION_ERROR, str(err))
        if isinstance(outcome, BlockedByBudget):
            refusals = self._refusals.get(pod.uid, 0) + 1
            self._refusals[pod.uid] = refusals
            streak = self._streak[pod.uid] = self._streak.get(pod.uid, 0) + 1
            now = self._clock()
            self._not_before[pod.uid] = now + (outcome.retry_after or 0.0)
            delay = max(min(
                self._tuning.budget_retry_base * 2 ** (streak - 1), self._tuning.budget_retry_max
            ), outcome.retry_after or 0.0)
            self._retry_at[pod.uid] = now + delay
            if refusals == 1:
                log.info(
                    "eviction refused by a disruption budget",
                    extra={"NODE": self._node, "POD": pod.ref, "DETAIL": outcome.message},
                )
            return PodBlocker(
                pod.namespace, pod.name, BlockReason.DISRUPTION_BUDGET, outcome.message
            )
        self._evicted += 1
        log.info(
            "pod deleted ignoring disruption budgets" if self._force else "pod evicted",
            extra={"NODE": self._node, "POD": pod.ref},
        )
        if self._streak.pop(pod.uid, None) is not None:
            self._budgets_moved()
        return None

    def _budgets_moved(self) -> None:
        """A pod a budget had refused was evicted: the budgets are letting pods go one by
        one (a replacement became healthy). The pods still refused start their backoff
        again from its first delay, so none waits out a delay doubled while the others
        went first; a budget that lets nothing go keeps doubling them."""
        soon = self._clock() + self._tuning.budget_retry_base
        for uid in self._streak:
            self._streak[uid] = 0
            if uid in self._retry_at:
                self._retry_at[uid] = min(self._retry_at[uid],
                                          max(soon, self._not_before.get(uid, 0.0)))

    def _next_wait(self) -> float:
        """Poll fast while pods terminate; otherwise sleep until the next retry is due."""
        waiting = [
            b for b in self._status.blockers
            if b.reason in (BlockReason.TERMINATING, BlockReason.EVICTION_ERROR)
        ]
        if waiting:
            return self._tuning.poll_interval
        now = self._clock()
        pending = [at - now for at in self._retry_at.values() if at > now]
        # Only refused evictions or pods that block for good are left: nothing changes
        # before the next retry, except an admin removing a pod (seen on the next list).
        return max(self._tuning.poll_interval, min(pending, default=self._tuning.idle_relist))

    def _report(self, status: DrainStatus) -> None:
        if status == self._status:
            return
        self._status = status
        self._on_progress(status)


def _retrieved(future: asyncio.Future[bool]) -> None:
    """Fetch an abandoned watch's outcome, so that its error is not reported as lost."""
    if not future.cancelled():
        future.exception()


def _blocker_key(blocker: PodBlocker) -> tuple[str, str, str]:
    return (blocker.namespace, blocker.name, blocker.reason.value)
