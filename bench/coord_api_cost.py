"""Benchmark 3, coordinator half: API requests of the idle coordinator with 1,000 nodes.

The real ``cluo-coord`` process (console script, cluo-coord ServiceAccount and RBAC of
deploy/) manages 1,000 nodes (100 in quick mode) of the kubelet emulator (node Lease
heartbeats every 10 s, status reports every 5 min, as a kubelet), none needing a reboot.
Requests are counted at the API server, from its audit log (see bench/testbed.py), user =
the coordinator's ServiceAccount, in a window opened a few seconds after the coordinator
reported ready (and, with leader election, became leader).

Two configurations, one after the other: as deployed (deploy/coordinator.yaml: one
replica, ``--leader-elect=false``), the target's subject; then ``--leader-elect=true``,
the optional warm-standby set-up with two replicas, whose leader renews the Lease
``cluo-coord-leader`` (one compare-and-swap PUT every 5 s): real requests, which that
window counts and reports apart.
"""

from __future__ import annotations

import collections
import contextlib
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

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
from bench.testbed import AuditedRequest, read_audit_log
from cluo.protocol import LEADER_LEASE_NAME
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

NAME = "api-cost-coordinator"
TITLE = "3. API cost: the idle coordinator with 1,000 nodes"
TARGET = Target(Comparison.AT_MOST, 0.0)
NODES = {False: 1000, True: 100}  # by quick
WINDOW = {False: 300.0, True: 6.0}  # seconds, as deployed (leader election off), by quick
WINDOW_ELECTION = {False: 120.0, True: 6.0}  # seconds, leader election on
SETTLE = 3.0


def run(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    selector = f"{coord_rig.SELECTOR_LABEL}={run_id}"
    workdir = context.workdir / f"coord-api-{run_id}"
    workdir.mkdir(parents=True)
    windows: dict[bool, tuple[datetime, datetime]] = {}
    nodes = NODES[context.quick]
    with contextlib.ExitStack() as stack, coord_rig.audited(context.plane) as plane:
        admin = stack.enter_context(plane.admin_api_client())
        kubeconfig = coord_rig.coordinator_kubeconfig(plane, workdir / "coord.kubeconfig")
        coord_rig.clean_leases(admin)
        stack.callback(coord_rig.clean_leases, admin)
        emulator = KubeletEmulator(admin, heartbeat_interval=10.0).start()
        stack.callback(emulator.stop, delete_nodes=True)
        emulator.add_nodes([f"idle{run_id}-{i:04d}" for i in range(nodes)],
                           labels={coord_rig.SELECTOR_LABEL: run_id}, timeout=120 + nodes * 0.2)
        for leader_elect, seconds in ((False, WINDOW[context.quick]),
                                      (True, WINDOW_ELECTION[context.quick])):
            coord = coord_rig.start_coordinator(
                kubeconfig, selector, workdir / f"coord-{leader_elect}.log",
                leader_elect=leader_elect)
            try:
                wait_for(coord.leading, 30, "cluo-coord to lead")
                time.sleep(SETTLE)
                opened = datetime.now(UTC)
                time.sleep(seconds)
                windows[leader_elect] = (opened, datetime.now(UTC))
                if coord.process.poll() is not None:
                    raise RuntimeError(f"cluo-coord exited:\n{coord.log_tail()}")
            finally:
                coord.stop()
            coord_rig.clean_leases(admin)
        requests = [r for r in read_audit_log(plane.audit_log) if r.user == coord_rig.COORD_USER]
    on = _between(requests, *windows[True])
    off = _between(requests, *windows[False])
    on_seconds = _seconds(windows[True])
    off_seconds = _seconds(windows[False])
    on_other = [r for r in on if not r.is_watch]
    on_election = [r for r in on_other if _leader_election(r)]
    off_other = [r for r in off if not r.is_watch]
    agents = sorted({r.user_agent for r in requests})
    return BenchResult(
        name=NAME,
        title=TITLE,
        status=Status.MEASURED,
        measurements=(
            Measurement("as deployed (one replica, leader election off): requests per hour "
                        "beyond the watches", _per_hour(off_other, off_seconds), "req/h",
                        TARGET, detail=f"{len(off_other)} in {off_seconds:.0f} s"),
            Measurement("watch requests in the as-deployed window",
                        sum(r.is_watch for r in off), "", detail=f"window {off_seconds:.0f} s"),
            Measurement("optional warm standby (--leader-elect=true): the leader's requests "
                        "per hour beyond the watches", _per_hour(on_other, on_seconds),
                        "req/h", detail=f"{len(on_other)} in {on_seconds:.0f} s"),
            Measurement("of them leader election (Lease cluo-coord-leader)",
                        _per_hour(on_election, on_seconds), "req/h",
                        detail=f"{len(on_election)} in {on_seconds:.0f} s"),
            Measurement("of them anything else", _per_hour(
                [r for r in on_other if not _leader_election(r)], on_seconds), "req/h"),
        ),
        method=(
            f"The real cluo-coord process (console script, ServiceAccount cluo-system/"
            f"cluo-coord, RBAC of deploy/) managing {nodes:,} emulated nodes (node Lease "
            "heartbeats every 10 s, status reports every 5 min), none needing a reboot. "
            "Requests counted at the API server from its audit log, user = "
            f"{coord_rig.COORD_USER}. Window opened {SETTLE:.0f} s after the coordinator "
            "reported ready (and led); non-watch requests extrapolated to an hour. First as "
            f"deployed (one replica, --leader-elect=false, {off_seconds:.0f} s), then with "
            f"--leader-elect=true ({on_seconds:.0f} s)."
        ),
        notes=(
            f"user agent seen for {coord_rig.COORD_USER}: {', '.join(agents) or 'none'}",
            f"as deployed, requests by verb and resource: {_breakdown(off)}",
            f"leader election on, requests by verb and resource: {_breakdown(on)}",
            "Why one replica is the deployed default: safety comes from the compare-and-swap "
            "on the slot Leases, never from being alone (tests/kube/test_coordinator.py runs "
            "two coordinators without leader election and never sees two nodes in flight), "
            "and a coordinator that is away only delays the next grant. A warm standby "
            "needs a liveness signal, and a Lease renewal is a request: the leader renews "
            "every 5 s with one compare-and-swap PUT on the Lease it last wrote "
            "(cluo_coord/leader.py; before, a GET and a PUT: 1,440 req/h, found in the audit "
            "log of the first full run), and the standby, by the code, reads the Lease every "
            "2 s until it takes over. Both are constant in the number of nodes.",
            "Beyond the window, by the code: no periodic re-list (--resync-period defaults "
            "to 0, never; cluo/kube/watch.py Reflector lists only at the start and after a "
            "410 or a failed watch, which an idle cluster does not cause); each watch is "
            "re-opened when the API server ends it (timeoutSeconds=300, "
            "cluo/kube/resources.py), from the version it reached, and that request is a "
            "watch; and the status ConfigMap cluo-status is "
            "written only when the plan or what it was computed from changes (the slot "
            "Leases, the nodes the planner does not ignore, the roll state) or the plan's "
            "next check moves later (cluo_coord/status.py: no heartbeat), none of which an "
            "idle cluster does: kubelet status reports leave every node ignored.",
        ),
        seconds=time.monotonic() - started,
        setup={"nodes": f"{nodes:,}", "window, leader election on": f"{on_seconds:.0f} s",
               "window, leader election off": f"{off_seconds:.0f} s"},
    )


def check(result: BenchResult) -> None:
    """The quick mode's result: the as-deployed rate, requests attributed to the
    coordinator, and the leader's renewals seen as single PUTs."""
    check_well_formed(result, NAME)
    expect(any(m.name.startswith("as deployed (one replica, leader election off)")
               for m in result.measurements), f"{NAME}: no as-deployed measurement")
    expect("cluo-coord/" in " ".join(result.notes),
           f"{NAME}: no request attributed to the coordinator's user agent (cluo-coord/...)")
    election = [n for n in result.notes if n.startswith("leader election on, requests")]
    expect(bool(election), f"{NAME}: no breakdown of the leader's requests")
    expect("update leases" in election[0],
           f"{NAME}: the leader renewed no Lease in its window: {election[0]}")
    expect("get leases" not in election[0],
           f"{NAME}: a renewal should be one PUT, but the leader also read: {election[0]}")


def _leader_election(request: AuditedRequest) -> bool:
    return request.resource == "leases" and LEADER_LEASE_NAME in request.uri


def _between(requests: Sequence[AuditedRequest], start: datetime, end: datetime
             ) -> list[AuditedRequest]:
    return [r for r in requests if start <= r.received < end]


def _seconds(window: tuple[datetime, datetime]) -> float:
    return (window[1] - window[0]).total_seconds()


def _per_hour(requests: Sequence[AuditedRequest], seconds: float) -> float:
    return len(requests) * 3600.0 / seconds


def _breakdown(requests: Sequence[AuditedRequest]) -> str:
    counts = collections.Counter(f"{r.verb} {r.resource or r.uri}" for r in requests)
    return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items())) or "none"
