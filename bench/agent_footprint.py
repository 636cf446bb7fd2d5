"""Benchmark 5: the footprint of the real agent artifact (the PyInstaller onedir bundle).

The artifact is built as ``make artifact`` builds it (hack/build-agent-artifact.sh; the
PyInstaller analysis cache in $CLUO_CACHE/agent-artifact-work, shared with
tests/e2e/test_artifact.py, so a warm build takes seconds), and its onedir binary
``usr/lib/cluo-agent/cluo-agent`` is run straight from the image's tree, as systemd would
run ``/usr/bin/cluo-agent``: production flags (log level info), for one node of the
kubelet emulator, authenticated as that node (its kubelet's credential), with dbusmock's
update_engine (IDLE) and logind on a private system bus.

systemd's side is played by the bench: ``NOTIFY_SOCKET`` names a datagram socket the
bench reads, and ``WATCHDOG_USEC`` is the unit's ``WatchdogSec=30s``, so the idle agent
pings as it does on a node.

- *start to READY=1*: from just before the exec to the arrival of the ``READY=1``
  datagram (the agent sends it once its host side is set up and update_engine answered;
  the node is read and labelled after it); the agent is stopped with SIGTERM between
  starts.
- *idle RSS*: ``VmRSS`` of the process (and of any child) ``IDLE_SETTLE`` seconds after
  READY=1.
- *idle CPU*: utime + stime over a window after that, as a share of one CPU and as CPU
  seconds per hour.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
from bench.testbed import private_system_bus
from testbed.agent_host import AGENT, HostDir
from testbed.dbus_bus import LOGIND_TEMPLATE, UPDATE_ENGINE_TEMPLATE, spawn_mock
from testbed.kubelet import KubeletEmulator

log = logging.getLogger(__name__)

NAME = "agent-footprint"
TITLE = "5. Agent footprint"
RSS_TARGET = Target(Comparison.AT_MOST, 30.0)  # MB
READY_TARGET = Target(Comparison.AT_MOST, 0.15)  # s
CPU_TARGET = Target(Comparison.AT_MOST, 0.1)  # % of one CPU
ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "hack" / "build-agent-artifact.sh"
BUILD_TIMEOUT = 900.0
STARTS = {False: 3, True: 1}
IDLE_SETTLE = {False: 30.0, True: 3.0}  # seconds after READY=1 before the RSS is read
IDLE_WINDOW = {False: 300.0, True: 5.0}
READY_TIMEOUT = 60.0
WATCHDOG_USEC = 30_000_000  # units/cluo-agent.service: WatchdogSec=30s
MB = 1_000_000


@dataclass(frozen=True)
class Artifact:
    image: Path
    binary: Path
    build_seconds: float
    reused: bool = False  # the cache's last bundle, not built by this run


def build_artifact(out_dir: Path, *, reuse: bool = False) -> Artifact:
    """``make artifact`` into ``out_dir``, with the shared PyInstaller cache.

    With ``reuse`` (quick mode), the onedir bundle the last build left in the cache is
    copied instead, when there is one: a build takes seconds with a warm cache but minutes
    when other work changed it, and the smoke mode only has to prove the benchmark runs.
    """
    cache = Path(os.environ.get("CLUO_CACHE", "/var/cache/cluo")) / "agent-artifact-work"
    cache.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    bundle = cache / "dist" / "cluo-agent"
    if reuse and (bundle / "cluo-agent").is_file():
        target = out_dir / "cached-bundle" / "usr" / "lib" / "cluo-agent"
        with (cache / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the build script's lock: no build meanwhile
            shutil.copytree(bundle, target, symlinks=True)
        return Artifact(out_dir / "cached-bundle.raw", target / "cluo-agent",
                        time.monotonic() - began, reused=True)
    result = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "OUT_DIR": str(out_dir), "WORK_DIR": str(cache),
             "VENV": str(Path(sys.executable).parent.parent)},
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the agent artifact failed:\n{result.stderr[-3000:]}")
    image = Path(result.stdout.strip().splitlines()[-1])
    binary = image.with_suffix("") / "usr" / "lib" / "cluo-agent" / "cluo-agent"
    return Artifact(image, binary, time.monotonic() - began)


class NotifySocket:
    """The service manager's end of sd_notify: records each datagram with its arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.2)
        self._lock = threading.Condition()
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))
                self._lock.notify_all()

    def wait_ready(self, since: float, timeout: float) -> float | None:
        """Arrival time of the first READY=1 after ``since``, or None."""
        def ready() -> float | None:
            for at, text in self.messages:
                if at >= since and "READY=1" in text.splitlines():
                    return at
            return None

        with self._lock:
            self._lock.wait_for(lambda: ready() is not None, timeout)
            return ready()

    def count(self, assignment: str, since: float) -> int:
        with self._lock:
            return sum(1 for at, text in self.messages
                       if at >= since and assignment in text.splitlines())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()


@dataclass
class Footprint:
    ready: list[float] = field(default_factory=list)
    rss: float = 0.0
    rss_end: float = 0.0
    processes: int = 1
    cpu: float = 0.0  # CPU seconds in the window
    window: float = 0.0
    watchdog_pings: int = 0


def run(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:6]
    workdir = context.workdir / f"agent-footprint-{run_id}"
    workdir.mkdir(parents=True)
    artifact = build_artifact(workdir / "artifact", reuse=context.quick)
    log.info("agent artifact built in %.0f s", artifact.build_seconds)
    measured = Footprint()
    with contextlib.ExitStack() as stack:
        plane = context.plane
        bus = stack.enter_context(private_system_bus())
        coord_rig.apply_rbac(plane)
        admin = stack.enter_context(plane.admin_api_client())
        emulator = KubeletEmulator(admin, heartbeat_interval=10.0).start()
        stack.callback(emulator.stop, delete_nodes=True)
        host = HostDir(workdir / "host")
        node = emulator.add_node(f"bench-footprint-{run_id}", boot_id=host.boot_id)
        kubeconfig = plane.node_kubeconfig(node.name, workdir / "kubelet.conf")
        stack.enter_context(spawn_mock(UPDATE_ENGINE_TEMPLATE, None,
                                       workdir / "update-engine.log"))
        stack.enter_context(spawn_mock(LOGIND_TEMPLATE, None, workdir / "logind.log"))
        notify = NotifySocket(workdir / "notify.sock")
        stack.callback(notify.close)
        argv = [str(artifact.binary), "--node-name", node.name, "--kubeconfig",
                str(kubeconfig), "--system-bus-address", bus, "--host-root", str(host.root)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUO_AGENT_")}
        env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        log_path = workdir / "agent.log"
        log.info("agent rig ready")
        for start in range(STARTS[context.quick]):
            with _agent(argv, env, log_path) as process:
                ready_at = notify.wait_ready(process.began, READY_TIMEOUT)
                if ready_at is None:
                    raise RuntimeError(f"the agent sent no READY=1 within {READY_TIMEOUT:g} s:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
                measured.ready.append(ready_at - process.began)
                if start < STARTS[context.quick] - 1:
                    continue  # stopped with SIGTERM by _agent
                time.sleep(max(0.0, ready_at + IDLE_SETTLE[context.quick] - time.monotonic()))
                pids = _tree(process.popen.pid)
                measured.processes = len(pids)
                measured.rss = sum(coord_rig.rss_bytes(p) for p in pids) / MB
                window_start = time.monotonic()
                cpu_before = sum(coord_rig.cpu_seconds(p) for p in pids)
                time.sleep(IDLE_WINDOW[context.quick])
                measured.cpu = sum(coord_rig.cpu_seconds(p) for p in pids) - cpu_before
                measured.window = time.monotonic() - window_start
                measured.rss_end = sum(coord_rig.rss_bytes(p) for p in pids) / MB
                measured.watchdog_pings = notify.count("WATCHDOG=1", window_start)
                if process.popen.poll() is not None:
                    raise RuntimeError("the agent exited during the idle window:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
        log.info("agent measured")
        profile = ""
        if not (RSS_TARGET.met_by(measured.rss) and READY_TARGET.met_by(max(measured.ready))):
            # The same agent as the venv's console script: what the bundle itself adds.
            with _agent([str(AGENT), *argv[1:]], env, workdir / "venv-agent.log") as process:
                ready_at = notify.wait_ready(process.began, READY_TIMEOUT)
                time.sleep(IDLE_SETTLE[context.quick])
                venv_rss = sum(coord_rig.rss_bytes(p) for p in _tree(process.popen.pid)) / MB
            venv_ready = "no READY=1" if ready_at is None else f"{ready_at - process.began:.2f} s"
            profile = (f"the venv's console script (same code, a plain CPython with "
                       f"site-packages) in the same rig: READY=1 after {venv_ready}, idle RSS "
                       f"{venv_rss:.0f} MB; " + import_profile())
    return _result(context, artifact, measured, time.monotonic() - started, profile)


def check(result: BenchResult) -> None:
    """The quick mode's result: the artifact's process was measured, READY=1 timed."""
    check_well_formed(result, NAME)
    rss = result.measurement("idle RSS").value
    expect(rss > 0, f"{NAME}: idle RSS {rss}: the artifact's process was not measured")
    result.measurement("start to READY=1")


@dataclass
class _Started:
    popen: subprocess.Popen[bytes]
    began: float


@contextlib.contextmanager
def _agent(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[_Started]:
    with log_path.open("ab") as output:
        began = time.monotonic()
        popen = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        yield _Started(popen, began)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            try:
                popen.wait(20)
                log.info("agent stopped by SIGTERM in %.2f s", time.monotonic() - stopping)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)


# The agent's big imports, in the order the probe takes them (cluo.kube.client is
# cluo's own API client on http.client and ssl; the kubernetes package is not imported).
IMPORT_STEPS = ("ssl", "http.client", "yaml", "dbus_fast", "cluo_host.main")
IMPORT_PROBE = """
import importlib, json, sys, time
def rss():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS:")).split()[1]) * 1024
steps = [("interpreter", rss(), 0.0, len(sys.modules))]
for name in sys.argv[1:]:
    began = time.perf_counter()
    importlib.import_module(name)
    steps.append((name, rss(), time.perf_counter() - began, len(sys.modules)))
print(json.dumps(steps))
"""


def import_profile() -> str:
    """Where the agent's memory and start-up time go at import: the venv's interpreter
    imports what the bundle's entry point imports (cluo_host.main), its big dependencies
    first, one at a time, reading its RSS and the time after each."""
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *IMPORT_STEPS],
                            capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    steps: list[tuple[str, int, float, int]] = json.loads(result.stdout)
    parts = [f"interpreter {steps[0][1] / MB:.0f} MB"]
    for (_, before, _, modules_before), (name, after, seconds, modules) in itertools.pairwise(
            steps):
        parts.append(f"+{name} {(after - before) / MB:.1f} MB, {seconds:.2f} s, "
                     f"{modules - modules_before} modules")
    return (f"RSS at import, step by step (the venv's interpreter): {'; '.join(parts)}; "
            f"{steps[-1][1] / MB:.0f} MB and {sum(s[2] for s in steps):.2f} s in all")


def _tree(pid: int) -> list[int]:
    """The process and its descendants (a PyInstaller onedir binary should be one)."""
    found = [pid]
    for parent in found:
        for task in Path(f"/proc/{parent}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _result(context: BenchContext, artifact: Artifact, measured: Footprint,
            seconds: float, profile: str) -> BenchResult:
    cpu_share = measured.cpu / measured.window * 100
    cpu_hour = measured.cpu * 3600 / measured.window
    ready = measured.ready
    return BenchResult(
        name=NAME,
        title=TITLE,
        status=Status.MEASURED,
        measurements=(
            Measurement("idle RSS", measured.rss, "MB", RSS_TARGET,
                        detail=f"{IDLE_SETTLE[context.quick]:.0f} s after READY=1; "
                        f"{measured.rss_end:.1f} MB at the end of the window; "
                        f"{measured.processes} process(es)"),
            Measurement("start to READY=1", max(ready), "s", READY_TARGET,
                        samples=tuple(ready),
                        detail=f"worst of {len(ready)}; median {statistics.median(ready):.2f} s"),
            Measurement("idle CPU", cpu_share, "%", CPU_TARGET,
                        detail=f"{measured.cpu:.2f} CPU s in {measured.window:.0f} s"),
            Measurement("idle CPU per hour (extrapolated)", cpu_hour, "s"),
        ),
        method=(
            ("The onedir bundle of the last artifact build in the shared PyInstaller cache "
             "(quick mode); its binary cluo-agent run" if artifact.reused else
             "The artifact built as `make artifact` builds it (hack/build-agent-artifact.sh, "
             f"{artifact.image.name}); its onedir binary usr/lib/cluo-agent/cluo-agent run "
             "from the image tree")
            + " with production flags (log level info, logs to a file "
            "instead of the journal) for one emulated node, as that node (a kubelet client "
            "certificate), dbusmock update_engine (IDLE) and logind on a private "
            "system bus. NOTIFY_SOCKET is a datagram socket read by the bench, "
            f"WATCHDOG_USEC={WATCHDOG_USEC} (the unit's WatchdogSec=30s). READY: from just "
            "before the exec to the READY=1 datagram's arrival, "
            f"{len(ready)} start(s) (SIGTERM in between). RSS: VmRSS "
            f"{IDLE_SETTLE[context.quick]:.0f} s after READY=1. CPU: utime + stime over "
            f"{measured.window:.0f} s of idling, as a share of one CPU."
        ),
        notes=(f"watchdog pings (WATCHDOG=1) received in the window: "
               f"{measured.watchdog_pings}",
               "quick mode: the onedir bundle last built in $CLUO_CACHE/agent-artifact-work "
               "was copied, not rebuilt" if artifact.reused else
               f"artifact build took {artifact.build_seconds:.0f} s (PyInstaller cache in "
               "$CLUO_CACHE/agent-artifact-work)",
               *([f"Profile of the missed target(s), a memory and import-time breakdown "
                  f"(docs/agent.md, Footprint, has the bundle's own): {profile}"]
                 if profile else [])),
        seconds=seconds,
        setup={"starts": str(len(ready)), "idle window": f"{measured.window:.0f} s"},
    )
