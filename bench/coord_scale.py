"""Benchmark 4: the coordinator at 1,000, 5,000 (Kubernetes' supported maximum) and 15,000
nodes.

Node objects are created directly, as the kubelet registers them (Ready, a boot id, the
emulator's status), with no heartbeats: the coordinator watches Nodes, not node Leases,
and a kubelet's status report every 5 minutes would only add noise. The nodes of a run
carry a label the coordinator selects on. Then the real ``cluo-coord`` process
(console script, cluo-coord ServiceAccount, leader election on, --max-concurrent 8) is
started, and from /proc/PID:

- *start to first grant*: one node already needs a reboot when the process starts; from
  the start (just before the exec) to the completion of the coordinator's
  ``reboot-ok=true`` on it (API server audit log, same clock): the full list of every Node
  and Lease, leader election, the first plans, the grant's writes;
- *RSS*: ``VmRSS`` once it reported ready (both caches synced) and its first plans are
  done (the process went quiet), and ``VmHWM``, the peak so far;
- *idle CPU*: CPU seconds (utime + stime) over a quiet window (nothing changes: the
  leader Lease renewals and the loop's health tick);
- *CPU per 1,000 node updates*: the bench patches ``last-checked-time`` on that many nodes
  (an annotation the agent refreshes; it changes no plan of a node that needs no reboot),
  8 writers in parallel; the coordinator's CPU delta from the first patch until it went
  quiet, minus the idle rate over the same time, scaled to 1,000;
- *time to a grant decision*: a node gets ``reboot-needed=true``; from the completion of
  that write to the completion of the coordinator's ``reboot-ok=true`` on it, both from
  the API server's audit log. In between: the watch event, a plan over all nodes, the
  slot Lease taken, the before-reboot label, a second plan, the health gate's record on
  the slot Lease (the node's pods listed; the compare-and-swap is also rule 3's check),
  the grant; Events go out beside, from their own queue. Repeated on different nodes
  (each keeps its slot). The audit log also splits each decision: the time inside the
  coordinator's own API requests in between (received to response complete, the API
  server's share; listed by verb and resource) and the rest (watch delivery, plans, the
  client).

When a decision misses its target, the coordinator is started once more and sampled by
py-spy (``py-spy record --pid``, the bench extra) while it idles and makes grants; the
top functions go into the result's notes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client import CoreV1Api

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
from bench.testbed import read_audited_writes
from cluo.protocol import LEADER_LEASE_NAME, Keys
from testbed.waiting import wait_for

log = logging.getLogger(__name__)

NAME = "coordinator-scale"
TITLE = "4. Coordinator scale"
RSS_TARGET = Target(Comparison.AT_MOST, 200.0)  # MB, at the largest size
DECISION_TARGET = Target(Comparison.AT_MOST, 0.05)  # s
FIRST_GRANT_TARGET = Target(Comparison.AT_MOST, 10.0)  # s, at the largest size
SIZES = {False: (1000, 5000, 15000), True: (100,)}
UPDATES = {False: 1000, True: 100}
DECISIONS = {False: 5, True: 2}
IDLE_WINDOW = {False: 10.0, True: 4.0}
PROFILE_IDLE = 4.0  # s of idling sampled before the profiled grants
PY_SPY = Path(sys.executable).parent / "py-spy"
PY_SPY_RATE = 250  # samples per second
ENTRY_POINTS = frozenset({"main", "run", "_run"})  # always on the stack: left out of totals
MAX_CONCURRENT = 8
WRITERS = 8
KEYS = Keys()
MB = 1_000_000


@dataclass(frozen=True)
class SizeResult:
    nodes: int
    ready_after: float  # s from start to /readyz 200
    first_grant: float  # s from start to the completion of the first grant
    rss: float  # MB
    peak_rss: float  # MB
    idle_cpu: float  # fraction of one CPU
    cpu_per_1000: float  # CPU seconds per 1,000 node updates
    update_seconds: float  # how long the bench took to write the updates
    decisions: tuple[float, ...]  # s
    # per decision: s in the coordinator's own requests, and their "verb resource"s
    in_requests: tuple[tuple[float, tuple[str, ...]], ...]


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
    first = names[0]  # needs a reboot before the coordinator starts
    core.patch_node(first, {"metadata": {"annotations": {
        KEYS.reboot_needed: "true", KEYS.last_checked_time: str(int(time.time()))}}},
        _preload_content=False)
    started_at = datetime.now(UTC)
    began = time.monotonic()
    coord = coord_rig.start_coordinator(kubeconfig, selector, log_path, leader_elect=True,
                                        flags=("--max-concurrent", str(MAX_CONCURRENT)))
    ready_after = time.monotonic() - began
    try:
        wait_for(coord.leading, 60, "cluo-coord to lead")
        wait_for(functools.partial(_granted, core, first), 60, f"the first grant, {first}",
                 interval=0.02)
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
    decisions, in_requests = _decision_times(audit_log, decided)
    first_granted, _ = _grant_times(audit_log, [first], since=started_at)
    _undecide(core, [first, *decided])
    return SizeResult(len(names), ready_after,
                      (first_granted[first] - started_at).total_seconds(), rss, peak,
                      idle_rate, cpu_per_1000, update_seconds, decisions, in_requests)


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
    """The coordinator sampled by py-spy while it idles and makes ``decisions`` grants
    (cProfile of its main thread when py-spy is not installed)."""
    if not PY_SPY.exists():
        return _cprofile(core, kubeconfig=kubeconfig, selector=selector, names=names,
                         workdir=workdir, decisions=decisions)
    raw = workdir / "coord-profile.raw"
    coord = coord_rig.start_coordinator(kubeconfig, selector, workdir / "coord-profile.log",
                                        leader_elect=True,
                                        flags=("--max-concurrent", str(MAX_CONCURRENT)))
    chosen = names[-2 * decisions:-decisions]
    errors: list[str] = []
    try:
        wait_for(coord.leading, 60, "cluo-coord to lead")
        coord_rig.wait_quiet(coord.pid, quiet_for=2.0, tolerance=0.2 + len(names) / 10_000)
        with py_spy_record(coord.pid, raw, errors):
            began = time.monotonic()
            time.sleep(PROFILE_IDLE)
            _decide(core, chosen)
            seconds = time.monotonic() - began
    finally:
        coord.stop()
    _undecide(core, chosen)
    if not raw.exists():
        return f"py-spy wrote no profile: {''.join(errors)[-300:]}"
    return (f"py-spy record of the cluo-coord process, {PY_SPY_RATE} Hz, non-blocking, over "
            f"{seconds:.1f} s ({PROFILE_IDLE:.0f} s idle, then {decisions} grants): "
            + py_spy_summary(raw))


@contextlib.contextmanager
def py_spy_record(pid: int, raw: Path, errors: list[str], rate: int = PY_SPY_RATE
                  ) -> Iterator[None]:
    """``py-spy record`` of process ``pid`` (non-blocking, every thread, raw format into
    ``raw``) while the block runs; py-spy's error output is appended to ``errors``."""
    spy = subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--output", str(raw),
         "--rate", str(rate), "--nonblocking", "--threads", "--function"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, output = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, output = spy.communicate()
        errors.append(output.decode(errors="replace"))


def _cprofile(core: CoreV1Api, *, kubeconfig: Path, selector: str, names: Sequence[str],
              workdir: Path, decisions: int) -> str:
    """The coordinator under cProfile while it idles and makes ``decisions`` grants."""
    dump = workdir / "coord.prof"
    coord = coord_rig.start_coordinator(kubeconfig, selector, workdir / "coord-profile.log",
                                        leader_elect=True, profile_to=dump,
                                        flags=("--max-concurrent", str(MAX_CONCURRENT)))
    chosen = names[-2 * decisions:-decisions]
    try:
        wait_for(coord.leading, 60, "cluo-coord to lead")
        coord_rig.wait_quiet(coord.pid, quiet_for=2.0, tolerance=0.2 + len(names) / 10_000)
        time.sleep(PROFILE_IDLE)
        _decide(core, chosen)
    finally:
        coord.stop()
    _undecide(core, chosen)
    return ("cProfile of the main thread (py-spy is not installed): "
            + coord_rig.profile_summary(dump))


def py_spy_summary(path: Path, top: int = 8, rate: int = PY_SPY_RATE) -> str:
    """CPU by thread, and the functions with the most samples, from ``py-spy record
    --format raw --threads --function`` (one ``thread;frame;...;frame COUNT`` per line).

    "Total" counts a function once per sample it is anywhere on the stack (cluo code
    only, the entry points left out); "own" counts the innermost frame (any code).
    """
    threads: Counter[str] = Counter()
    total: Counter[str] = Counter()
    own: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            frames = frames[1:]
            thread = thread.partition("): ")[2] or "unnamed"
        samples += count
        threads[_thread_group(thread)] += count
        if frames:
            own[_frame(frames[-1])] += count
        for frame in {_frame(f) for f in frames if "cluo_" in f}:
            if frame.rpartition(" ")[2].rpartition(".")[2] not in ENTRY_POINTS:
                total[frame] += count
    if not samples:
        return "no samples on CPU"

    def share(counter: Counter[str]) -> str:
        return "; ".join(f"{name} {count / rate:.2f} s ({count / samples:.0%})"
                         for name, count in counter.most_common(top))

    return (f"{samples} samples on CPU ({samples / rate:.2f} CPU s); by thread: "
            f"{share(threads)}. Most samples including callees (cluo code): {share(total)}. "
            f"Most own samples: {share(own)}")


def _thread_group(name: str) -> str:
    """Thread names without their per-thread numbers (the HTTP server's handlers)."""
    return name.rstrip("0123456789").rstrip("-_ ") or name


def _frame(frame: str) -> str:
    """``Class.function (path/file.py:line)`` as ``path/file.py:line Class.function``."""
    function, _, where = frame.rpartition(" (")
    return f"{where.rstrip(')')} {function}" if function else frame


def _granted(core: CoreV1Api, name: str) -> bool:
    metadata = core.read_node(name).metadata
    annotations = (metadata.annotations if metadata else None) or {}
    return annotations.get(KEYS.reboot_ok) == "true"


def _decision_times(audit_log: Path, names: Sequence[str]
                    ) -> tuple[tuple[float, ...], tuple[tuple[float, tuple[str, ...]], ...]]:
    """Per node: the decision time, and the time inside the coordinator's own API
    requests made in between (with their number)."""
    granted, asked = _grant_times(audit_log, names)
    missing = [n for n in names if n not in asked or n not in granted]
    if missing:
        raise RuntimeError(f"the audit log lacks the request or the grant for {missing}")
    requests = coordinator_requests(audit_log)
    inside = []
    for n in names:
        spans = [(received, completed, kind) for received, completed, kind in requests
                 if asked[n] <= received and completed <= granted[n]]
        inside.append((sum((c - r).total_seconds() for r, c, _ in spans),
                       tuple(kind for _, _, kind in spans)))
    return tuple((granted[n] - asked[n]).total_seconds() for n in names), tuple(inside)


def _grant_times(audit_log: Path, names: Sequence[str], *, since: datetime | None = None
                 ) -> tuple[dict[str, datetime], dict[str, datetime]]:
    """Per node: the completion of the coordinator's first reboot-ok=true on it, and of the
    last write of reboot-needed=true on it by anyone else (writes completed ``since``, if
    given: a node granted at an earlier size is granted again at the next)."""
    asked: dict[str, datetime] = {}
    granted: dict[str, datetime] = {}
    wanted = set(names)
    for write in read_audited_writes(audit_log):
        if (not write.ok or write.resource != "nodes" or write.name not in wanted
                or (since is not None and write.completed < since)):
            continue
        value = write.annotations
        if write.user == coord_rig.COORD_USER:
            if value.get(KEYS.reboot_ok) == "true":
                granted.setdefault(write.name, write.completed)
        elif value.get(KEYS.reboot_needed) == "true":
            asked[write.name] = write.completed
    return granted, asked


def coordinator_requests(audit_log: Path) -> list[tuple[datetime, datetime, str]]:
    """(received, completed, "verb resource") of the coordinator's requests, watches and
    leader election left out (those run on their own threads, beside the decision)."""
    spans = []
    with audit_log.open() as lines:
        for line in lines:
            if coord_rig.COORD_USER not in line or '"ResponseComplete"' not in line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if (event.get("stage") != "ResponseComplete" or event.get("verb") == "watch"
                    or (event.get("user") or {}).get("username") != coord_rig.COORD_USER
                    or (event.get("objectRef") or {}).get("name") == LEADER_LEASE_NAME):
                continue
            ref = event.get("objectRef") or {}
            resource = "/".join(filter(None, (ref.get("resource"), ref.get("subresource"))))
            spans.append((datetime.fromisoformat(event["requestReceivedTimestamp"]),
                          datetime.fromisoformat(event["stageTimestamp"]),
                          f"{event.get('verb')} {resource}"))
    return spans


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
            Measurement(f"{n} nodes: start to first grant (full list)", r.first_grant, "s",
                        FIRST_GRANT_TARGET if r.nodes == largest and not context.quick
                        else None),
        ]
    notes = []
    for r in results:
        inside = ", ".join(f"{seconds * 1000:.0f}" for seconds, _ in r.in_requests)
        rest = ", ".join(f"{(d - seconds) * 1000:.0f}"
                         for d, (seconds, _) in zip(r.decisions, r.in_requests, strict=True))
        counts = sorted({len(kinds) for _, kinds in r.in_requests})
        kinds = Counter(kind for _, each in r.in_requests for kind in each)
        listed = ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))
        notes.append(
            f"{r.nodes:,} nodes, each decision split (ms, in order): inside the coordinator's "
            f"own API requests ({'/'.join(map(str, counts))} of them) {inside}; the rest "
            f"(watch delivery, plans, client) {rest}; the requests, all decisions: {listed}")
    if profile:
        notes.append(f"Profile of the decision at {largest:,} nodes: {profile}")
    if context.quick:
        notes.append(f"quick mode: {largest} nodes only; the RSS and first-grant targets are "
                     f"for {max(SIZES[False]):,} nodes and are not applied")
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
            "rate, scaled to 1,000. Start to first grant: one node needs a reboot before "
            "the process starts; from just before the exec to the completion of the "
            "coordinator's reboot-ok=true on it (API server audit log). Grant decision: "
            "from the completion of the write of reboot-needed=true on one node to the "
            "completion of the coordinator's reboot-ok=true on it (API server audit log), on "
            f"{DECISIONS[context.quick]} different nodes in turn."
        ),
        notes=tuple(notes),
        seconds=seconds,
        setup={"nodes": ", ".join(f"{r.nodes:,}" for r in results),
               "updates per size": str(UPDATES[context.quick]),
               "decisions per size": str(DECISIONS[context.quick])},
    )


def check(result: BenchResult) -> None:
    """The quick mode's result: one size, its RSS, its grant decisions (each split between
    the coordinator's requests and the rest)."""
    check_well_formed(result, NAME)
    decisions = [len(m.samples) for m in result.measurements if "grant decision" in m.name]
    expect(decisions == [DECISIONS[True]],
           f"{NAME}: grant decisions per size {decisions}, quick mode times "
           f"{DECISIONS[True]} at one size")
    expect(any("RSS after sync" in m.name for m in result.measurements),
           f"{NAME}: no RSS after sync")
    expect(any("each decision split" in note for note in result.notes),
           f"{NAME}: the decision time is not split between the coordinator's requests "
           "and the rest")


# -- nodes ----------------------------------------------------------------------------


def _parallel(action: Callable[[str], object], names: Sequence[str]) -> None:
    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(action, names):
            pass


def _create_node(core: CoreV1Api, name: str, run_id: str) -> None:
    core.create_node(_node_body(name, run_id),  # type: ignore[arg-type]  # a dict is sent as is
                     _preload_content=False)


def _node_body(name: str, run_id: str) -> dict[str, Any]:
    """A Node as the kubelet emulator registers it (testbed/kubelet.py)."""
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
