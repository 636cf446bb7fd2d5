"""Benchmark 4: the coordinator at 1,000 and 5,000 nodes (Kubernetes' supported maximum).

Node objects are created directly, as the kubelet registers them (Ready, a boot id, the
emulator's status), with no heartbeats: the coordinator watches Nodes, not node Leases,
and a kubelet's status report every 5 minutes would only add noise. The nodes of a run
carry a label the coordinator selects on. Then the real ``cluo-coord`` process
(console script, cluo-coord ServiceAccount, leader election on, --max-concurrent 8) is
started, and from /proc/PID:

- *RSS*: ``VmRSS`` once it reported ready (both caches synced) and its first plans are
  done (the process went quiet), and ``VmHWM``, the peak so far;
- *idle CPU*: CPU seconds (utime + stime) over a quiet window (the loop plans every 2 s
  even when nothing changes);
- *CPU per 1,000 node updates*: the bench patches ``last-checked-time`` on that many nodes
  (an annotation the agent refreshes; it changes no plan of a node that needs no reboot),
  8 writers in parallel; the coordinator's CPU delta from the first patch until it went
  quiet, minus the idle rate over the same time, scaled to 1,000;
- *time to a grant decision*: a node gets ``reboot-needed=true``; from the completion of
  that write to the completion of the coordinator's ``reboot-ok=true`` on it, both from
  the API server's audit log. In between: the watch event, a plan over all nodes, the
  slot Lease taken, the before-reboot label, an Event, a second plan, the slot Lease
  re-read, the grant. Repeated on different nodes (each keeps its slot).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client import CoreV1Api

from bench import coord_rig
from bench.context import BenchContext
from bench.records import BenchResult, Comparison, Measurement, Status, Target
from bench.testbed import read_audited_writes
from cluo_host.protocol import Keys
from tests.testbed.waiting import wait_for

log = logging.getLogger(__name__)

NAME = "coordinator-scale"
TITLE = "4. Coordinator scale"
RSS_TARGET = Target(Comparison.AT_MOST, 200.0)  # MB, at 5,000 nodes
DECISION_TARGET = Target(Comparison.AT_MOST, 0.1)  # s
SIZES = {False: (1000, 5000), True: (100,)}
UPDATES = {False: 1000, True: 100}
DECISIONS = {False: 5, True: 2}
IDLE_WINDOW = {False: 10.0, True: 4.0}
MAX_CONCURRENT = 8
WRITERS = 8
KEYS = Keys()
MB = 1_000_000


@dataclass(frozen=True)
class SizeResult:
    nodes: int
    ready_after: float  # s from start to /readyz 200
    rss: float  # MB
    peak_rss: float  # MB
    idle_cpu: float  # fraction of one CPU
    cpu_per_1000: float  # CPU seconds per 1,000 node updates
    update_seconds: float  # how long the bench took to write the updates
    decisions: tuple[float, ...]  # s


def run(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    selector = f"{coord_rig.SELECTOR_LABEL}={run_id}"
    workdir = context.workdir / f"coord-scale-{run_id}"
    workdir.mkdir(parents=True)
    results: list[SizeResult] = []
    with contextlib.ExitStack() as stack, coord_rig.audited(context.plane) as plane:
        admin = stack.enter_context(plane.admin_api_client())
        admin.configuration.connection_pool_maxsize = WRITERS + 2
        kubeconfig = coord_rig.coordinator_kubeconfig(plane, workdir / "coord.kubeconfig")
        coord_rig.clean_leases(admin)
        stack.callback(coord_rig.clean_leases, admin)
        core = CoreV1Api(admin)
        stack.callback(_delete_nodes, core, selector)
        names: list[str] = []
        for size in SIZES[context.quick]:
            fresh = [f"scale{run_id}-{i:05d}" for i in range(len(names), size)]
            _parallel(lambda name: _create_node(core, name, run_id), fresh)
            names += fresh
            log.info("nodes created", extra={"NODES": len(names)})
            coord_rig.clean_leases(admin)
            results.append(_measure(context, plane.audit_log, core, kubeconfig=kubeconfig,
                                    selector=selector, names=names,
                                    log_path=workdir / f"coord-{size}.log"))
        profile = ""
        if any(not DECISION_TARGET.met_by(max(r.decisions)) for r in results):
            coord_rig.clean_leases(admin)
            profile = _profile(core, kubeconfig=kubeconfig, selector=selector, names=names,
                               workdir=workdir, decisions=DECISIONS[context.quick])
    return _result(results, context, time.monotonic() - started, profile)


def _measure(context: BenchContext, audit_log: Path, core: CoreV1Api, *, kubeconfig: Path,
             selector: str, names: Sequence[str], log_path: Path) -> SizeResult:
    began = time.monotonic()
    coord = coord_rig.CoordProcess.start(kubeconfig, selector, log_path, leader_elect=True,
                                         flags=("--max-concurrent", str(MAX_CONCURRENT)))
    ready_after = time.monotonic() - began
    try:
        wait_for(coord.leading, 60, "cluo-coord to lead")
        pid = coord.pid
        coord_rig.wait_quiet(pid, quiet_for=2.0, tolerance=0.1 + len(names) / 20_000)
        rss = coord_rig.rss_bytes(pid) / MB
        window = IDLE_WINDOW[context.quick]
        before = coord_rig.cpu_seconds(pid)
        time.sleep(window)
        idle_rate = (coord_rig.cpu_seconds(pid) - before) / window

        updates = names[:UPDATES[context.quick]]
        before, at = coord_rig.cpu_seconds(pid), time.monotonic()
        stamp = int(time.time())
        _parallel(lambda name: core.patch_node(name, {"metadata": {"annotations": {
            KEYS.last_checked_time: str(stamp)}}}, _preload_content=False), updates)
        update_seconds = time.monotonic() - at
        coord_rig.wait_quiet(pid, quiet_for=2.0, tolerance=idle_rate * 2.0 * 1.5 + 0.05)
        elapsed = time.monotonic() - at
        used = coord_rig.cpu_seconds(pid) - before - idle_rate * elapsed
        cpu_per_1000 = max(used, 0.0) * 1000 / len(updates)

        decided = names[-DECISIONS[context.quick]:]
        _decide(core, decided)
        peak = coord_rig.rss_bytes(pid, "VmHWM") / MB
        if coord.process.poll() is not None:
            raise RuntimeError(f"cluo-coord exited:\n{coord.log_tail()}")
    finally:
        coord.stop()
    decisions = _decision_times(audit_log, decided)
    _undecide(core, decided)
    return SizeResult(len(names), ready_after, rss, peak, idle_rate, cpu_per_1000,
                      update_seconds, decisions)


def _decide(core: CoreV1Api, names: Sequence[str]) -> None:
    """reboot-needed=true on each node in turn; returns once each got reboot-ok=true."""
    for name in names:
        core.patch_node(name, {"metadata": {"annotations": {
            KEYS.reboot_needed: "true", KEYS.last_checked_time: str(int(time.time()))}}},
            _preload_content=False)
        wait_for(functools.partial(_granted, core, name), 30, f"a grant for {name}",
                 interval=0.02)


def _undecide(core: CoreV1Api, names: Sequence[str]) -> None:
    """Back to needing nothing (the coordinator is stopped; its slot Leases are deleted)."""
    for name in names:
        core.patch_node(name, {"metadata": {"annotations": {
            KEYS.reboot_needed: None, KEYS.reboot_ok: None}}}, _preload_content=False)


def _profile(core: CoreV1Api, *, kubeconfig: Path, selector: str, names: Sequence[str],
             workdir: Path, decisions: int) -> str:
    """The coordinator under cProfile while it idles and makes ``decisions`` grants."""
    dump = workdir / "coord.prof"
    coord = coord_rig.CoordProcess.start(kubeconfig, selector, workdir / "coord-profile.log",
                                         leader_elect=True, profile_to=dump,
                                         flags=("--max-concurrent", str(MAX_CONCURRENT)))
    chosen = names[-2 * decisions:-decisions]
    try:
        wait_for(coord.leading, 60, "cluo-coord to lead")
        coord_rig.wait_quiet(coord.pid, quiet_for=2.0, tolerance=0.2 + len(names) / 10_000)
        time.sleep(4.0)
        _decide(core, chosen)
    finally:
        coord.stop()
    _undecide(core, chosen)
    return coord_rig.profile_summary(dump)


def _granted(core: CoreV1Api, name: str) -> bool:
    metadata = core.read_node(name).metadata
    annotations = (metadata.annotations if metadata else None) or {}
    return annotations.get(KEYS.reboot_ok) == "true"


def _decision_times(audit_log: Path, names: Sequence[str]) -> tuple[float, ...]:
    asked: dict[str, datetime] = {}
    granted: dict[str, datetime] = {}
    wanted = set(names)
    for write in read_audited_writes(audit_log):
        if not write.ok or write.resource != "nodes" or write.name not in wanted:
            continue
        value = write.annotations
        if write.user == coord_rig.COORD_USER:
            if value.get(KEYS.reboot_ok) == "true":
                granted.setdefault(write.name, write.completed)
        elif value.get(KEYS.reboot_needed) == "true":
            asked[write.name] = write.completed
    missing = [n for n in names if n not in asked or n not in granted]
    if missing:
        raise RuntimeError(f"the audit log lacks the request or the grant for {missing}")
    return tuple((granted[n] - asked[n]).total_seconds() for n in names)


def _result(results: Sequence[SizeResult], context: BenchContext, seconds: float,
            profile: str) -> BenchResult:
    measurements: list[Measurement] = []
    largest = max(r.nodes for r in results)
    for r in results:
        n = f"{r.nodes:,}"
        measurements += [
            Measurement(f"{n} nodes: RSS after sync", r.rss, "MB",
                        RSS_TARGET if r.nodes == largest and not context.quick else None,
                        detail=f"peak (VmHWM) {r.peak_rss:.0f} MB"),
            Measurement(f"{n} nodes: CPU seconds per 1,000 node updates", r.cpu_per_1000,
                        "s", detail=f"{UPDATES[context.quick]} updates written in "
                        f"{r.update_seconds:.1f} s"),
            Measurement(f"{n} nodes: idle CPU", r.idle_cpu * 100, "%"),
            Measurement(f"{n} nodes: time to a grant decision, max", max(r.decisions), "s",
                        DECISION_TARGET, samples=r.decisions,
                        detail=f"median {statistics.median(r.decisions) * 1000:.0f} ms"),
            Measurement(f"{n} nodes: start to ready (caches synced)", r.ready_after, "s"),
        ]
    notes = []
    if profile:
        notes.append(
            f"Profile of the decision (cProfile of the coordinator's main thread, the "
            f"reconcile loop, at {largest:,} nodes while it idled ~6 s and made "
            f"{DECISIONS[context.quick]} grants; py-spy and pyinstrument are not installed): "
            f"{profile}")
    if context.quick:
        notes.append(f"quick mode: {largest} nodes only; the RSS target is for 5,000 nodes "
                     "and is not applied")
    return BenchResult(
        name=NAME,
        title=TITLE,
        status=Status.MEASURED,
        measurements=tuple(measurements),
        method=(
            "Node objects created directly as a kubelet registers them (Ready, boot id, the "
            "emulator's status; no heartbeats), selected by a per-run label; the real "
            "cluo-coord process (ServiceAccount cluo-system/cluo-coord, leader election on, "
            f"--max-concurrent {MAX_CONCURRENT}) started once per size. RSS: VmRSS once "
            "ready and quiet. Idle CPU: utime + stime over "
            f"{IDLE_WINDOW[context.quick]:.0f} s. CPU per 1,000 updates: "
            f"{UPDATES[context.quick]} patches of last-checked-time ({WRITERS} writers), the "
            "coordinator's CPU from the first patch until it went quiet minus the idle "
            "rate, scaled to 1,000. Grant decision: from the completion of the write of "
            "reboot-needed=true on one node to the completion of the coordinator's "
            "reboot-ok=true on it (API server audit log), on "
            f"{DECISIONS[context.quick]} different nodes in turn."
        ),
        notes=tuple(notes),
        seconds=seconds,
        setup={"nodes": ", ".join(f"{r.nodes:,}" for r in results),
               "updates per size": str(UPDATES[context.quick]),
               "decisions per size": str(DECISIONS[context.quick])},
    )


# -- nodes ----------------------------------------------------------------------------


def _parallel(action: Callable[[str], object], names: Sequence[str]) -> None:
    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(action, names):
            pass


def _create_node(core: CoreV1Api, name: str, run_id: str) -> None:
    core.create_node(_node_body(name, run_id),  # type: ignore[arg-type]  # a dict is sent as is
                     _preload_content=False)


def _node_body(name: str, run_id: str) -> dict[str, Any]:
    """A Node as the kubelet emulator registers it (tests/testbed/kubelet.py)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory",
         "kubelet has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
    ]
    resources = {"cpu": "4", "memory": "8146740Ki", "ephemeral-storage": "50620216Ki",
                 "hugepages-2Mi": "0", "pods": "110"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                       "beta.kubernetes.io/arch": "amd64", coord_rig.SELECTOR_LABEL: run_id},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                            "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
        },
        "spec": {},
        "status": {
            "conditions": [{"type": t, "status": s, "reason": r, "message": m,
                            "lastHeartbeatTime": now, "lastTransitionTime": now}
                           for t, s, r, m in conditions],
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": uuid.uuid4().hex, "systemUUID": str(uuid.uuid4()),
                "bootID": str(uuid.uuid4()), "kernelVersion": "6.6.95-flatcar",
                "osImage": "Flatcar Container Linux by Kinvolk 4081.3.4 (Oklo)",
                "containerRuntimeVersion": "containerd://1.7.23", "kubeletVersion": "v1.34.4",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        },
    }


def _delete_nodes(core: CoreV1Api, selector: str) -> None:
    with contextlib.suppress(kubernetes.client.exceptions.ApiException):
        core.delete_collection_node(label_selector=selector, _preload_content=False)
