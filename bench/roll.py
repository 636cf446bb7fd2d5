"""Benchmarks 1 and 2: handoff latency and roll overhead, from one roll of N virtual nodes.

The real ``cluo-coord`` process (console script, cluo-coord ServiceAccount, leader
election on as deployed, --max-concurrent 1) rolls N nodes of the kubelet emulator that
all report ``reboot-needed=true`` (queued by last-checked-time). A fast fake agent per node
(``FastAgents``, authenticated as the stand-in account of bench/coord_rig.py) reacts to
one Node watch and makes the real agent's Node writes (cluo/cycle/agent_core.py),
in its order and grouped into requests as it groups them (the ``PatchNode`` actions of the
fake agents' section, sent as ``node_patch`` builds them): on
``reboot-ok=true`` it takes the grant and cordons the node, records the boot id, powers the
emulated host off and boots it with a new boot id ``DRAIN_REBOOT`` seconds after it began
(the simulated drain + reboot, the host's going down included), waits for the Node to show
it, and reports the reboot; on the coordinator's ``reboot-ok=false`` it ends its cycle:
its marks cleared and, if the coordinator's reset left the node cordoned with the agent's
mark, the uncordon (the coordinator's reset at the end of a proven reboot uncordons the
node itself, planner rule 10). The emulator plays the node lifecycle controller with its default
node-monitor-grace-period (``NODE_MONITOR_GRACE_PERIOD``): a host down for a few seconds is
never marked NotReady, tainted or its pods not Ready, as in a real cluster; its kubelet
goes silent and, booted, posts the new boot id and Ready.

Every time is the API server's, from its audit log (the bodies of Node patches and of
cluo-system Lease writes are logged, see bench/testbed.py), at microsecond resolution:

- *handoff* of node A to node B: from the completion of the write that made A schedulable
  again (which planner rule 10 waits for before A's slot may go to another node) to the
  completion of the coordinator's write of ``reboot-ok=true`` on B, the next node granted.
  A's reboot proven and its after-reboot phase done, the coordinator's reset of A
  (``reboot-ok=false``) uncordons it in the same write; its plan then hands A's slot to B
  by one compare-and-swap at the Lease version naming A that carries B's workloads record
  (the health gate's, read ahead; that write is also rule 3's check of the Lease) and
  writes the grant; the plan's Events go out after its writes. Had the agent's uncordon
  been needed (an older coordinator), the handoff would start at it. The coordinator's
  requests inside each handoff are counted from the audit log. Measured apart, before the
  handoff: the time from the completion of the coordinator's reset of A to A schedulable
  again (zero when the reset uncordoned it).
- for a concurrent roll the coordinator is sampled by py-spy (``PROFILE_RATE`` Hz,
  non-blocking) and the summary goes into the notes.
- *makespan*: from the coordinator's first slot acquisition (request received) to its last
  slot release (completed). Overhead per node = (makespan - ceil(N / C) x DRAIN_REBOOT) / N
  for a roll of N nodes C at a time (``--max-concurrent C``): the wall time the roll took
  beyond the shortest possible one, where each of the C slots goes from one node's drain +
  reboot straight to the next's, spread over the nodes. With C = 1 that is all the time
  not spent in the simulated drain + reboot, the coordinator's and the agent's API round
  trips and the emulated kubelet's boot report included. With C > 1 a round trip of one
  node overlaps the others' drains: the slot time per node beyond the agent's cycle
  (C x makespan - the sum of the agents' cycles) / N is reported beside it, as the
  measure of how long a slot stands empty. The agent's cycle is its part of a slot's time:
  from the grant to its report of the reboot (and from the coordinator's reset to its
  uncordon, when the reset did not uncordon the node).
- *throttled requests*: requests the API server answered 429 during the roll (any client,
  its audit log) and the growth of ``apiserver_flowcontrol_rejected_requests_total`` (API
  priority and fairness rejections, the API server's /metrics) over the roll.

The concurrent rolls (1,000 nodes, 50 at a time; and the same split in two ``--group``s of
25 at a time each) run the same fake agents: one thread that watches every Node of the run
and a thread per node in its cycle (grant to the end of its cycle), not a process per node.

The coordinator's own ``cluo_handoff_seconds`` histogram (slot release to next grant,
measured in the process; a hand-over is timed from its request, so the reset of A that
uncordons it comes before it) is read from /metrics and reported
beside the handoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
from kubernetes.client import CoordinationV1Api, CoreV1Api
from kubernetes.watch import Watch

from bench import coord_rig, coord_scale
from bench.context import BenchContext
from bench.records import (
    BenchResult,
    Comparison,
    Measurement,
    Status,
    Target,
    check_well_formed,
    expect,
)
from bench.testbed import AuditedWrite, read_audit_log, read_audited_writes
from cluo.cycle.agent_core import PatchNode
from cluo.kube.nodes import node_patch
from cluo.protocol import SLOT_LEASE_LABEL, Keys, NodePatch, slot_lease_name
from testbed.controlplane import ControlPlane
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

log = logging.getLogger(__name__)

HANDOFF_NAME = "handoff-latency"
HANDOFF_TITLE = "1. Handoff latency"
OVERHEAD_NAME = "roll-overhead"
OVERHEAD_TITLE = "2. Roll overhead"
HANDOFF_P50_TARGET = Target(Comparison.AT_MOST, 0.01)
HANDOFF_MAX_TARGET = Target(Comparison.AT_MOST, 0.05)
OVERHEAD_TARGET = Target(Comparison.AT_MOST, 0.05)
THROTTLED_TARGET = Target(Comparison.AT_MOST, 0.0)
DRAIN_REBOOT = 0.5  # seconds: the simulated drain + reboot of every node, one at a time
CONCURRENT_DRAIN_REBOOT = {False: 2.0, True: 0.5}  # by quick, for the concurrent rolls
FAKE_AGENT_USER_AGENT = "cluo-bench-fake-agent"  # the roll's agents, as the API server sees them
GROUP_LABEL = "bench.cluo.test/group"
APF_REJECTED = "apiserver_flowcontrol_rejected_requests_total"
PROFILE_RATE = 50  # py-spy samples per second of the coordinator in a concurrent roll
EMULATOR_WORKERS = 8  # the kubelet emulator's default, for a roll one node at a time
# kube-controller-manager's default --node-monitor-grace-period from Kubernetes 1.32 on (40 s
# before): a host down for less is left as its kubelet last reported it.
NODE_MONITOR_GRACE_PERIOD = 50.0


@dataclass(frozen=True)
class RollPlan:
    """One roll: ``nodes`` nodes, ``max_concurrent`` at a time; with ``groups`` > 0 the
    nodes are split evenly in that many ``--group``s, each with max-concurrent
    ``max_concurrent // groups``."""

    nodes: int
    max_concurrent: int = 1
    groups: int = 0
    drain_reboot: float = DRAIN_REBOOT

    @property
    def key(self) -> str:
        return f"roll-{self.nodes}-{self.max_concurrent}-{self.groups}-{self.drain_reboot}"

    @property
    def label(self) -> str:
        text = f"N={self.nodes}"
        if self.max_concurrent > 1:
            text += f", {self.max_concurrent} at a time"
        if self.groups:
            text += f", {self.groups} groups"
        return text

    @property
    def shortest(self) -> float:
        """The shortest possible makespan: every slot busy with drains + reboots."""
        return math.ceil(self.nodes / self.max_concurrent) * self.drain_reboot


HANDOFF_NODES = {False: 20, True: 5}  # by quick
ROUND_TRIPS = "coordinator's API round trips inside a handoff, mean"
AGENT_SHARE = "before a handoff, A's reset to A schedulable again, p50"
OVERHEAD_PLANS = {
    False: (RollPlan(20), RollPlan(200),
            RollPlan(1000, 50, drain_reboot=CONCURRENT_DRAIN_REBOOT[False]),
            RollPlan(1000, 50, 2, drain_reboot=CONCURRENT_DRAIN_REBOOT[False])),
    True: (RollPlan(5), RollPlan(6, 3, 0, CONCURRENT_DRAIN_REBOOT[True]),
           RollPlan(6, 2, 2, CONCURRENT_DRAIN_REBOOT[True])),
}
HEARTBEAT = 30.0  # node Lease renewals of the emulator (the coordinator does not watch them)
WATCH_SECONDS = 60
AGENT_WAIT = 120.0  # seconds a fake agent waits for its Node to show a reboot or a reset
KEYS = Keys()


@dataclass(frozen=True)
class RollOutcome:
    plan: RollPlan
    makespan: float  # seconds, API server clock
    # seconds, in grant order (one at a time only): A schedulable again (its uncordon
    # completed) -> B's grant completed
    handoffs: tuple[float, ...]
    agent_cycles: tuple[float, ...]  # grant -> agent reported back, per node in grant order
    # the coordinator's reset -> the node uncordoned, per node in grant order (0: the reset
    # uncordoned it)
    agent_uncordons: tuple[float, ...]
    # how many nodes the coordinator's reset uncordoned (the rest: their agents)
    uncordoned_by_reset: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # /metrics after the roll
    wall: float = 0.0
    throttled: int = 0  # 429 answers during the roll, any client
    apf_rejected: float = 0.0  # growth of apiserver_flowcontrol_rejected_requests_total
    profile: str = ""  # py-spy's summary of the coordinator over a concurrent roll
    # the coordinator's requests inside a handoff ("verb resource" -> mean per handoff)
    handoff_requests: dict[str, float] = field(default_factory=dict)
    # per handoff, seconds the API server spent in the coordinator's requests on the path
    # (received -> completed of each: its Node and slot Lease requests inside the handoff,
    # such as the check of A and the hand-over, and the grant itself)
    handoff_server: tuple[float, ...] = ()

    @property
    def nodes(self) -> int:
        return self.plan.nodes

    @property
    def overhead_per_node(self) -> float:
        return (self.makespan - self.plan.shortest) / self.nodes

    @property
    def agent_time(self) -> float:
        """The agent's time in all the slots, seconds: its cycles and its uncordons."""
        return sum(self.agent_cycles) + sum(self.agent_uncordons)

    @property
    def agent_overhead_per_node(self) -> float:
        """What the fake agent and the emulated kubelet add to the drain + reboot, per node."""
        return self.agent_time / self.nodes - self.plan.drain_reboot

    @property
    def coordinator_overhead_per_node(self) -> float:
        """Slot time per node beyond the agent's (the coordinator's share with C = 1)."""
        return (self.plan.max_concurrent * self.makespan - self.agent_time) / self.nodes


def roll(context: BenchContext, plan: RollPlan) -> RollOutcome:
    """One roll as planned (shared by benchmarks 1 and 2 of one run)."""
    if plan.key not in context.shared:
        context.shared[plan.key] = _roll(context, plan)
    outcome: RollOutcome = context.shared[plan.key]
    return outcome


# -- the benchmarks ----------------------------------------------------------------------


def run_handoff(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    outcome = roll(context, RollPlan(HANDOFF_NODES[context.quick]))
    handoffs = outcome.handoffs
    ms = [h * 1000 for h in handoffs]
    # Before a handoff: A's reset to A schedulable again (0 when the reset uncordoned it).
    uncordons = outcome.agent_uncordons[:-1]
    count = outcome.metrics.get("cluo_handoff_seconds_count", math.nan)
    total = outcome.metrics.get("cluo_handoff_seconds_sum", math.nan)
    under_1s = outcome.metrics.get('cluo_handoff_seconds_bucket{le="1.0"}', math.nan)
    return BenchResult(
        name=HANDOFF_NAME,
        title=HANDOFF_TITLE,
        status=Status.MEASURED,
        measurements=(
            Measurement("handoff p50", statistics.median(handoffs), "s", HANDOFF_P50_TARGET,
                        detail=f"{len(handoffs)} handoffs"),
            Measurement("handoff p95 (nearest rank)", percentile(handoffs, 95), "s"),
            Measurement("handoff max", max(handoffs), "s", HANDOFF_MAX_TARGET),
            Measurement("cluo_handoff_seconds mean (in-process: hand-over sent to grant "
                        "answered)",
                        total / count if count else math.nan, "s",
                        detail=f"count {count:.0f}, {under_1s:.0f} in the le=1.0 bucket"),
            Measurement("of a handoff, the API server's time in the coordinator's requests "
                        "on the path, p50", statistics.median(outcome.handoff_server), "s",
                        detail="its Node and slot Lease requests inside the handoff and the "
                        "grant, received to completed"),
            Measurement("of a handoff, the rest (the coordinator, its client, the wire), p50",
                        statistics.median(h - s for h, s in zip(handoffs, outcome.handoff_server,
                                                                strict=True)), "s"),
            Measurement(ROUND_TRIPS,
                        sum(outcome.handoff_requests.values()), "",
                        detail="; ".join(f"{kind} {mean:.2g}" for kind, mean
                                         in sorted(outcome.handoff_requests.items()))),
            Measurement(AGENT_SHARE,
                        statistics.median(uncordons), "s",
                        detail=f"{len(uncordons)} uncordons, {outcome.uncordoned_by_reset} of "
                        f"{outcome.nodes} by the coordinator's reset, max "
                        f"{max(uncordons) * 1000:.0f} ms"),
        ),
        method=(
            f"One roll of {outcome.nodes} emulated nodes by the real cluo-coord process "
            "(cluo-coord ServiceAccount, leader election on, --max-concurrent 1), a fast fake "
            f"agent per node driven by a Node watch (simulated drain + reboot {DRAIN_REBOOT} "
            "s; the kubelet emulator leaves a host down for less than node-monitor-grace-"
            f"period, {NODE_MONITOR_GRACE_PERIOD:g} s, unmarked, as in a real cluster). The "
            "fake agents make the real agent's Node writes in its order and grouping: "
            f"{describe_agent_writes()}. The coordinator hands A's slot over only once A is "
            "schedulable again (planner rule 10); A's reboot proven and its after-reboot "
            "phase done, the coordinator's reset of A (reboot-ok=false) uncordons A in the "
            "same write. So the handoff of A to B runs from the completion of the write "
            "that made A schedulable again (that reset; an agent's uncordon, had the reset "
            "not uncordoned A) to the completion of the coordinator's write of "
            "reboot-ok=true on B, the next node granted; both times are the API server's "
            "(audit log stageTimestamp, microseconds). In between: the hand-over of A's slot "
            "Lease to B (a merge patch with the resourceVersion naming A as precondition, "
            "carrying the health gate's record of B's workloads, read ahead; that "
            "compare-and-swap is also rule 3's check that the Lease is as planned) and the "
            "grant (a node PATCH). The plan's Events go out after its writes. The round "
            "trips counted are the coordinator's non-watch requests that began after the "
            "write making A schedulable was received and ended inside the handoff, before "
            "B's grant, from the audit log; the issue's floor is one compare-and-swap on the slot "
            "Lease and the grant. Each handoff is split into the API server's time in the "
            "coordinator's requests on the path (received to completed of its Node and slot "
            "Lease requests, their part inside the handoff, and of the grant: what the "
            "server itself took to store and answer them) and "
            "the rest (the coordinator's dispatch, its client, the loopback wire, and any "
            "watch delivery and plan on the path). Measured apart, before the handoff: the "
            "time from the completion of the coordinator's reset of A to A schedulable "
            "again (zero when the reset uncordoned A; else the agent's uncordon: its watch "
            "event and its write). The coordinator's own cluo_handoff_seconds histogram "
            "(in-process, from a slot's release, or the hand-over's request, to the grant's "
            "answer) is reported beside it: it leaves out the reset of A before the "
            "hand-over."
        ),
        notes=(f"handoffs in ms, in grant order: {', '.join(f'{v:.0f}' for v in ms)}",
               "A's reset to A schedulable again in ms, in grant order: "
               f"{', '.join(f'{v * 1000:.0f}' for v in uncordons)}"),
        seconds=time.monotonic() - started,
        setup={"nodes": str(outcome.nodes), "simulated drain + reboot": f"{DRAIN_REBOOT} s",
               "max concurrent": "1"},
    )


def run_overhead(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    plans = OVERHEAD_PLANS[context.quick]
    shared = [plan for plan in plans if plan.key in context.shared]
    outcomes = [roll(context, plan) for plan in plans]
    measurements: list[Measurement] = []
    notes = [f"the roll of {plan.label} was run for benchmark 1 (its wall time is counted "
             "there)" for plan in shared]
    for outcome in outcomes:
        plan = outcome.plan
        n = plan.label
        measurements += [
            Measurement(f"{n}: makespan", outcome.makespan, "s",
                        detail=f"shortest possible ceil(N/C) x drain+reboot = "
                        f"{plan.shortest:.0f} s"),
            Measurement(f"{n}: overhead per node", outcome.overhead_per_node, "s",
                        OVERHEAD_TARGET if plan.max_concurrent > 1 else None),
        ]
        if plan.max_concurrent == 1:
            measurements += [
                Measurement(f"{n}: of it, coordinator per node",
                            outcome.coordinator_overhead_per_node, "s"),
                Measurement(f"{n}: of it, agent + emulated kubelet per node",
                            outcome.agent_overhead_per_node, "s"),
            ]
            notes.append(
                f"{n}: handoff p50 {statistics.median(outcome.handoffs) * 1000:.0f} ms, max "
                f"{max(outcome.handoffs) * 1000:.0f} ms; agent cycle (grant to reported "
                f"back) p50 {statistics.median(outcome.agent_cycles):.2f} s, reset to "
                f"uncordoned p50 {statistics.median(outcome.agent_uncordons) * 1000:.0f} ms "
                f"({outcome.uncordoned_by_reset} of {outcome.nodes} uncordoned by the reset)")
        else:
            measurements += [
                Measurement(f"{n}: slot time per node beyond the agent's cycle",
                            outcome.coordinator_overhead_per_node, "s"),
                Measurement(f"{n}: agent + emulated kubelet per node",
                            outcome.agent_overhead_per_node, "s"),
                Measurement(f"{n}: throttled requests (429)", outcome.throttled, "req",
                            THROTTLED_TARGET, detail="any client, audit log"),
                Measurement(f"{n}: API priority and fairness rejections",
                            outcome.apf_rejected, "req", THROTTLED_TARGET,
                            detail=APF_REJECTED),
            ]
            notes.append(
                f"{n}: drain + reboot {plan.drain_reboot} s per node; agent cycle (grant to "
                f"reported back) p50 {statistics.median(outcome.agent_cycles):.2f} s, max "
                f"{max(outcome.agent_cycles):.2f} s; reset to uncordoned p50 "
                f"{statistics.median(outcome.agent_uncordons) * 1000:.0f} ms, max "
                f"{max(outcome.agent_uncordons) * 1000:.0f} ms ({outcome.uncordoned_by_reset} "
                f"of {outcome.nodes} uncordoned by the reset); wall time of the roll with "
                f"its set-up {outcome.wall:.0f} s")
            if outcome.profile:
                notes.append(f"{n}: {outcome.profile}")
    return BenchResult(
        name=OVERHEAD_NAME,
        title=OVERHEAD_TITLE,
        status=Status.MEASURED,
        measurements=tuple(measurements),
        method=(
            "The same roll as benchmark 1 (one roll per plan; N=20 is shared with it), and "
            "rolls of N nodes C at a time (--max-concurrent C; then also with the nodes "
            "split in two --group NAME:SELECTOR;max-concurrent=C/2). Makespan: from the "
            "coordinator's first slot acquisition (request received) to its last slot "
            "release (completed), API server clock (audit log). Overhead per node = "
            "(makespan - ceil(N/C) x drain+reboot) / N: the wall time beyond the shortest "
            "possible roll, in which every slot goes from one node's drain + reboot "
            "straight to the next's, per node; with C = 1, (makespan - N x drain+reboot) "
            "/ N. The fake agents make the real agent's Node writes in its order and "
            f"grouping ({describe_agent_writes()}), and the coordinator hands a slot over or "
            "releases it only once its holder is uncordoned (planner rule 10; its reset "
            "uncordons a node whose reboot is proven): both are in the makespan, as with "
            "the real agent. The agent's cycle is the time from the grant to the fake "
            "agent's report, plus the time from the coordinator's reset to the agent's "
            "uncordon when the reset did not uncordon the node. Split for C = 1: the "
            "agent's part is the mean of its "
            "cycles minus the simulated drain + reboot (its "
            f"{len(agent_cycle_writes(''))} Node patches, the watch events it waits for and the "
            "emulated kubelet posting the new boot id, which a real kubelet also does); the "
            "coordinator's part is the rest. For C > 1, the slot time per node beyond the "
            "agent's cycle, (C x makespan - sum of the agents' cycles) / N, tells how long "
            "a slot stood empty. Throttled: the requests of any client the API server "
            "answered 429 during the roll (audit log), and the growth of "
            f"{APF_REJECTED} (API priority and fairness, the API server's /metrics). The "
            "fake agents are one process: one Node watch for all nodes and a thread per "
            "node in its cycle. The kubelet emulator stands in for the node lifecycle "
            f"controller with node-monitor-grace-period {NODE_MONITOR_GRACE_PERIOD:g} s (the "
            "default since Kubernetes 1.32): a host down for the few seconds of its "
            "reboot is not marked NotReady or tainted, as in a real cluster; its kubelet "
            "goes silent, then posts the new boot id and Ready."
        ),
        notes=tuple(notes),
        seconds=time.monotonic() - started,
        setup={"rolls": "; ".join(p.label for p in plans),
               "simulated drain + reboot": ", ".join(
                   sorted({f"{p.drain_reboot} s" for p in plans}))},
    )


def check_handoff(result: BenchResult) -> None:
    """The quick mode's result: a handoff per pair of nodes rolled, their p50."""
    check_well_formed(result, HANDOFF_NAME)
    nodes = HANDOFF_NODES[True]
    p50 = result.measurement("handoff p50")
    expect(f"{nodes - 1} handoffs" in p50.detail,
           f"{HANDOFF_NAME}: {nodes} nodes rolled, but the p50 is of {p50.detail!r}")
    share = result.measurement(AGENT_SHARE)
    expect(f"{nodes - 1} uncordons" in share.detail and share.value >= 0,
           f"{HANDOFF_NAME}: {nodes} nodes rolled, but A's reset to A schedulable is "
           f"{share.value!r} s of {share.detail!r}")
    trips = result.measurement(ROUND_TRIPS)
    expect(trips.value >= 1,
           f"{HANDOFF_NAME}: {trips.value!r} coordinator round trips inside a handoff, but the "
           "hand-over's compare-and-swap at least is inside it")


def check_overhead(result: BenchResult) -> None:
    """The quick mode's result: each roll took at least its simulated drains and reboots;
    the concurrent ones counted throttled requests."""
    check_well_formed(result, OVERHEAD_NAME)
    for plan in OVERHEAD_PLANS[True]:
        makespan = result.measurement(f"{plan.label}: makespan").value
        expect(makespan > plan.shortest,
               f"{OVERHEAD_NAME}: {plan.label} rolled in {makespan:.2f} s, less than its "
               f"simulated drains and reboots ({plan.shortest:.2f} s)")
        if plan.max_concurrent > 1:
            result.measurement(f"{plan.label}: throttled requests (429)")
            result.measurement(f"{plan.label}: API priority and fairness rejections")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# -- one roll ------------------------------------------------------------------------------


def _roll(context: BenchContext, plan: RollPlan) -> RollOutcome:
    began = time.monotonic()
    count = plan.nodes
    run_id = uuid.uuid4().hex[:8]
    selector = f"{coord_rig.SELECTOR_LABEL}={run_id}"
    names = [f"roll{run_id}-{i:04d}" for i in range(count)]
    workdir = context.workdir / f"{plan.key}-{run_id}"
    workdir.mkdir(parents=True)
    groups = [f"g{g}" for g in range(plan.groups)]
    flags = ["--max-concurrent", str(plan.max_concurrent)]
    for group in groups:
        flags += ["--group", f"{group}:{GROUP_LABEL}={group};max-concurrent="
                  f"{plan.max_concurrent // plan.groups}"]
    with contextlib.ExitStack() as stack, coord_rig.audited(context.plane) as plane:
        admin = stack.enter_context(plane.admin_api_client())
        kubeconfig = coord_rig.coordinator_kubeconfig(plane, workdir / "coord.kubeconfig")
        coord_rig.clean_leases(admin)
        stack.callback(coord_rig.clean_leases, admin)
        # As many emulator workers (its client's connections and KWOK's parallelism) as
        # hosts reboot at once: real kubelets boot side by side, and a request beyond the
        # client's pool would open a TLS connection of its own.
        emulator = KubeletEmulator(admin, heartbeat_interval=HEARTBEAT,
                                   workers=max(EMULATOR_WORKERS, plan.max_concurrent),
                                   node_monitor_grace_period=NODE_MONITOR_GRACE_PERIOD).start()
        stack.callback(emulator.stop, delete_nodes=True)
        for g, group in enumerate(groups or [""]):
            emulator.add_nodes(names[g::len(groups) or 1], timeout=120 + count * 0.2,
                               labels={coord_rig.SELECTOR_LABEL: run_id,
                                       **({GROUP_LABEL: group} if group else {})})
        core = CoreV1Api(admin)
        announce = request_body(ANNOUNCE)
        for i, name in enumerate(names):  # last-checked-time orders the queue: node 0 first
            announce["metadata"]["annotations"][KEYS.last_checked_time] = str(1_700_000_000 + i)
            core.patch_node(name, announce, _preload_content=False)
        agent_api = stack.enter_context(
            plane.service_account_api_client(coord_rig.NAMESPACE, coord_rig.FAKE_AGENT_ACCOUNT))
        # Named apart from the real agent in the audit log the later benchmarks read.
        agent_api.user_agent = FAKE_AGENT_USER_AGENT
        # The client's pool is sized when it is made: one connection kept per agent at work.
        agent_api.configuration.connection_pool_maxsize = plan.max_concurrent + 2
        agent_api.rest_client = kubernetes.client.rest.RESTClientObject(agent_api.configuration)
        agents = FastAgents(agent_api, emulator, selector, plan.drain_reboot)
        stack.callback(agents.stop)
        agents.start()
        rejected_before = _apf_rejected(plane)
        roll_from = datetime.now(UTC)
        coord = coord_rig.start_coordinator(kubeconfig, selector, workdir / "coord.log",
                                            leader_elect=True, flags=flags)
        stack.callback(coord.stop)
        raw = workdir / "coord-profile.raw"
        spy_errors: list[str] = []
        profiled = plan.max_concurrent > 1 and coord_scale.PY_SPY.exists()
        spy: contextlib.AbstractContextManager[None] = (
            coord_scale.py_spy_record(coord.pid, raw, spy_errors, PROFILE_RATE) if profiled
            else contextlib.nullcontext())
        coordination = CoordinationV1Api(admin)
        ours = set(names)

        def all_done() -> bool:
            if agents.errors:
                raise RuntimeError(f"fake agents failed: {agents.errors[:3]}")
            if coord.process.poll() is not None:
                raise RuntimeError(f"cluo-coord exited:\n{coord.log_tail()}")
            if not agents.all_back(names):
                return False
            leases = coordination.list_namespaced_lease(
                coord_rig.NAMESPACE, label_selector=SLOT_LEASE_LABEL).items
            return not any(lease.spec and lease.spec.holder_identity in ours
                           for lease in leases)

        try:
            with spy:
                wait_for(all_done,
                         120 + count * ((plan.drain_reboot + 5) / plan.max_concurrent + 1),
                         f"the roll of {plan.label}", interval=0.2)
        except TimeoutError as err:
            raise RuntimeError(f"{err}\n--- cluo-coord log:\n{coord.log_tail()}") from None
        roll_to = datetime.now(UTC)
        metrics = coord.metrics()
        rejected = _apf_rejected(plane) - rejected_before
        ended = time.monotonic()
        writes = read_audited_writes(plane.audit_log)
        requests = coord_scale.coordinator_requests(plane.audit_log)
        throttled = sum(1 for r in read_audit_log(plane.audit_log)
                        if r.code == 429 and roll_from <= r.received <= roll_to)
    outcome = _outcome(plan, names, writes, requests, metrics)
    profile = ""
    if profiled:
        profile = (f"py-spy record of cluo-coord over the roll, {PROFILE_RATE} Hz, "
                   f"non-blocking: {coord_scale.py_spy_summary(raw, rate=PROFILE_RATE)}"
                   if raw.exists() else f"py-spy wrote no profile: {''.join(spy_errors)[-300:]}")
    return dataclasses.replace(outcome, wall=ended - began, throttled=throttled,
                               apf_rejected=rejected, profile=profile)


def _apf_rejected(plane: ControlPlane) -> float:
    """The API server's count of requests API priority and fairness rejected, all flows."""
    total = 0.0
    for line in plane.metrics().splitlines():
        if line.startswith(APF_REJECTED + "{") or line.startswith(APF_REJECTED + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _outcome(plan: RollPlan, names: Sequence[str], writes: Sequence[AuditedWrite],
             requests: Sequence[tuple[datetime, datetime, str]],
             metrics: dict[str, float]) -> RollOutcome:
    ours = set(names)
    grants: dict[str, datetime] = {}
    grant_served: dict[str, float] = {}  # the grant's own received -> completed
    resets: dict[str, datetime] = {}  # the reset ending the cycle, not a no-op one after it
    back: dict[str, datetime] = {}  # the agent's report of the reboot
    # the write that made the node schedulable again completed (the coordinator's reset or
    # the agent's uncordon), and received
    uncordons: dict[str, datetime] = {}
    uncordons_sent: dict[str, datetime] = {}
    by_reset: set[str] = set()
    acquires: list[datetime] = []
    releases: list[datetime] = []
    for write in writes:
        if not write.ok:
            continue
        name = write.name
        if write.resource == "nodes" and name in ours:
            value = write.annotations
            if write.user == coord_rig.COORD_USER:
                if value.get(KEYS.reboot_ok) == "true" and name not in grants:
                    grants[name] = write.completed
                    grant_served[name] = (write.completed - write.received).total_seconds()
                elif (value.get(KEYS.reboot_ok) == "false" and name in grants
                      and name not in resets):
                    resets[name] = write.completed
            elif write.user == coord_rig.AGENT_USER and value.get(KEYS.reboot_needed) == "false":
                back[name] = write.completed
            if ((write.body.get("spec") or {}).get("unschedulable") is False
                    and name in grants and name not in uncordons):
                uncordons[name] = write.completed
                uncordons_sent[name] = write.received
                if write.user == coord_rig.COORD_USER:
                    by_reset.add(name)
        elif (write.resource == "leases" and write.user == coord_rig.COORD_USER
              and name.startswith(slot_lease_name(0).rsplit("-", 1)[0])):
            spec = write.body.get("spec")  # none in a patch of annotations only
            holder = (spec or {}).get("holderIdentity")
            if holder in ours:
                acquires.append(write.received)
            elif spec is not None and not holder and acquires:
                releases.append(write.completed)
    missing = [n for n in names if not all(n in d for d in (grants, resets, back, uncordons))]
    if missing or not acquires or not releases:
        raise RuntimeError(f"the audit log lacks writes for {len(missing)} node(s) "
                           f"(first: {missing[:3]}), {len(acquires)} acquires, "
                           f"{len(releases)} releases")
    order = sorted(names, key=lambda n: grants[n])
    pairs = [] if plan.max_concurrent > 1 else list(itertools.pairwise(order))
    # Planner rule 10: A's slot goes to B only once A is schedulable again.
    early = [(a, b) for a, b in pairs if grants[b] <= uncordons[a]]
    if early:
        raise RuntimeError(f"{len(early)} node(s) granted before the one before them was "
                           f"uncordoned (first: {early[0]})")
    handoffs = tuple((grants[b] - uncordons[a]).total_seconds() for a, b in pairs)
    on_path: Counter[str] = Counter()  # the coordinator's requests inside the handoffs
    served: list[float] = []
    for a, b in pairs:
        # A watch may show A's uncordon before the API server has finished answering its
        # writer: a request sent after the uncordon was received that ends inside the
        # handoff is on its path, and counts with its part inside the handoff.
        start, end = uncordons[a], grants[b]
        inside = [(max(received, start), completed, kind)
                  for received, completed, kind in requests
                  if uncordons_sent[a] < received and start < completed < end]
        on_path.update(kind for _, _, kind in inside)
        served.append(grant_served[b] + sum((completed - received).total_seconds()
                                            for received, completed, kind in inside
                                            if kind.endswith((" nodes", " leases"))))
    cycles = tuple((back[n] - grants[n]).total_seconds() for n in order)
    agent_uncordons = tuple((uncordons[n] - resets[n]).total_seconds() for n in order)
    makespan = (max(releases) - min(acquires)).total_seconds()
    return RollOutcome(plan, makespan, handoffs, cycles, agent_uncordons, len(by_reset),
                       metrics,
                       handoff_requests={k: v / len(pairs) for k, v in on_path.items()}
                       if pairs else {}, handoff_server=tuple(served))


# -- the fake agents --------------------------------------------------------------------------


# cluo-agent's writes in a normal cycle (cluo/cycle/agent_core.py: its docstring's list of
# writes, and the decision of each state named below), as its PatchNode actions, one a
# request, grouped into requests as the agent groups them: the one place that says what the
# fake agents write.
# RebootNeeded: reboot-needed (annotation and label) with its reason; the roll's set-up.
ANNOUNCE = PatchNode(NodePatch(reboot_needed=True, reboot_reason="cluo bench: roll"))
# Granted, at reboot-ok=true: the grant taken and the node cordoned by the agent.
TAKE_GRANT = (PatchNode(NodePatch(reboot_in_progress=True, agent_made_unschedulable=True,
                                  blocked_reason=""), unschedulable=True),)


def drained(boot_id: str) -> tuple[PatchNode, ...]:
    """Draining, the drain complete: the boot id before the reboot recorded."""
    return (PatchNode(NodePatch(boot_id_before_reboot=boot_id, blocked_reason="")),)


# Rebooted, booted with a new boot id: the reboot reported.
REPORT_REBOOT = (PatchNode(NodePatch(reboot_needed=False, reboot_in_progress=False,
                                     blocked_reason="", reboot_reason="")),)
# Uncordoning, at reboot-ok=false, only when the coordinator's reset left the agent's mark
# or the boot id (an older coordinator's reset; cluo-coord's reset of a proven reboot
# uncordons the node and removes both, and the agent then writes nothing): the mark and the
# boot id removed, and the node uncordoned if it is still cordoned with the mark.
FINISH = (PatchNode(NodePatch(agent_made_unschedulable=False, boot_id_before_reboot="")),)
UNCORDON = (PatchNode(FINISH[0].patch, unschedulable=False),)


def agent_cycle_writes(boot_id: str) -> tuple[PatchNode, ...]:
    """Every request of a node's cycle, in order (cluo-coord's reset ends it)."""
    return TAKE_GRANT + drained(boot_id) + REPORT_REBOOT


def request_body(write: PatchNode) -> dict[str, Any]:
    """The merge patch cluo-agent sends for ``write`` (cluo/cycle/node_actions.py: one
    request of its metadata and spec.unschedulable, ``cluo.kube.nodes.node_patch``)."""
    metadata = write.patch.to_metadata(KEYS)
    return node_patch(annotations=metadata.annotations, labels=metadata.labels,
                      unschedulable=write.unschedulable)


def describe_agent_writes() -> str:
    """The cycle's writes as the benchmarks' methods tell them."""
    def patches(writes: tuple[PatchNode, ...]) -> str:
        return "one patch" if len(writes) == 1 else f"{len(writes)} patches"
    return (f"at the grant, the grant taken and the node cordoned ({patches(TAKE_GRANT)}); "
            f"the boot id recorded ({patches(drained(''))}); after the reboot, its report "
            f"({patches(REPORT_REBOOT)}); nothing at the coordinator's reset, which "
            "uncordons the node and removes the agent's mark and boot id (had a reset left "
            f"them, the agent's {patches(FINISH)} would remove them, with the uncordon in it "
            "if the node were still cordoned with the mark)")


@dataclass(frozen=True)
class _Seen:
    """A node as the fake agents' watch last showed it."""

    annotations: dict[str, str]
    boot: str
    ready: bool
    unschedulable: bool


class FastAgents:
    """Plays cluo-agent on every node of ``selector``, driven by one Node watch.

    A node's cycle makes the real agent's Node writes, in its order and grouping (the
    PatchNodes above): on reboot-ok=true (with reboot-needed=true, not in progress)
    TAKE_GRANT, then ``drained``; the host off, and on with a new boot id ``drain_reboot``
    seconds after its going off began; once the Node shows it Ready, REPORT_REBOOT; then,
    when the watch shows the coordinator's reboot-ok=false, nothing if the reset removed the
    agent's mark and boot id (cluo-coord's reset of a proven reboot), else FINISH, or
    UNCORDON if the node is still cordoned with the mark, as agent_core's Uncordoning.
    Writes as the stand-in account of bench/coord_rig.py.
    """

    def __init__(self, api: kubernetes.client.ApiClient, emulator: KubeletEmulator,
                 selector: str, drain_reboot: float) -> None:
        self._core = CoreV1Api(api)
        self._emulator = emulator
        self._selector = selector
        self._drain_reboot = drain_reboot
        self._lock = threading.Lock()
        # One condition a node, all on the one lock: a Node event wakes only the worker of
        # its node, as a real agent watches only its own (a condition for all would wake
        # every waiting worker on every event of a 1,000-node roll).
        self._changed: dict[str, threading.Condition] = {}
        self._seen: dict[str, _Seen] = {}
        self._busy: set[str] = set()
        self._stop = threading.Event()
        self._watch: Any = None
        self._workers: list[threading.Thread] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="bench-agents", daemon=True)
        self._synced = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if not self._synced.wait(30):
            raise RuntimeError("the fake agents' node watch did not start")

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for changed in self._changed.values():
                changed.notify_all()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(WATCH_SECONDS + 5)
        for worker in self._workers:
            worker.join(30)

    def all_back(self, names: Sequence[str]) -> bool:
        """Every node rebooted, reset by the coordinator and uncordoned, its marks cleared."""
        with self._lock:
            for name in names:
                seen = self._seen.get(name)
                if seen is None or name in self._busy or seen.unschedulable:
                    return False
                annotations = seen.annotations
                if (annotations.get(KEYS.reboot_needed) != "false"
                        or annotations.get(KEYS.reboot_ok) != "false"
                        or annotations.get(KEYS.agent_made_unschedulable) == "true"
                        or KEYS.boot_id_before_reboot in annotations):
                    return False
        return True

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    response = self._core.list_node(label_selector=self._selector,
                                                    _preload_content=False)
                    listed = json.loads(response.data)  # type: ignore[attr-defined]
                    for node in listed["items"]:
                        self._observe(node)
                    version = str(listed["metadata"].get("resourceVersion", ""))
                    self._synced.set()
                self._watch = Watch()  # type: ignore[no-untyped-call]
                # Raw JSON events: the client's model objects cost milliseconds a Node,
                # which in a 1,000-node roll made this one thread the bench's bottleneck.
                for event in self._watch.stream(
                        self._core.list_node, label_selector=self._selector,
                        resource_version=version, timeout_seconds=WATCH_SECONDS,
                        deserialize=False):
                    if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
                        raise RuntimeError(f"node watch: {event.get('object')!r}")
                    node = event["object"]
                    version = node["metadata"]["resourceVersion"]
                    self._observe(node)
                    if self._stop.is_set():
                        break
            except Exception as err:
                if self._stop.is_set():
                    return
                log.warning("fake agents' watch failed, listing again",
                            extra={"ERROR": repr(err)})
                version = ""
                self._stop.wait(0.2)

    def _observe(self, node: dict[str, Any]) -> None:
        metadata = node["metadata"]
        name = str(metadata["name"])
        annotations = dict(metadata.get("annotations") or {})
        status = node.get("status") or {}
        boot = str((status.get("nodeInfo") or {}).get("bootID") or "")
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        unschedulable = bool((node.get("spec") or {}).get("unschedulable"))
        with self._lock:
            self._seen[name] = _Seen(annotations, boot, ready, unschedulable)
            self._condition(name).notify_all()
            start = (annotations.get(KEYS.reboot_ok) == "true"
                     and annotations.get(KEYS.reboot_needed) == "true"
                     and annotations.get(KEYS.reboot_in_progress) != "true"
                     and name not in self._busy)
            if start:
                self._busy.add(name)
        if start:
            worker = threading.Thread(target=self._cycle, args=(name, boot), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _cycle(self, name: str, old_boot: str) -> None:
        try:
            self._write(name, TAKE_GRANT)
            self._write(name, drained(old_boot))
            host = self._emulator.node(name)
            # The host going down is part of its drain + reboot, not time on top of it.
            rebooted_at = time.monotonic() + self._drain_reboot
            host.shutdown()
            time.sleep(max(0.0, rebooted_at - time.monotonic()))
            new_boot = host.boot()
            self._wait(name, lambda seen: (seen.boot, seen.ready) == (new_boot, True),
                       "the Node to show its new boot id, Ready")
            self._write(name, REPORT_REBOOT)
            self._wait(name, lambda seen: seen.annotations.get(KEYS.reboot_ok) == "false",
                       "the coordinator's reset (reboot-ok=false)")
            with self._lock:
                seen = self._seen[name]
            if (KEYS.agent_made_unschedulable in seen.annotations
                    or KEYS.boot_id_before_reboot in seen.annotations):
                cordoned = (seen.unschedulable
                            and seen.annotations.get(KEYS.agent_made_unschedulable) == "true")
                self._write(name, UNCORDON if cordoned else FINISH)
        except Exception as err:
            if not self._stop.is_set():
                self.errors.append(f"{name}: {err!r}")
        finally:
            with self._lock:
                self._busy.discard(name)

    def _wait(self, name: str, shown: Callable[[_Seen], bool], what: str) -> None:
        with self._lock:
            if not self._condition(name).wait_for(
                    lambda: self._stop.is_set() or shown(self._seen[name]), AGENT_WAIT):
                raise TimeoutError(f"{name}: waited {AGENT_WAIT:g} s for {what}")

    def _condition(self, name: str) -> threading.Condition:
        """The node's condition; call with the lock held."""
        changed = self._changed.get(name)
        if changed is None:
            changed = self._changed[name] = threading.Condition(self._lock)
        return changed

    def _write(self, name: str, writes: Sequence[PatchNode]) -> None:
        for write in writes:
            # The answer is read as bytes, not into the client's models (milliseconds a
            # Node, on the one interpreter all the agents share); the agent has no use for it.
            response = self._core.patch_node(name, request_body(write), _preload_content=False)
            response.read()  # type: ignore[attr-defined]  # the connection goes back to the pool
