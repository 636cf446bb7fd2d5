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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import kubernetes.client
from kubernetes.client import CoordinationV1Api
from kubernetes.client.exceptions import ApiException

from bench.testbed import AuditedControlPlane, running_audited_plane
from cluo.protocol import LEADER_LEASE_NAME, SLOT_LEASE_LABEL
from testbed.controlplane import ControlPlane
from testbed.coordinator import CoordProcess

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
NAMESPACE = "cluo-system"
COORD_USER = f"system:serviceaccount:{NAMESPACE}:cluo-coord"
# The roll's stand-in agents (bench/roll.py FastAgents) play every node from one client, so
# they cannot be confined to one node as the real agent is (its node's credential,
# docs/security.md): a benchmark-only account that may patch every Node.
FAKE_AGENT_ACCOUNT = "cluo-bench-fake-agent"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{FAKE_AGENT_ACCOUNT}"
FAKE_AGENT_RBAC = f"""\
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {FAKE_AGENT_ACCOUNT}, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {FAKE_AGENT_ACCOUNT}}}
rules:
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["get", "list", "watch", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {FAKE_AGENT_ACCOUNT}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {FAKE_AGENT_ACCOUNT}}}
subjects:
  - {{kind: ServiceAccount, name: {FAKE_AGENT_ACCOUNT}, namespace: {NAMESPACE}}}
"""
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
    """The namespace and the coordinator's RBAC of deploy/, the agents' admission policy,
    and the stand-in agents' account (FAKE_AGENT_RBAC)."""
    plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                  "-f", str(DEPLOY / "coordinator-rbac.yaml"))
    plane.apply_agent_policy()
    plane.kubectl("apply", "-f", "-", input_text=FAKE_AGENT_RBAC)


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


def start_coordinator(kubeconfig: Path, selector: str, log_path: Path, *,
                      leader_elect: bool, flags: Sequence[str] = (),
                      profile_to: Path | None = None) -> CoordProcess:
    """cluo-coord as identity ``bench-coord``, returned once /readyz answers 200 (caches
    synced); with ``profile_to``, under cProfile (see `CoordProcess.start`)."""
    return CoordProcess.start(kubeconfig, selector, log_path, identity="bench-coord",
                              leader_elect=leader_elect, flags=flags, namespace=NAMESPACE,
                              profile_to=profile_to, ready_timeout=READY_TIMEOUT,
                              http_timeout=5.0)


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
