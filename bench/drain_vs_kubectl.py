"""Benchmark 6: cluo's drain against ``kubectl drain``, side by side on one control plane.

Each run gets a fresh emulated node holding the same layout: ``pods`` controller-owned
pods (ReplicaSet owner references), ``guarded`` of them under a PodDisruptionBudget with
maxUnavailable=1, so evictions of those go one at a time and the others get 429s; of the
rest, ``empty_dir`` have an emptyDir volume (kubectl needs --delete-emptydir-data for them)
and ``long_grace`` a long terminationGracePeriodSeconds (``LONG_GRACE_SECONDS``), which
sets the floor of both drains. A small
stand-in for the ReplicaSet controller (which the test bed does not run) starts a
replacement on a spare node as soon as a guarded pod starts terminating, as a real
cluster would; without it the budget would never allow a second eviction.

kubectl: ``kubectl drain NODE --ignore-daemonsets --delete-emptydir-data --timeout=...``,
the kubectl built with the control plane, admin kubeconfig. cluo: cordon
(``KubeNodes.set_unschedulable``, as the agent does) then ``Drainer.run()`` with the agent's
default tuning, same admin credentials. Both are timed from the start of the cordon to all
pods gone (kubectl drain returns only then; cluo's drain completes only when a fresh list
shows none left). Grace periods are scaled by the kubelet emulator, the same for both.
The runs alternate which tool goes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes.client
from kubernetes.client import (
    AppsV1Api,
    CoreV1Api,
    PolicyV1Api,
    V1Container,
    V1EmptyDirVolumeSource,
    V1LabelSelector,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodDisruptionBudget,
    V1PodDisruptionBudgetSpec,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ReplicaSet,
    V1ReplicaSetSpec,
    V1Volume,
    V1VolumeMount,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

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
from bench.testbed import unique_suffix
from cluo.cycle.drain_plan import DrainOptions, PodSummary
from cluo.cycle.drainer import Drainer, DrainTuning
from cluo.cycle.eviction import BlockedByBudget, EvictionOutcome, KubePods
from cluo.kube.config import kubeconfig_client
from cluo.kube.nodes import KubeNodes
from cluo.protocol import Keys
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

log = logging.getLogger(__name__)

NAME = "drain-vs-kubectl"
TITLE = "6. Drain against kubectl drain"
TARGET = Target(Comparison.AT_MOST, 0.5)
GRACE_SECONDS = 30  # each pod's terminationGracePeriodSeconds
LONG_GRACE_SECONDS = 300  # the long_grace pods' (a database, a queue draining its work)
GRACE_PERIOD_SCALE = 0.02  # 30 s x 0.02: an evicted pod takes 0.6 s to go (300 s: 6 s)
DRAIN_TIMEOUT = 300.0
SETUP_TIMEOUT = 120.0
KUBECTL_RETRY = re.compile(r"will retry after")
TOOLS = ("kubectl", "cluo")
WATCH_SECONDS = 2


@dataclass(frozen=True)
class DrainLayout:
    pods: int = 50
    guarded: int = 5  # of them, under the PodDisruptionBudget
    empty_dir: int = 10  # of the others, with an emptyDir volume
    long_grace: int = 5  # of the others, with LONG_GRACE_SECONDS to terminate


# By quick: the smoke mode drains a smaller node, on the same code path.
LAYOUTS = {False: DrainLayout(),
           True: DrainLayout(pods=10, guarded=2, empty_dir=2, long_grace=1)}


@dataclass(frozen=True)
class DrainRun:
    tool: str
    seconds: float
    refusals: int  # 429s from the budget seen by the tool


def run(context: BenchContext) -> BenchResult:
    layout = LAYOUTS[context.quick]
    repeats = 1 if context.quick else 3
    started = time.monotonic()
    runs: list[DrainRun] = []
    with context.plane.admin_api_client() as admin:
        kubelet = KubeletEmulator(admin, heartbeat_interval=10.0,
                                  grace_period_scale=GRACE_PERIOD_SCALE).start()
        try:
            spare = kubelet.add_node(f"bench-spare-{unique_suffix()}").name
            for repeat in range(repeats):
                order = TOOLS if repeat % 2 == 0 else tuple(reversed(TOOLS))
                for tool in order:
                    runs.append(_one_run(context, admin, kubelet, spare, tool, layout=layout))
                    log.info("drain timed", extra={"TOOL": tool, "SECONDS": runs[-1].seconds})
        finally:
            # The control plane may be a shared one (the test session's): leave no nodes.
            kubelet.stop(delete_nodes=True)
    kubectl = [r.seconds for r in runs if r.tool == "kubectl"]
    cluo = [r.seconds for r in runs if r.tool == "cluo"]
    ratio = statistics.median(cluo) / statistics.median(kubectl)
    return BenchResult(
        name=NAME,
        title=TITLE,
        status=Status.MEASURED,
        measurements=(
            Measurement("kubectl drain, median", statistics.median(kubectl), "s",
                        samples=tuple(kubectl)),
            Measurement("cluo drain, median", statistics.median(cluo), "s", samples=tuple(cluo)),
            Measurement("ratio cluo / kubectl (medians)", ratio, "", TARGET),
            Measurement("budget refusals (429) per drain, kubectl, median",
                        statistics.median(r.refusals for r in runs if r.tool == "kubectl"), ""),
            Measurement("budget refusals (429) per drain, cluo, median",
                        statistics.median(r.refusals for r in runs if r.tool == "cluo"), ""),
        ),
        method=(
            f"One control plane, one kubelet emulator. Per run a fresh node with {layout.pods} "
            f"ReplicaSet-owned pods, {layout.guarded} of them under a PodDisruptionBudget "
            "(maxUnavailable=1); a stand-in ReplicaSet controller starts a replacement for a "
            "guarded pod on a spare node as soon as it terminates. Of the others, "
            f"{layout.empty_dir} with an emptyDir volume and {layout.long_grace} with "
            f"terminationGracePeriodSeconds={LONG_GRACE_SECONDS}; every other pod "
            f"{GRACE_SECONDS}; grace periods scaled by {GRACE_PERIOD_SCALE} by the emulator "
            "(both tools). "
            "kubectl: `kubectl drain NODE --ignore-daemonsets --delete-emptydir-data "
            f"--timeout={int(DRAIN_TIMEOUT)}s` (admin kubeconfig). cluo: cordon, then "
            "`cluo.cycle.drainer.Drainer` with the agent's default tuning (longest grace "
            "period first, 8 evictions in flight, 429 retried after 1 s doubling to 10 s, "
            "terminating pods awaited with a watch of the node's pods), admin credentials. "
            "Timed from the cordon to all pods gone; tools alternate which goes first; "
            f"{repeats} run(s) each."
        ),
        seconds=time.monotonic() - started,
        setup={"pods per node": str(layout.pods), "under the budget": str(layout.guarded),
               "with emptyDir": str(layout.empty_dir),
               f"with {LONG_GRACE_SECONDS} s grace": str(layout.long_grace),
               "runs per tool": str(repeats)},
    )


def check(result: BenchResult) -> None:
    """The quick mode's result: one run per tool, and their ratio."""
    check_well_formed(result, NAME)
    for tool in TOOLS:
        runs = result.measurement(f"{tool} drain, median").samples
        expect(len(runs) == 1, f"{NAME}: {len(runs)} {tool} runs, quick mode runs one")
    result.measurement("ratio cluo / kubectl (medians)")


def _one_run(
    context: BenchContext,
    admin: kubernetes.client.ApiClient,
    kubelet: KubeletEmulator,
    spare: str,
    tool: str,
    *,
    layout: DrainLayout,
) -> DrainRun:
    suffix = unique_suffix()
    node = kubelet.add_node(f"bench-{tool}-{suffix}").name
    namespace = f"bench-drain-{tool}-{suffix}"
    core = CoreV1Api(admin)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=V1ObjectMeta(name=namespace)))
    try:
        _populate(admin, namespace, node, layout)
        with _replacements(core, namespace, node, spare):
            if tool == "kubectl":
                seconds, refusals = _kubectl_drain(context, node)
            else:
                seconds, refusals = _cluo_drain(context, node)
        left = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
        if left:
            raise RuntimeError(f"{tool} drain returned with {len(left)} pods left on {node}")
        return DrainRun(tool, seconds, refusals)
    finally:
        _clean(core, namespace)


def _kubectl_drain(context: BenchContext, node: str) -> tuple[float, int]:
    began = time.monotonic()
    result = context.plane.kubectl(
        "drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
        f"--timeout={int(DRAIN_TIMEOUT)}s", timeout=DRAIN_TIMEOUT + 30,
    )
    seconds = time.monotonic() - began
    return seconds, len(KUBECTL_RETRY.findall(result.stdout + result.stderr))


class _CountingPods(KubePods):
    """KubePods counting the evictions a budget refused (nothing else changes)."""

    refusals = 0

    def evict(self, pod: PodSummary, grace_period_seconds: int | None = None) -> EvictionOutcome:
        outcome = super().evict(pod, grace_period_seconds)
        if isinstance(outcome, BlockedByBudget):
            self.refusals += 1
        return outcome


def _cluo_drain(context: BenchContext, node: str) -> tuple[float, int]:
    api = kubeconfig_client(context.plane.admin_kubeconfig, "cluo-agent")
    try:
        pods = _CountingPods(api)
        nodes = KubeNodes(api, Keys())
        began = time.monotonic()
        nodes.set_unschedulable(node, True)
        drainer = Drainer(pods, node, DrainOptions(), lambda _status: None,
                          started_at=began, clock=time.monotonic, tuning=DrainTuning())
        asyncio.run(asyncio.wait_for(drainer.run(), DRAIN_TIMEOUT))
        return time.monotonic() - began, pods.refusals
    finally:
        api.close()


# -- the layout ---------------------------------------------------------------------------


def _populate(
    admin: kubernetes.client.ApiClient, namespace: str, node: str, layout: DrainLayout
) -> None:
    """Two ReplicaSets (nothing runs them: their pods are created here), the budget, the
    pods on `node`; returns once every pod runs and the disruption controller allows one."""
    apps, core, policy = AppsV1Api(admin), CoreV1Api(admin), PolicyV1Api(admin)
    sets = {"guarded": layout.guarded, "bulk": layout.pods - layout.guarded}
    owners: dict[str, V1OwnerReference] = {}
    for app, replicas in sets.items():
        labels = {"app": app}
        created = apps.create_namespaced_replica_set(namespace, V1ReplicaSet(
            metadata=V1ObjectMeta(name=app),
            spec=V1ReplicaSetSpec(
                replicas=replicas,
                selector=V1LabelSelector(match_labels=labels),
                template=V1PodTemplateSpec(
                    metadata=V1ObjectMeta(labels=labels),
                    spec=V1PodSpec(containers=[V1Container(name="c", image="pause")]),
                ),
            ),
        ))
        assert created.metadata is not None and created.metadata.uid
        owners[app] = V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name=app,
                                       uid=created.metadata.uid, controller=True)
    policy.create_namespaced_pod_disruption_budget(namespace, V1PodDisruptionBudget(
        metadata=V1ObjectMeta(name="guarded"),
        spec=V1PodDisruptionBudgetSpec(max_unavailable=1,
                                       selector=V1LabelSelector(match_labels={"app": "guarded"})),
    ))
    for app, replicas in sets.items():
        for index in range(replicas):
            bulk = index if app == "bulk" else -1  # which of the others this one is
            core.create_namespaced_pod(namespace, _pod(
                f"{app}-{index}", app, node, owners[app],
                empty_dir=0 <= bulk < layout.empty_dir,
                grace=LONG_GRACE_SECONDS
                if layout.empty_dir <= bulk < layout.empty_dir + layout.long_grace
                else GRACE_SECONDS))

    def all_running() -> bool:
        pods = core.list_namespaced_pod(namespace).items
        return len(pods) == layout.pods and all(_ready(p) for p in pods)

    def budget_allows_one() -> bool:
        pdb = policy.read_namespaced_pod_disruption_budget("guarded", namespace)
        status, metadata = pdb.status, pdb.metadata
        return bool(status and metadata
                    and status.observed_generation == metadata.generation
                    and status.current_healthy == layout.guarded
                    and status.disruptions_allowed == 1)

    wait_for(all_running, SETUP_TIMEOUT, f"{layout.pods} pods running on {node}")
    wait_for(budget_allows_one, SETUP_TIMEOUT, "the disruption controller to allow one eviction")


def _pod(name: str, app: str, node: str, owner: V1OwnerReference, *,
         empty_dir: bool = False, grace: int = GRACE_SECONDS) -> V1Pod:
    volumes = [V1Volume(name="scratch", empty_dir=V1EmptyDirVolumeSource())] if empty_dir else None
    mounts = [V1VolumeMount(name="scratch", mount_path="/scratch")] if empty_dir else None
    return V1Pod(
        metadata=V1ObjectMeta(name=name, labels={"app": app}, owner_references=[owner]),
        spec=V1PodSpec(node_name=node, termination_grace_period_seconds=grace, volumes=volumes,
                       containers=[V1Container(name="c", image="pause", volume_mounts=mounts)]),
    )


def _ready(pod: Any) -> bool:
    conditions = pod.status.conditions or [] if pod.status else []
    return bool(pod.status and pod.status.phase == "Running"
                and any(c.type == "Ready" and c.status == "True" for c in conditions))


@contextlib.contextmanager
def _replacements(core: CoreV1Api, namespace: str, node: str, spare: str) -> Iterator[None]:
    """Stand-in ReplicaSet controller for the guarded pods: when one on `node` starts
    terminating, create its replacement on `spare` (where the emulator runs it)."""
    stop = threading.Event()
    watch = Watch()  # type: ignore[no-untyped-call]
    replaced: set[str] = set()

    def handle(pod: Any) -> None:
        if (pod.spec.node_name != node or not pod.metadata.deletion_timestamp
                or pod.metadata.uid in replaced):
            return
        replaced.add(pod.metadata.uid)
        core.create_namespaced_pod(namespace, _pod(
            f"{pod.metadata.name}-r", "guarded", spare, pod.metadata.owner_references[0]))

    def replace_terminating() -> None:
        # List, then watch from the list for a short while, again and again: nothing is
        # missed, and stop() is noticed within WATCH_SECONDS.
        while not stop.is_set():
            try:
                listed = core.list_namespaced_pod(namespace, label_selector="app=guarded")
                for pod in listed.items:
                    handle(pod)
                version = listed.metadata.resource_version if listed.metadata else None
                events = watch.stream(  # type: ignore[no-untyped-call]
                    core.list_namespaced_pod, namespace, label_selector="app=guarded",
                    resource_version=version, timeout_seconds=WATCH_SECONDS)
                for event in events:
                    handle(event["object"])
            except Exception as err:
                if not stop.is_set():  # a watch cut short by stop() is no failure
                    log.warning("replacement watch failed", extra={"ERROR": repr(err)})
                stop.wait(0.1)

    thread = threading.Thread(target=replace_terminating, name="bench-replicaset", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        watch.stop()  # type: ignore[no-untyped-call]
        thread.join(WATCH_SECONDS + 5)


def _clean(core: CoreV1Api, namespace: str) -> None:
    """Remove the run's pods at once (nothing runs the namespace controller in the test bed,
    so deleting the namespace alone would leave them)."""
    with contextlib.suppress(ApiException):
        core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
    with contextlib.suppress(ApiException):
        core.delete_namespace(namespace)
