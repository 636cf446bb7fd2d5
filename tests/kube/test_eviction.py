"""The pod adapter (list, evict, delete, check, wait for pods to go) against a real
kube-apiserver, PDBs and RBAC; and the drain waiting on it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import kubernetes.client
import pytest
from kubernetes.client import (
    CoreV1Api,
    PolicyV1Api,
    RbacAuthorizationV1Api,
    RbacV1Subject,
    V1ClusterRole,
    V1ClusterRoleBinding,
    V1Container,
    V1LabelSelector,
    V1Namespace,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodDisruptionBudget,
    V1PodDisruptionBudgetSpec,
    V1PodSpec,
    V1PolicyRule,
    V1RoleRef,
)
from kubernetes.client.exceptions import ApiException

from cluo.cycle.drain_plan import MIRROR_POD_ANNOTATION, DrainOptions, OwnerRef, PodSummary
from cluo.cycle.drainer import Drainer, DrainTuning
from cluo.cycle.eviction import (
    BlockedByBudget,
    Deleted,
    Evicted,
    Gone,
    KubePods,
    Present,
)
from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo.kube.nodes import EVENT_NAMESPACE, KubeNodes, NodeChange
from cluo.protocol import Keys
from testbed.kubelet import EmulatedNode, KubeletEmulator
from testbed.waiting import wait_for

pytestmark = pytest.mark.kube

KEYS = Keys()
HOLD_FINALIZER = "example.com/hold"


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    # Grace periods pass at half speed: a 2 s grace period takes 1 s.
    emulator = KubeletEmulator(kube_admin, grace_period_scale=0.5).start()
    yield emulator
    emulator.stop(delete_nodes=True)


@pytest.fixture
def node(kubelet: KubeletEmulator, namespace: str) -> EmulatedNode:
    return kubelet.add_node(f"{namespace}-node")


@pytest.fixture
def pods(kube_client: KubeClient) -> KubePods:
    return KubePods(kube_client)


@pytest.fixture
def other_namespace(kube_admin: kubernetes.client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = CoreV1Api(kube_admin)
    core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def make_pod(
    name: str,
    node: str | None,
    *,
    owner_kind: str | None = "ReplicaSet",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    finalizers: list[str] | None = None,
    grace: int = 2,
) -> V1Pod:
    owners = None
    if owner_kind is not None:
        owners = [V1OwnerReference(
            api_version="apps/v1", kind=owner_kind, name=f"{name}-owner",
            uid=str(uuid.uuid4()), controller=True,
        )]
    return V1Pod(
        metadata=V1ObjectMeta(
            name=name, labels=labels or {"app": "web"}, annotations=annotations,
            owner_references=owners, finalizers=finalizers,
        ),
        spec=V1PodSpec(
            node_name=node,
            containers=[V1Container(name="c", image="pause")],
            termination_grace_period_seconds=grace,
        ),
    )


def create(api: kubernetes.client.ApiClient, namespace: str, pod: V1Pod) -> PodSummary:
    created = CoreV1Api(api).create_namespaced_pod(namespace, pod)
    return PodSummary(namespace=namespace, name=created.metadata.name, uid=created.metadata.uid)


def running_and_ready(api: kubernetes.client.ApiClient, pod: PodSummary) -> bool:
    status = CoreV1Api(api).read_namespaced_pod(pod.name, pod.namespace).status
    return status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in status.conditions or []
    )


def held_pod(api: kubernetes.client.ApiClient, namespace: str, node: EmulatedNode
             ) -> PodSummary:
    """A Running pod "held" whose deletion a finalizer holds up until ``release``."""
    held = create(api, namespace, make_pod("held", node.name,
                                           finalizers=[HOLD_FINALIZER], grace=0))
    wait_for(lambda: running_and_ready(api, held), timeout=30, what="pod held Running")
    return held


def release(api: kubernetes.client.ApiClient, pod: PodSummary) -> None:
    CoreV1Api(api).patch_namespaced_pod(
        pod.name, pod.namespace, {"metadata": {"finalizers": None}},
        _content_type="application/merge-patch+json",
    )


def guarded_pair(
    api: kubernetes.client.ApiClient, namespace: str, node: EmulatedNode
) -> tuple[PodSummary, PodSummary]:
    """Two Running, Ready pods under a PDB with minAvailable=1 (one disruption allowed)."""
    first = create(api, namespace, make_pod("web-a", node.name))
    second = create(api, namespace, make_pod("web-b", node.name))
    PolicyV1Api(api).create_namespaced_pod_disruption_budget(namespace, V1PodDisruptionBudget(
        metadata=V1ObjectMeta(name="web"),
        spec=V1PodDisruptionBudgetSpec(
            min_available=1, selector=V1LabelSelector(match_labels={"app": "web"})
        ),
    ))
    wait_for(lambda: running_and_ready(api, first) and running_and_ready(api, second),
             timeout=30, what="both guarded pods Running and Ready")

    def budget_allows_one() -> bool:
        pdb = PolicyV1Api(api).read_namespaced_pod_disruption_budget("web", namespace)
        return bool(
            pdb.status
            and pdb.status.observed_generation == pdb.metadata.generation
            and pdb.status.current_healthy == 2
            and pdb.status.disruptions_allowed == 1
        )

    wait_for(budget_allows_one, timeout=60,
             what="the disruption controller to allow exactly one disruption")
    return first, second


# -- listing ---------------------------------------------------------------------------------


def test_pods_on_node_lists_exactly_the_pods_bound_to_it(
    kube_admin: kubernetes.client.ApiClient,
    kubelet: KubeletEmulator,
    namespace: str,
    other_namespace: str,
    pods: KubePods,
) -> None:
    node = kubelet.add_node(f"{namespace}-node")
    elsewhere = kubelet.add_node(f"{namespace}-elsewhere")
    web = create(kube_admin, namespace, make_pod("web", node.name))
    agent = create(kube_admin, other_namespace, make_pod("agent", node.name,
                                                          owner_kind="DaemonSet"))
    static = create(kube_admin, namespace, make_pod(
        "static", node.name, owner_kind=None,
        annotations={MIRROR_POD_ANNOTATION: "0123456789abcdef"},
    ))
    create(kube_admin, namespace, make_pod("web-elsewhere", elsewhere.name))
    create(kube_admin, namespace, make_pod("unscheduled", None))
    for pod in (web, agent, static):
        wait_for(lambda pod=pod: running_and_ready(kube_admin, pod), timeout=30,
                 what=f"pod {pod.ref} Running")

    listed = {pod.ref: pod for pod in pods.pods_on_node(node.name)}
    assert set(listed) == {web.ref, agent.ref, static.ref}
    assert listed[web.ref].uid == web.uid
    assert listed[web.ref].phase == "Running"
    assert listed[web.ref].controller == OwnerRef("ReplicaSet", "web-owner", True)
    assert not listed[web.ref].mirror and not listed[web.ref].deleting
    assert listed[agent.ref].controller == OwnerRef("DaemonSet", "agent-owner", True)
    assert listed[static.ref].mirror
    assert listed[static.ref].controller is None
    assert [p.ref for p in pods.pods_on_node(f"{namespace}-no-such-node")] == []


def test_a_terminating_pod_is_listed_as_deleting(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str, pods: KubePods
) -> None:
    held = held_pod(kube_admin, namespace, node)
    assert pods.delete(held) == Deleted()
    try:
        listed = wait_for(
            lambda: [p for p in pods.pods_on_node(node.name) if p.deleting],
            timeout=10, what="the held pod listed as deleting",
        )
        assert [p.ref for p in listed] == [held.ref]
        assert pods.pod_state(namespace, "held", held.uid) == Present(held.uid, deleting=True)
    finally:
        release(kube_admin, held)
    wait_for(lambda: pods.pod_state(namespace, "held", held.uid) == Gone(), timeout=30,
             what="the held pod gone once its finalizer is removed")


# -- waiting for pods to go ------------------------------------------------------------------


def test_awaiting_departures_returns_once_the_pods_waited_for_are_gone(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str, pods: KubePods
) -> None:
    web = create(kube_admin, namespace, make_pod("web", node.name))
    db = create(kube_admin, namespace, make_pod("db", node.name, grace=6))
    for pod in (web, db):
        wait_for(lambda pod=pod: running_and_ready(kube_admin, pod), timeout=30,
                 what=f"pod {pod.ref} Running")
    assert {p.uid for p in pods.pods_on_node(node.name)} == {web.uid, db.uid}
    assert pods.evict(web) == Evicted()
    assert pods.evict(db) == Evicted()

    # Each wait watches from the last list, so a pod gone before the wait began counts.
    wait_for(lambda: pods.await_departures(node.name, frozenset({web.uid, db.uid}), 2.0),
             timeout=60, what="both evicted pods seen gone by the watch")

    assert pods.pods_on_node(node.name) == []


def test_awaiting_departures_times_out_while_a_pod_stays_and_wakes_for_a_new_pod(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str, pods: KubePods
) -> None:
    held = held_pod(kube_admin, namespace, node)
    try:
        pods.pods_on_node(node.name)
        assert pods.delete(held) == Deleted()
        assert pods.await_departures(node.name, frozenset({held.uid}), 1.0) is False

        pods.pods_on_node(node.name)
        create(kube_admin, namespace, make_pod("late", node.name))
        assert pods.await_departures(node.name, frozenset({held.uid}), 30.0) is True
        assert "late" in {p.name for p in pods.pods_on_node(node.name)}
    finally:
        release(kube_admin, held)


class CountingPods(KubePods):
    """KubePods counting its lists."""

    lists = 0

    def pods_on_node(self, node: str) -> list[PodSummary]:
        self.lists += 1
        return super().pods_on_node(node)


def test_the_drain_lists_again_when_the_watch_sees_the_pods_gone_not_every_poll(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str,
    kube_client: KubeClient,
) -> None:
    web = create(kube_admin, namespace, make_pod("web", node.name))
    db = create(kube_admin, namespace, make_pod("db", node.name, grace=12))  # 6 s here
    for pod in (web, db):
        wait_for(lambda pod=pod: running_and_ready(kube_admin, pod), timeout=30,
                 what=f"pod {pod.ref} Running")
    pods = CountingPods(kube_client)
    tuning = DrainTuning()
    drainer = Drainer(pods, node.name, DrainOptions(), lambda _status: None,
                      started_at=time.monotonic(), clock=time.monotonic, tuning=tuning)

    asyncio.run(asyncio.wait_for(drainer.run(), 60))

    assert pods.pods_on_node(node.name) == []
    # Polling would have listed every poll_interval for the 6 s: 24 times. Watching: the
    # first list, one after each departure_wait without news, one once both are gone.
    assert pods.lists - 1 <= 2 + 6 / tuning.departure_wait


# -- evicting --------------------------------------------------------------------------------


def test_eviction_respects_the_disruption_budget(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str, pods: KubePods
) -> None:
    first, second = guarded_pair(kube_admin, namespace, node)

    assert pods.evict(first) == Evicted()
    blocked = pods.evict(second)
    assert isinstance(blocked, BlockedByBudget)
    assert "disruption budget" in blocked.message
    assert "web" in blocked.message  # the cause names the budget
    # The evicted pod terminates for its grace period, then the kubelet removes it.
    assert pods.pod_state(namespace, first.name, first.uid) == Present(first.uid, deleting=True)
    wait_for(lambda: pods.pod_state(namespace, first.name, first.uid) == Gone(), timeout=30,
             what="the evicted pod gone after its grace period")
    assert pods.pod_state(namespace, second.name, second.uid) == Present(second.uid)
    # Still one healthy pod short of allowing another disruption.
    assert isinstance(pods.evict(second), BlockedByBudget)
    # Evicting what is already gone is not an error.
    assert pods.evict(first) == Gone()


def test_delete_ignores_the_disruption_budget(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str, pods: KubePods
) -> None:
    first, second = guarded_pair(kube_admin, namespace, node)
    assert pods.evict(first) == Evicted()
    assert isinstance(pods.evict(second), BlockedByBudget)

    assert pods.delete(second, grace_period_seconds=0) == Deleted()
    wait_for(lambda: pods.pod_state(namespace, second.name, second.uid) == Gone(), timeout=30,
             what="the force-deleted pod gone")
    assert pods.delete(second) == Gone()


def test_a_pod_replaced_under_the_same_name_is_left_alone(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, namespace: str, pods: KubePods
) -> None:
    old = create(kube_admin, namespace, make_pod("db-0", node.name, owner_kind="StatefulSet",
                                                 grace=0))
    wait_for(lambda: running_and_ready(kube_admin, old), timeout=30, what="pod db-0 Running")
    CoreV1Api(kube_admin).delete_namespaced_pod("db-0", namespace, grace_period_seconds=0)
    wait_for(lambda: pods.pod_state(namespace, "db-0", old.uid) == Gone(), timeout=30,
             what="the first db-0 gone")
    new = create(kube_admin, namespace, make_pod("db-0", node.name, owner_kind="StatefulSet"))

    assert pods.pod_state(namespace, "db-0", old.uid) == Gone(replaced_by=new.uid)
    # Requests meant for the old pod carry its UID: the new one is not touched.
    assert pods.evict(old) == Gone(replaced_by=new.uid)
    assert pods.delete(old) == Gone(replaced_by=new.uid)
    assert pods.pod_state(namespace, "db-0", new.uid) == Present(new.uid)


def test_evicting_a_missing_pod_is_gone(pods: KubePods, namespace: str) -> None:
    missing = PodSummary(namespace=namespace, name="never-was", uid=str(uuid.uuid4()))
    assert pods.evict(missing) == Gone()
    assert pods.delete(missing) == Gone()
    assert pods.pod_state(namespace, "never-was", missing.uid) == Gone()


# -- RBAC ------------------------------------------------------------------------------------


AGENT_RULES = [
    V1PolicyRule(api_groups=[""], resources=["nodes"], verbs=["get", "list", "watch", "patch"]),
    V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"]),
    V1PolicyRule(api_groups=[""], resources=["pods/eviction"], verbs=["create"]),
    V1PolicyRule(api_groups=[""], resources=["events"], verbs=["create"]),
]


def test_the_agent_needs_only_its_rules_and_is_refused_the_rest(
    kube_admin: kubernetes.client.ApiClient,
    service_account_kube_client: Callable[[str, str], KubeClient],
    node: EmulatedNode,
    namespace: str,
) -> None:
    rbac = RbacAuthorizationV1Api(kube_admin)
    name = f"cluo-agent-{namespace}"
    rbac.create_cluster_role(V1ClusterRole(metadata=V1ObjectMeta(name=name), rules=AGENT_RULES))
    rbac.create_cluster_role_binding(V1ClusterRoleBinding(
        metadata=V1ObjectMeta(name=name),
        role_ref=V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=name),
        subjects=[RbacV1Subject(kind="ServiceAccount", name="agent", namespace=namespace)],
    ))
    try:
        agent = service_account_kube_client(namespace, "agent")
        nodes = KubeNodes(agent, KEYS)
        pods = KubePods(agent)
        web = create(kube_admin, namespace, make_pod("web", node.name))
        spare = create(kube_admin, namespace, make_pod("spare", node.name))
        wait_for(lambda: running_and_ready(kube_admin, web), timeout=30, what="pod web Running")

        # Everything the agent does with its node and its pods is allowed.
        snapshot = nodes.get(node.name)
        nodes.patch_metadata(node.name, annotations={KEYS.reboot_needed: "true"},
                             labels={KEYS.reboot_needed: "true"})
        nodes.update(node.name, lambda n: NodeChange(
            unschedulable=True, annotations={KEYS.agent_made_unschedulable: "true"}))
        nodes.set_unschedulable(node.name, False)
        with nodes.watch(node.name, None, timeout_seconds=5) as watch:
            assert next(iter(watch)).node.uid == snapshot.uid
        nodes.emit_event(node.name, "RbacCheck", "the agent may record events")
        assert {p.name for p in pods.pods_on_node(node.name)} >= {"web", "spare"}
        assert pods.evict(web) == Evicted()
        assert isinstance(pods.pod_state(namespace, "web", web.uid), Present | Gone)
        events = CoreV1Api(kube_admin).list_namespaced_event(
            EVENT_NAMESPACE, field_selector=f"involvedObject.name={node.name}").items
        assert any(e.reason == "RbacCheck" for e in events)

        # Deleting pods (the force policy) needs a grant the agent's rules do not give.
        with pytest.raises(KubeError) as refused:
            pods.delete(spare)
        assert refused.value.kind == "forbidden"
        assert refused.value.status == 403
        assert f"deleting pod '{spare.ref}'" in str(refused.value)
        assert pods.pod_state(namespace, "spare", spare.uid) == Present(spare.uid)
    finally:
        for delete in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
            try:
                delete(name)
            except ApiException as err:
                if err.status != 404:
                    raise
