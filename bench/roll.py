"""Benchmarks 1 and 2: handoff latency and roll overhead, from one roll of N virtual nodes.

The real ``cluo-coord`` process (console script, cluo-coord ServiceAccount, leader
election on as deployed, --max-concurrent 1) rolls N nodes of the kubelet emulator that
all report ``reboot-needed=true`` (queued by last-checked-time). A fast fake agent per node
(``FastAgents``, authenticated as the stand-in account of bench/coord_rig.py) reacts to
one Node watch: on ``reboot-ok=true`` it writes ``reboot-in-progress=true`` and
``boot-id-before-reboot`` as the real agent does, powers the emulated host off, waits
``DRAIN_REBOOT`` seconds (the simulated drain + reboot), boots it with a new boot id,
waits for the Node to show it, and reports ``reboot-needed=false,
reboot-in-progress=false``.

Every time is the API server's, from its audit log (the bodies of Node patches and of
cluo-system Lease writes are logged, see bench/testbed.py), at microsecond resolution:

- *handoff* of node A to node B: from the completion of the coordinator's write of
  ``reboot-ok=false`` on A (A is done: the after-reboot phase completed) to the completion
  of its write of ``reboot-ok=true`` on B, the next node granted. In between the
  coordinator releases A's slot, takes it for B, labels B before-reboot, posts Events,
  re-reads the slot Lease and writes the grant.
- *makespan*: from the coordinator's first slot acquisition (request received) to its last
  slot release (completed). Overhead per node = (makespan - N x DRAIN_REBOOT) / N: all
  the time not spent in the simulated drain + reboot, the coordinator's and the agent's
  API round trips and the emulated kubelet's boot report included.

The coordinator's own ``cluo_handoff_seconds`` histogram (slot release to next grant,
measured in the process) is read from /metrics as a cross-check.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import kubernetes.client
from kubernetes.client import CoordinationV1Api, CoreV1Api
from kubernetes.watch import Watch

from bench import coord_rig
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
from bench.testbed import AuditedWrite, read_audited_writes
from cluo.protocol import Keys, slot_lease_name
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

log = logging.getLogger(__name__)

HANDOFF_NAME = "handoff-latency"
HANDOFF_TITLE = "1. Handoff latency"
OVERHEAD_NAME = "roll-overhead"
OVERHEAD_TITLE = "2. Roll overhead"
HANDOFF_P50_TARGET = Target(Comparison.AT_MOST, 0.2)
HANDOFF_MAX_TARGET = Target(Comparison.AT_MOST, 1.0)
OVERHEAD_TARGET = Target(Comparison.AT_MOST, 0.5)
DRAIN_REBOOT = 0.5  # seconds: the simulated drain + reboot of every node
FAKE_AGENT_USER_AGENT = "cluo-bench-fake-agent"  # the roll's agents, as the API server sees them
HANDOFF_NODES = {False: 20, True: 5}  # by quick
OVERHEAD_NODES = {False: (20, 200), True: (5,)}
HEARTBEAT = 30.0  # node Lease renewals of the emulator (the coordinator does not watch them)
WATCH_SECONDS = 60
KEYS = Keys()


@dataclass(frozen=True)
class RollOutcome:
    nodes: int
    makespan: float  # seconds, API server clock
    handoffs: tuple[float, ...]  # seconds, in grant order
    agent_cycles: tuple[float, ...]  # grant -> agent reported back, per node
    metrics: dict[str, float] = field(default_factory=dict)  # /metrics after the roll
    wall: float = 0.0

    @property
    def overhead_per_node(self) -> float:
        return (self.makespan - self.nodes * DRAIN_REBOOT) / self.nodes

    @property
    def agent_overhead_per_node(self) -> float:
        """What the fake agent and the emulated kubelet add to DRAIN_REBOOT, per node."""
        return statistics.mean(self.agent_cycles) - DRAIN_REBOOT

    @property
    def coordinator_overhead_per_node(self) -> float:
        return (self.makespan - sum(self.agent_cycles)) / self.nodes


def roll(context: BenchContext, nodes: int) -> RollOutcome:
    """One roll of ``nodes`` virtual nodes (shared by benchmarks 1 and 2 of one run)."""
    key = f"roll-{nodes}"
    if key not in context.shared:
        context.shared[key] = _roll(context, nodes)
    outcome: RollOutcome = context.shared[key]
    return outcome


# -- the benchmarks ----------------------------------------------------------------------


def run_handoff(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    outcome = roll(context, HANDOFF_NODES[context.quick])
    handoffs = outcome.handoffs
    ms = [h * 1000 for h in handoffs]
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
            Measurement("cross-check: cluo_handoff_seconds mean (release to grant)",
                        total / count if count else math.nan, "s",
                        detail=f"count {count:.0f}, {under_1s:.0f} in the le=1.0 bucket"),
        ),
        method=(
            f"One roll of {outcome.nodes} emulated nodes by the real cluo-coord process "
            "(cluo-coord ServiceAccount, leader election on, --max-concurrent 1), a fast fake "
            f"agent per node driven by a Node watch (simulated drain + reboot {DRAIN_REBOOT} "
            "s). Handoff of A to B: from the completion of the coordinator's write of "
            "reboot-ok=false on A (A is done: its after-reboot phase completed) to the "
            "completion of its write of reboot-ok=true on B, the next node granted; both "
            "times are the API server's (audit log stageTimestamp, microseconds). In "
            "between: release A's slot Lease, take it for B, label B before-reboot, post "
            "Events, re-read the slot Lease, write the grant. The coordinator's own "
            "cluo_handoff_seconds histogram (slot release to grant, in-process) is the "
            "cross-check."
        ),
        notes=(f"handoffs in ms, in grant order: {', '.join(f'{v:.0f}' for v in ms)}",),
        seconds=time.monotonic() - started,
        setup={"nodes": str(outcome.nodes), "simulated drain + reboot": f"{DRAIN_REBOOT} s",
               "max concurrent": "1"},
    )


def run_overhead(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    shared = [n for n in OVERHEAD_NODES[context.quick] if f"roll-{n}" in context.shared]
    outcomes = [roll(context, n) for n in OVERHEAD_NODES[context.quick]]
    measurements: list[Measurement] = []
    notes = [f"the roll of N={n} was run for benchmark 1 (its wall time is counted there)"
             for n in shared]
    for outcome in outcomes:
        n = outcome.nodes
        measurements += [
            Measurement(f"N={n}: makespan", outcome.makespan, "s",
                        detail=f"N x drain+reboot = {n * DRAIN_REBOOT:.0f} s"),
            Measurement(f"N={n}: overhead per node", outcome.overhead_per_node, "s",
                        OVERHEAD_TARGET),
            Measurement(f"N={n}: of it, coordinator per node",
                        outcome.coordinator_overhead_per_node, "s"),
            Measurement(f"N={n}: of it, agent + emulated kubelet per node",
                        outcome.agent_overhead_per_node, "s"),
        ]
        notes.append(
            f"N={n}: handoff p50 {statistics.median(outcome.handoffs) * 1000:.0f} ms, max "
            f"{max(outcome.handoffs) * 1000:.0f} ms; agent cycle (grant to reported back) "
            f"p50 {statistics.median(outcome.agent_cycles):.2f} s")
    return BenchResult(
        name=OVERHEAD_NAME,
        title=OVERHEAD_TITLE,
        status=Status.MEASURED,
        measurements=tuple(measurements),
        method=(
            "The same roll as benchmark 1 (one roll per N; N=20 is shared with it). "
            "Makespan: from the coordinator's first slot acquisition (request received) to "
            "its last slot release (completed), API server clock (audit log). Overhead per "
            f"node = (makespan - N x {DRAIN_REBOOT} s) / N. Split: the agent's part is the "
            "mean time from the grant to the fake agent's report minus the simulated "
            "drain + reboot (its two Node patches and the emulated kubelet posting the new "
            "boot id, which a real kubelet also does); the coordinator's part is the rest "
            "(per node: slot take and release, before/after-reboot labels, grant, reset, "
            "four Events, the guard read of the slot Lease)."
        ),
        notes=tuple(notes),
        seconds=time.monotonic() - started,
        setup={"N": ", ".join(str(o.nodes) for o in outcomes),
               "simulated drain + reboot": f"{DRAIN_REBOOT} s", "max concurrent": "1"},
    )


def check_handoff(result: BenchResult) -> None:
    """The quick mode's result: a handoff per pair of nodes rolled, their p50."""
    check_well_formed(result, HANDOFF_NAME)
    nodes = HANDOFF_NODES[True]
    p50 = result.measurement("handoff p50")
    expect(f"{nodes - 1} handoffs" in p50.detail,
           f"{HANDOFF_NAME}: {nodes} nodes rolled, but the p50 is of {p50.detail!r}")


def check_overhead(result: BenchResult) -> None:
    """The quick mode's result: each roll took at least its simulated drains and reboots."""
    check_well_formed(result, OVERHEAD_NAME)
    for nodes in OVERHEAD_NODES[True]:
        makespan = result.measurement(f"N={nodes}: makespan").value
        expect(makespan > nodes * DRAIN_REBOOT,
               f"{OVERHEAD_NAME}: N={nodes} rolled in {makespan:.2f} s, less than its "
               f"simulated drains and reboots ({nodes} x {DRAIN_REBOOT} s)")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# -- one roll ------------------------------------------------------------------------------


def _roll(context: BenchContext, count: int) -> RollOutcome:
    began = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    selector = f"{coord_rig.SELECTOR_LABEL}={run_id}"
    names = [f"roll{run_id}-{i:03d}" for i in range(count)]
    workdir = context.workdir / f"roll-{count}-{run_id}"
    workdir.mkdir(parents=True)
    with contextlib.ExitStack() as stack, coord_rig.audited(context.plane) as plane:
        admin = stack.enter_context(plane.admin_api_client())
        kubeconfig = coord_rig.coordinator_kubeconfig(plane, workdir / "coord.kubeconfig")
        coord_rig.clean_leases(admin)
        stack.callback(coord_rig.clean_leases, admin)
        emulator = KubeletEmulator(admin, heartbeat_interval=HEARTBEAT).start()
        stack.callback(emulator.stop, delete_nodes=True)
        emulator.add_nodes(names, labels={coord_rig.SELECTOR_LABEL: run_id}, timeout=120)
        core = CoreV1Api(admin)
        for i, name in enumerate(names):  # last-checked-time orders the queue: node 0 first
            core.patch_node(name, {"metadata": {"annotations": {
                KEYS.reboot_needed: "true", KEYS.last_checked_time: str(1_700_000_000 + i)}}})
        agent_api = stack.enter_context(
            plane.service_account_api_client(coord_rig.NAMESPACE, coord_rig.FAKE_AGENT_ACCOUNT))
        # Named apart from the real agent in the audit log the later benchmarks read.
        agent_api.user_agent = FAKE_AGENT_USER_AGENT
        agents = FastAgents(agent_api, emulator, selector, DRAIN_REBOOT)
        stack.callback(agents.stop)
        agents.start()
        coord = coord_rig.start_coordinator(kubeconfig, selector, workdir / "coord.log",
                                            leader_elect=True)
        stack.callback(coord.stop)
        coordination = CoordinationV1Api(admin)

        def all_done() -> bool:
            if agents.errors:
                raise RuntimeError(f"fake agents failed: {agents.errors[:3]}")
            if coord.process.poll() is not None:
                raise RuntimeError(f"cluo-coord exited:\n{coord.log_tail()}")
            if not agents.all_back(names):
                return False
            lease = coordination.read_namespaced_lease(slot_lease_name(0), coord_rig.NAMESPACE)
            return not (lease.spec and lease.spec.holder_identity)

        try:
            wait_for(all_done, 120 + count * (DRAIN_REBOOT + 5), f"the roll of {count} nodes",
                     interval=0.2)
        except TimeoutError as err:
            raise RuntimeError(f"{err}\n--- cluo-coord log:\n{coord.log_tail()}") from None
        metrics = coord.metrics()
        ended = time.monotonic()
        writes = read_audited_writes(plane.audit_log)
    outcome = _outcome(names, writes, metrics)
    return RollOutcome(outcome.nodes, outcome.makespan, outcome.handoffs, outcome.agent_cycles,
                       metrics, wall=ended - began)


def _outcome(names: Sequence[str], writes: Sequence[AuditedWrite],
             metrics: dict[str, float]) -> RollOutcome:
    ours = set(names)
    grants: dict[str, datetime] = {}
    resets: dict[str, datetime] = {}
    back: dict[str, datetime] = {}
    acquires: list[datetime] = []
    releases: list[datetime] = []
    for write in writes:
        if not write.ok:
            continue
        if write.resource == "nodes" and write.name in ours:
            value = write.annotations
            if write.user == coord_rig.COORD_USER:
                if value.get(KEYS.reboot_ok) == "true":
                    grants.setdefault(write.name, write.completed)
                elif value.get(KEYS.reboot_ok) == "false":
                    resets[write.name] = write.completed
            elif write.user == coord_rig.AGENT_USER and value.get(KEYS.reboot_needed) == "false":
                back[write.name] = write.completed
        elif (write.resource == "leases" and write.user == coord_rig.COORD_USER
              and write.name.startswith(slot_lease_name(0).rsplit("-", 1)[0])):
            holder = (write.body.get("spec") or {}).get("holderIdentity")
            if holder in ours:
                acquires.append(write.received)
            elif not holder and acquires:
                releases.append(write.completed)
    missing = [n for n in names if n not in grants or n not in resets or n not in back]
    if missing or not acquires or not releases:
        raise RuntimeError(f"the audit log lacks writes for {len(missing)} node(s) "
                           f"(first: {missing[:3]}), {len(acquires)} acquires, "
                           f"{len(releases)} releases")
    order = sorted(names, key=lambda n: grants[n])
    handoffs = tuple((grants[b] - resets[a]).total_seconds() for a, b in itertools.pairwise(order))
    cycles = tuple((back[n] - grants[n]).total_seconds() for n in order)
    makespan = (max(releases) - min(acquires)).total_seconds()
    return RollOutcome(len(names), makespan, handoffs, cycles, metrics)


# -- the fake agents --------------------------------------------------------------------------


class FastAgents:
    """Plays cluo-agent on every node of ``selector``, driven by one Node watch.

    On reboot-ok=true (with reboot-needed=true, not in progress): reboot-in-progress=true
    and boot-id-before-reboot, host off, ``drain_reboot`` seconds, host on with a new boot
    id, wait for the Node to show it Ready, then reboot-needed=false and
    reboot-in-progress=false. Writes as the stand-in account of bench/coord_rig.py.
    """

    def __init__(self, api: kubernetes.client.ApiClient, emulator: KubeletEmulator,
                 selector: str, drain_reboot: float) -> None:
        self._core = CoreV1Api(api)
        self._emulator = emulator
        self._selector = selector
        self._drain_reboot = drain_reboot
        self._changed = threading.Condition()
        self._seen: dict[str, tuple[dict[str, str], str, bool]] = {}  # annotations, boot, ready
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
        with self._changed:
            self._changed.notify_all()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(WATCH_SECONDS + 5)
        for worker in self._workers:
            worker.join(30)

    def all_back(self, names: Sequence[str]) -> bool:
        with self._changed:
            for name in names:
                seen = self._seen.get(name)
                if seen is None or name in self._busy:
                    return False
                annotations = seen[0]
                if (annotations.get(KEYS.reboot_needed) != "false"
                        or annotations.get(KEYS.reboot_ok) != "false"):
                    return False
        return True

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    listed = self._core.list_node(label_selector=self._selector)
                    for node in listed.items:
                        self._observe(node)
                    version = str(listed.metadata.resource_version if listed.metadata else "")
                    self._synced.set()
                self._watch = Watch()  # type: ignore[no-untyped-call]
                for event in self._watch.stream(
                        self._core.list_node, label_selector=self._selector,
                        resource_version=version, timeout_seconds=WATCH_SECONDS):
                    node = event["object"]
                    version = node.metadata.resource_version
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

    def _observe(self, node: Any) -> None:
        name = str(node.metadata.name)
        annotations = dict(node.metadata.annotations or {})
        info = node.status.node_info if node.status else None
        boot = str(info.boot_id) if info and info.boot_id else ""
        ready = any(c.type == "Ready" and c.status == "True"
                    for c in (node.status.conditions or []) if node.status)
        with self._changed:
            self._seen[name] = (annotations, boot, ready)
            self._changed.notify_all()
            start = (annotations.get(KEYS.reboot_ok) == "true"
                     and annotations.get(KEYS.reboot_needed) == "true"
                     and annotations.get(KEYS.reboot_in_progress) != "true"
                     and name not in self._busy)
            if start:
                self._busy.add(name)
        if start:
            worker = threading.Thread(target=self._reboot, args=(name, boot), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _reboot(self, name: str, old_boot: str) -> None:
        try:
            self._annotate(name, {KEYS.reboot_in_progress: "true",
                                  KEYS.boot_id_before_reboot: old_boot})
            host = self._emulator.node(name)
            host.shutdown()
            time.sleep(self._drain_reboot)
            new_boot = host.boot()
            with self._changed:
                shown = self._changed.wait_for(
                    lambda: self._stop.is_set() or self._seen[name][1:] == (new_boot, True), 30)
            if not shown:
                raise TimeoutError(f"{name} did not show its new boot id within 30 s")
            self._annotate(name, {KEYS.reboot_needed: "false", KEYS.reboot_in_progress: "false"})
        except Exception as err:
            self.errors.append(f"{name}: {err!r}")
        finally:
            with self._changed:
                self._busy.discard(name)

    def _annotate(self, name: str, values: dict[str, str]) -> None:
        self._core.patch_node(name, {"metadata": {"annotations": values}})
