"""What the coordinator benchmarks share: the real ``cluo-coord`` process, its RBAC and
ServiceAccount kubeconfig, its /metrics, and a process's RSS and CPU time from /proc.

The coordinator runs as its console script, as tests/kube/test_coordinator.py runs it:
authenticated with a real token of the cluo-coord ServiceAccount bound by
deploy/coordinator-rbac.yaml, managing only the Nodes of a per-run label selector, with
its slot Leases in cluo-system (cleaned before and after each run).
"""

from __future__ import annotations

import contextlib
import os
import pstats
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client
from kubernetes.client import CoordinationV1Api
from kubernetes.client.exceptions import ApiException

from bench.testbed import AuditedControlPlane, running_audited_plane
from cluo_host.protocol import LEADER_LEASE_NAME, SLOT_LEASE_LABEL
from tests.testbed.controlplane import ControlPlane, free_port
from tests.testbed.waiting import wait_for

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COORD = Path(sys.executable).parent / "cluo-coord"
NAMESPACE = "cluo-system"
COORD_USER = f"system:serviceaccount:{NAMESPACE}:cluo-coord"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:cluo-agent"
SELECTOR_LABEL = "bench.cluo.test/run"
READY_TIMEOUT = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def audited(plane: ControlPlane) -> Iterator[AuditedControlPlane]:
    """The run's plane if it writes an audit log, else a private audited one."""
    if isinstance(plane, AuditedControlPlane):
        yield plane
    else:
        with running_audited_plane() as own:
            yield own


def apply_rbac(plane: ControlPlane) -> None:
    """The namespace, ServiceAccounts and RBAC of deploy/ (coordinator and agent)."""
    plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                  "-f", str(DEPLOY / "coordinator-rbac.yaml"),
                  "-f", str(DEPLOY / "agent-rbac.yaml"))


def coordinator_kubeconfig(plane: ControlPlane, path: Path) -> Path:
    """RBAC of deploy/ applied; a kubeconfig with a real cluo-coord ServiceAccount token."""
    apply_rbac(plane)
    return plane.service_account_kubeconfig(NAMESPACE, "cluo-coord", path)


def clean_leases(admin: kubernetes.client.ApiClient) -> None:
    """No slot or leader Lease left from an earlier run (they would hold a slot)."""
    coordination = CoordinationV1Api(admin)
    coordination.delete_collection_namespaced_lease(NAMESPACE, label_selector=SLOT_LEASE_LABEL)
    with contextlib.suppress(ApiException):
        coordination.delete_namespaced_lease(LEADER_LEASE_NAME, NAMESPACE)


# -- the process -----------------------------------------------------------------------


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (or ``VmHWM``, the peak) of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


@dataclass
class CoordProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @classmethod
    def start(cls, kubeconfig: Path, selector: str, log_path: Path, *,
              leader_elect: bool, flags: Sequence[str] = (),
              profile_to: Path | None = None) -> CoordProcess:
        """Start cluo-coord and return once /readyz answers 200 (caches synced).

        With ``profile_to``, under cProfile (its main thread: the reconcile loop); the
        stats are written there when the process stops."""
        port = free_port()
        profiler = [] if profile_to is None else [
            sys.executable, "-m", "cProfile", "-o", str(profile_to)]
        argv = [*profiler, str(COORD), "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE,
                "--node-selector", selector, "--metrics-address", f"127.0.0.1:{port}",
                "--leader-elect", "true" if leader_elect else "false",
                "--identity", "bench-coord", *flags]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CLUO_COORD_")}
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=environment)
        coord = cls(process, port, log_path)
        try:
            wait_for(lambda: coord.get("/readyz")[0] == 200 or process.poll() is not None,
                     READY_TIMEOUT, "cluo-coord to report ready on /readyz")
            if process.poll() is not None:
                raise RuntimeError(f"cluo-coord exited with {process.returncode}:\n"
                                   f"{coord.log_tail()}")
        except BaseException:
            coord.stop()
            raise
        return coord

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by its series name (``name{labels}``)."""
        _, text = self.get("/metrics")
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                samples[series] = float(value)
        return samples

    def leading(self) -> bool:
        return self.metrics().get("cluo_is_leader") == 1.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def profile_summary(path: Path, top: int = 8) -> str:
    """The functions with the most cumulative time in a cProfile dump, one line each."""
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), (_, calls, _own, cumulative, _) in sorted(
            stats.stats.items(), key=lambda item: -item[1][3]):  # type: ignore[attr-defined]
        if "cluo_coord" not in filename and "cluo_host" not in filename:
            continue
        where = filename.rsplit("/", 2)
        rows.append(f"{where[-2]}/{where[-1]}:{line} {function} {cumulative:.2f} s "
                    f"({calls} calls)")
        if len(rows) == top:
            break
    return f"main thread {total:.2f} s in all; by cumulative time: " + "; ".join(rows)


def wait_quiet(pid: int, *, quiet_for: float = 2.0, tolerance: float = 0.05,
               timeout: float = 120.0) -> float:
    """Wait until the process used at most ``tolerance`` CPU seconds in ``quiet_for``
    seconds (done with what it was doing); returns how long that took."""
    began = time.monotonic()
    previous = cpu_seconds(pid)
    while time.monotonic() - began < timeout:
        time.sleep(quiet_for)
        current = cpu_seconds(pid)
        if current - previous <= tolerance:
            return time.monotonic() - began
        previous = current
    raise TimeoutError(f"process {pid} still busy after {timeout:g} s")
