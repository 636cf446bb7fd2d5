"""Benchmark 3, agent half: API requests made by one idle agent, and per completed reboot.

The real ``cluo-agent`` process (the venv's console script, as testbed/agent_host.py
runs it) serves one node of the kubelet emulator, authenticated as that node (the kubelet's
client certificate, docs/security.md) under deploy/'s admission policy, talking to
dbusmock's update_engine (IDLE) and logind on a private system bus.

Requests are counted at the API server, from its audit log (see bench/testbed.py for why
not ``apiserver_request_total``): every request whose user is the node's (the kubelet
emulator writes as the admin, so here only the agent is that user).
Idle: after start-up (the node labelled, update_engine's status mirrored) and a short
settling pause, a window of ``IDLE_WINDOW`` seconds; the requests in it that are not
watches are extrapolated to an hour (target: 0). Watch (re)opens are reported apart.
Update checks: update_engine's periodic checks, ``CHECKS`` of them ``CHECK_EVERY`` seconds
apart on its clock (a day's worth, an hour's in quick mode, played back in about a minute),
each a CHECKING_FOR_UPDATE then an IDLE with a new last_checked_time; the agent's writes to
its Node counted, per day of update_engine's clock. Flatcar's update_engine checks about
every 45 minutes (with a random fuzz); checks every 5 minutes are six to nine times as many,
and the agent's refresh rule is on update_engine's clock (cluo/cycle/agent_core.py,
``LAST_CHECKED_REFRESH``), so the count holds for any schedule of checks and for any pace of
the playback.
Per reboot: from update_engine saying UPDATED_NEED_REBOOT until a pause after the
coordinator's reset (the test plays the coordinator's grant, its reset of a proven reboot,
which uncordons the node and removes the agent's marks, and the host's reboot, as
tests/kube/test_agent.py does); the restarted agent's start-up requests are part of the
cycle.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dbus  # type: ignore[import-untyped]
import kubernetes.client
from kubernetes.client import (
    CoreV1Api,
    V1Container,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodSpec,
)

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
from bench.testbed import (
    AuditedControlPlane,
    AuditedRequest,
    private_system_bus,
    read_audit_log,
    running_audited_plane,
)
from cluo.kube.nodes import node_patch
from cluo.protocol import Keys, reset_patch
from testbed.agent_host import AgentProcess, HostDir
from testbed.dbus_bus import LOGIND_TEMPLATE, UPDATE_ENGINE_TEMPLATE, MockService, spawn_mock
from testbed.kubelet import EmulatedNode, KubeletEmulator
from testbed.waiting import wait_for

log = logging.getLogger(__name__)

NAME = "api-cost-agent"
TITLE = "3. API cost: one idle agent, and per completed reboot"
IDLE_TARGET = Target(Comparison.AT_MOST, 0.0)
IDLE_WINDOW = {False: 300.0, True: 20.0}  # seconds, by quick
SETTLE = 3.0  # seconds after start-up before the idle window opens
TAIL = 2.0  # seconds after the cycle closed, for trailing requests
TIMEOUT = 90.0
CYCLE_PODS = 10
GRACE_PERIOD_SCALE = 0.05  # 30 s grace -> 1.5 s per evicted pod
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KEYS = Keys()
NEED_REBOOT = (dbus.Int64(1_700_000_000), 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT",
               "4152.2.0", dbus.Int64(300_000_000))
IDLE = (dbus.Int64(1_700_000_100), 0.0, "UPDATE_STATUS_IDLE", "0.0.0", dbus.Int64(0))
CHECKS = {False: 288, True: 12}  # by quick: a day, an hour
CHECK_EVERY = 300  # seconds of update_engine's clock between two checks
CHECK_PACE = 0.1  # real seconds between two signals of the playback
DAY = 86_400
CHECKS_TARGET = Target(Comparison.AT_MOST, 24.0)  # node writes per day, last-checked-time
CHECKS_MEASUREMENT = "node writes per day of update checks"


def run(context: BenchContext) -> BenchResult:
    started = time.monotonic()
    window = IDLE_WINDOW[context.quick]
    with contextlib.ExitStack() as stack:
        plane = context.plane
        if not isinstance(plane, AuditedControlPlane):
            plane = stack.enter_context(running_audited_plane())
        bus = stack.enter_context(private_system_bus())
        plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
        plane.apply_agent_policy()
        workdir = context.workdir / f"api-cost-{uuid.uuid4().hex[:6]}"
        workdir.mkdir(parents=True)
        admin = stack.enter_context(plane.admin_api_client())
        kubelet = stack.enter_context(KubeletEmulator(
            admin, heartbeat_interval=10.0, grace_period_scale=GRACE_PERIOD_SCALE))
        host = HostDir(workdir / "host")
        node = kubelet.add_node(f"bench-agent-{uuid.uuid4().hex[:6]}", boot_id=host.boot_id)
        kubeconfig = plane.node_kubeconfig(node.name, workdir / "kubelet.conf")
        agent_user = f"system:node:{node.name}"
        update_engine = stack.enter_context(
            spawn_mock(UPDATE_ENGINE_TEMPLATE, None, workdir / "update-engine.log"))
        logind = stack.enter_context(spawn_mock(LOGIND_TEMPLATE, None, workdir / "logind.log"))
        agent = AgentProcess(node.name, kubeconfig, bus, host, workdir / "agent.log")
        stack.callback(agent.kill)
        rig = _Rig(CoreV1Api(admin), node, host, agent,
                   update_engine=update_engine, logind=logind)
        namespace = rig.add_pods(CYCLE_PODS)

        agent.start()
        rig.wait(lambda: rig.annotation("status") == "UPDATE_STATUS_IDLE"
                 and rig.label("group") == "stable", "the agent to start and mirror IDLE")
        # update_engine has checked once (the mock starts as never checked): the checks
        # below follow a check the node records.
        rig.update_engine.mock.SetStatus(*IDLE)
        rig.wait(lambda: rig.annotation("last-checked-time") == str(int(IDLE[0])),
                 "the agent to mirror update_engine's last check")
        time.sleep(SETTLE)
        idle_from = datetime.now(UTC)
        time.sleep(window)
        idle_to = datetime.now(UTC)

        checks_from = datetime.now(UTC)
        checks = CHECKS[context.quick]
        rig.periodic_checks(checks)
        time.sleep(TAIL)
        checks_to = datetime.now(UTC)

        cycle_from = datetime.now(UTC)
        rig.reboot_cycle()
        time.sleep(TAIL)
        cycle_to = datetime.now(UTC)
        agent.kill()
        CoreV1Api(admin).delete_collection_namespaced_pod(namespace, grace_period_seconds=0)

        requests = [r for r in read_audit_log(plane.audit_log) if r.user == agent_user]
    idle = _between(requests, idle_from, idle_to)
    cycle = _between(requests, cycle_from, cycle_to)
    check_writes = [r for r in _between(requests, checks_from, checks_to)
                    if r.verb in ("patch", "update") and r.resource == "nodes"]
    idle_other = [r for r in idle if not r.is_watch]
    idle_watches = [r for r in idle if r.is_watch]
    seconds = (idle_to - idle_from).total_seconds()
    per_hour = len(idle_other) * 3600.0 / seconds
    agents = sorted({r.user_agent for r in (*idle, *cycle)})
    notes = [f"user agents seen for {agent_user} in the windows: {', '.join(agents) or 'none'}",
             f"idle window requests by verb and resource: {_breakdown(idle)}",
             f"reboot cycle requests by verb and resource: {_breakdown(cycle)}"]
    if context.quick:
        notes.append("quick mode: the idle window is shorter than the agent's watch timeout "
                     "(300 s), so no watch re-open can fall in it")
    return BenchResult(
        name=NAME,
        title=TITLE,
        status=Status.MEASURED,
        measurements=(
            Measurement("idle agent: requests per hour beyond the watch", per_hour, "req/h",
                        IDLE_TARGET, detail=f"{len(idle_other)} in {seconds:.0f} s"),
            Measurement("idle agent: watch requests in the window", len(idle_watches), "",
                        detail=f"window {seconds:.0f} s"),
            Measurement(CHECKS_MEASUREMENT,
                        len(check_writes) * DAY / (checks * CHECK_EVERY), "req", CHECKS_TARGET,
                        detail=f"{len(check_writes)} for {checks} checks, one every "
                        f"{CHECK_EVERY} s of update_engine's clock"),
            Measurement("requests per completed node reboot", len(cycle), "req",
                        detail=f"{CYCLE_PODS} pods on the node"),
            Measurement("of them evictions", sum(r.resource == "pods/eviction" for r in cycle),
                        "req"),
        ),
        method=(
            "The real cluo-agent process (venv console script) for one emulated node, "
            "authenticated as its node (a kubelet client certificate, deploy/agent-policy.yaml "
            "applied), "
            "dbusmock update_engine reporting IDLE and logind on a private system bus. "
            "Requests counted at the API server from its audit log (level Metadata), user = "
            f"{agent_user}: apiserver_request_total in 1.34 has no label naming the client. "
            f"Idle: a {seconds:.0f} s window after start-up; non-watch requests extrapolated to "
            f"an hour. Update checks: {checks} periodic checks of update_engine "
            f"(CHECKING_FOR_UPDATE, then IDLE with a last_checked_time {CHECK_EVERY} s "
            f"later each: {checks * CHECK_EVERY / 3600:.0f} h of its clock), played back "
            f"{CHECK_PACE} s per signal, node PATCH/PUT requests counted and scaled to a day "
            "of update_engine's clock. Flatcar's update_engine checks about every 45 min; "
            "the agent's refresh rule is on update_engine's clock, so 5-minute checks are "
            "the worse case for the same count. "
            "Per reboot: from UPDATED_NEED_REBOOT to the agent closing the cycle "
            "(grant, cordon, drain, Reboot() via logind, the host's reboot emulated: agent "
            f"killed, new boot id, agent restarted, report, uncordon), {CYCLE_PODS} pods."
        ),
        notes=tuple(notes),
        seconds=time.monotonic() - started,
        setup={"idle window": f"{seconds:.0f} s", "pods on the node": str(CYCLE_PODS)},
    )


def check(result: BenchResult) -> None:
    """The quick mode's result: the reboot cycle was counted, its evictions among its
    requests, attributed to the agent by its user agent; the idle rate."""
    check_well_formed(result, NAME)
    result.measurement("idle agent: requests per hour beyond the watch")
    result.measurement(CHECKS_MEASUREMENT)
    cycle = result.measurement("requests per completed node reboot").value
    expect(cycle > 0, f"{NAME}: no request counted in the reboot cycle")
    evictions = result.measurement("of them evictions").value
    expect(evictions >= CYCLE_PODS,
           f"{NAME}: {evictions:.0f} evictions counted for {CYCLE_PODS} pods on the node")
    expect("cluo-agent/" in " ".join(result.notes),
           f"{NAME}: no request attributed to the agent's user agent (cluo-agent/...)")


def _between(
    requests: Sequence[AuditedRequest], start: datetime, end: datetime
) -> list[AuditedRequest]:
    return [r for r in requests if start <= r.received < end]


def _breakdown(requests: Sequence[AuditedRequest]) -> str:
    counts = collections.Counter(f"{r.verb} {r.resource or r.uri}" for r in requests)
    return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items())) or "none"


class _Rig:
    """One node, its host and agent; plays the coordinator and the reboot (as test_agent)."""

    def __init__(self, core: CoreV1Api, node: EmulatedNode, host: HostDir, agent: AgentProcess,
                 *, update_engine: MockService, logind: MockService) -> None:
        self.core = core
        self.node = node
        self.host = host
        self.agent = agent
        self.update_engine = update_engine
        self.logind = logind

    def add_pods(self, count: int) -> str:
        namespace = f"bench-api-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace(
            kubernetes.client.V1Namespace(metadata=V1ObjectMeta(name=namespace)))
        owner = V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web-1",
                                 uid=str(uuid.uuid4()), controller=True)
        for index in range(count):
            self.core.create_namespaced_pod(namespace, V1Pod(
                metadata=V1ObjectMeta(name=f"web-{index}", labels={"app": "web"},
                                      owner_references=[owner]),
                spec=V1PodSpec(node_name=self.node.name, termination_grace_period_seconds=30,
                               containers=[V1Container(name="c", image="pause")]),
            ))
        self.wait(lambda: sum(bool(p.status and p.status.phase == "Running") for p in
                              self.core.list_namespaced_pod(namespace).items) == count,
                  "the pods to run")
        return namespace

    def read(self) -> Any:
        return self.core.read_node(self.node.name)

    def annotation(self, name: str) -> str | None:
        value = (self.read().metadata.annotations or {}).get(KEYS.prefix + name)
        return None if value is None else str(value)

    def label(self, name: str) -> str | None:
        value = (self.read().metadata.labels or {}).get(KEYS.prefix + name)
        return None if value is None else str(value)

    def set_annotation(self, name: str, value: str) -> None:
        self.core.patch_node(self.node.name,
                             {"metadata": {"annotations": {KEYS.prefix + name: value}}})

    def reboots(self) -> int:
        return len(self.logind.calls("Reboot"))

    def periodic_checks(self, count: int) -> None:
        """update_engine's checks that find nothing: ``count`` of them, CHECK_EVERY apart."""
        checked = int(IDLE[0])
        for _ in range(count):
            self.update_engine.mock.SetStatus(dbus.Int64(checked), 0.0,
                                              "UPDATE_STATUS_CHECKING_FOR_UPDATE", "0.0.0",
                                              dbus.Int64(0))
            time.sleep(CHECK_PACE)
            checked += CHECK_EVERY
            self.update_engine.mock.SetStatus(dbus.Int64(checked), *IDLE[1:])
            time.sleep(CHECK_PACE)

    def reboot_cycle(self) -> None:
        self.update_engine.mock.SetStatus(*NEED_REBOOT)
        self.wait(lambda: self.annotation("reboot-needed") == "true", "reboot-needed=true")
        self.set_annotation("reboot-ok", "true")
        self.wait(lambda: self.reboots() == 1, "logind Reboot(false) after the drain")
        # The host reboots: the agent dies, the node comes back with a new boot id,
        # update_engine starts idle, systemd starts the agent again.
        self.agent.kill()
        self.node.shutdown()
        self.update_engine.mock.SetStatus(*IDLE)
        self.node.boot(self.host.reboot())
        self.agent.start()
        self.wait(lambda: self.annotation("reboot-needed") == "false"
                  and self.annotation("reboot-in-progress") == "false",
                  "the agent to report the reboot")
        # cluo-coord's reset of a proven reboot: it uncordons the node and removes the
        # agent's mark and boot id, so the cycle is over without a write of the agent's
        # (whatever the agent still writes falls in the window's TAIL).
        reset = reset_patch(KEYS, (), uncordon=True, finished=True)
        self.core.patch_node(self.node.name, node_patch(
            annotations=reset.annotations, labels=reset.labels, unschedulable=False))
        self.wait(lambda: self.annotation("boot-id-before-reboot") is None
                  and self.annotation("agent-made-unschedulable") is None
                  and not self.read().spec.unschedulable,
                  "the coordinator's reset to land")

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        try:
            wait_for(predicate, TIMEOUT, what)
        except TimeoutError as err:
            raise RuntimeError(f"{err}\n--- agent log:\n{self.agent.log()[-4000:]}") from None
