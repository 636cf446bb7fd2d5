"""A node's credential reaches its own node only, enforced by the real API server.

cluo-agent authenticates with its node's kubelet credential (system:node:<name>, group
system:nodes: docs/security.md). The test bed's API server runs as kubeadm's does (Node
authorizer, NodeRestriction) and deploy/agent-policy.yaml is applied, here with one hook
annotation listed as an operator would list theirs. Every refusal below is a real 403
whose message names the layer that refused; every permission the agent needs is used as
the agent uses it (cluo's own adapters, cluo.kube.nodes and cluo.cycle.eviction). The
last test runs the real cluo-agent, with a node credential, through a whole drain and
reboot granted by the real cluo-coord.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbus
import kubernetes.client
import pytest
from kubernetes.client import (
    CoordinationV1Api,
    CoreV1Api,
    V1Container,
    V1Lease,
    V1LeaseSpec,
    V1Node,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodSpec,
)
from kubernetes.client.exceptions import ApiException

from cluo.cycle.eviction import Evicted, KubePods
from cluo.kube.client import ApiError, KubeClient
from cluo.kube.nodes import KubeNodes, NodeChange
from cluo.kube.resources import MERGE_PATCH
from cluo.protocol import (
    CLUO_PREFIX,
    FLUO_PREFIX,
    LEADER_LEASE_NAME,
    PAUSED_ANNOTATION,
    SPECS,
    Keys,
    Kind,
    NodePatch,
    Writer,
    slot_lease_name,
)
from testbed.agent_host import AgentProcess, HostDir
from testbed.controlplane import ControlPlane
from testbed.coordinator import CoordProcess
from testbed.dbus_bus import MockService
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

pytestmark = [pytest.mark.kube]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAMESPACE = "cluo-system"  # the coordinator's (deploy/namespace.yaml)
HOOK = "hooks.example.com/before-done"  # listed in the policy, as docs/security.md says
REVOKED = "node-restriction.kubernetes.io/cluo-revoked"
TIMEOUT = 60
# Who refused, as each layer says it in the 403's message.
NODE_AUTHORIZER = "node '{node}' cannot"
NODE_RESTRICTION = "node \"{node}\" is not allowed to modify node"
POLICY = "ValidatingAdmissionPolicy 'cluo-node-keys'"


def not_the_agents(kind: Kind) -> list[str]:
    """The names (below a protocol prefix) of keys of ``kind`` others write."""
    return [s.name for s in SPECS if s.kind is kind and s.writer is not Writer.AGENT]


@dataclass
class Pair:
    """Two registered nodes with a pod bound to each; ``a`` is the node credential's."""

    a: str
    b: str
    namespace: str
    node_a: KubeClient

    def pod(self, node: str) -> str:
        return f"pod-{node}"


@pytest.fixture(scope="module")
def policy(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "coordinator-rbac.yaml"))
    control_plane.apply_agent_policy(hook_annotations=(HOOK,))
    return control_plane


@pytest.fixture
def pair(policy: ControlPlane, kube_admin: kubernetes.client.ApiClient,
         namespace: str) -> Iterator[Pair]:
    core = CoreV1Api(kube_admin)
    suffix = uuid.uuid4().hex[:8]
    names = (f"a-{suffix}", f"b-{suffix}")
    for name in names:
        core.create_node(V1Node(metadata=V1ObjectMeta(name=name)))
        core.create_namespaced_pod(namespace, make_pod(f"pod-{name}", name))
    with policy.node_kube_client(names[0]) as client:
        yield Pair(names[0], names[1], namespace, client)
    for name in names:
        core.delete_node(name)


def make_pod(name: str, node: str) -> V1Pod:
    return V1Pod(
        metadata=V1ObjectMeta(name=name, owner_references=[V1OwnerReference(
            api_version="apps/v1", kind="ReplicaSet", name="web-1", controller=True,
            uid="00000000-0000-0000-0000-0000000000aa")]),
        spec=V1PodSpec(node_name=node, containers=[V1Container(name="c", image="pause")]),
    )


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the 403 that ``call`` must raise."""
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    assert caught.value.status == 403, caught.value.body
    return str(caught.value)


def patch_node(client: KubeClient, name: str, patch: dict[str, Any], *,
               subresource: str = "") -> Any:
    path = f"/api/v1/nodes/{name}" + (f"/{subresource}" if subresource else "")
    return client.request("PATCH", path, body=patch, content_type=MERGE_PATCH)


def annotation(key: str, value: str | None = "true") -> dict[str, Any]:
    return {"metadata": {"annotations": {key: value}}}


def label(key: str, value: str | None = "true") -> dict[str, Any]:
    return {"metadata": {"labels": {key: value}}}


# -- another node -------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [
    annotation(CLUO_PREFIX + "reboot-needed"),
    label(CLUO_PREFIX + "reboot-needed"),
    annotation("example.com/unrelated"),
    {"spec": {"unschedulable": True}},
], ids=["agent-annotation", "agent-label", "other-annotation", "unschedulable"])
def test_node_may_not_patch_another_node(pair: Pair, patch: dict[str, Any]) -> None:
    message = refused(patch_node, pair.node_a, pair.b, patch)
    assert NODE_RESTRICTION.format(node=pair.a) in message, message


def test_node_may_neither_read_nor_update_another_node(
        pair: Pair, kube_admin: kubernetes.client.ApiClient) -> None:
    message = refused(pair.node_a.request, "GET", f"/api/v1/nodes/{pair.b}")
    assert NODE_AUTHORIZER.format(node=pair.a) in message, message
    # A PUT of node B as the admin reads it, with the agent's key set.
    body = kube_admin.sanitize_for_serialization(CoreV1Api(kube_admin).read_node(pair.b))
    body["metadata"].setdefault("annotations", {})[CLUO_PREFIX + "reboot-needed"] = "true"
    body["spec"]["unschedulable"] = True
    message = refused(pair.node_a.request, "PUT", f"/api/v1/nodes/{pair.b}", body=body)
    assert NODE_RESTRICTION.format(node=pair.a) in message, message


@pytest.mark.parametrize("how", ["evict", "delete"])
def test_node_may_not_evict_or_delete_a_pod_of_another_node(pair: Pair, how: str) -> None:
    path = f"/api/v1/namespaces/{pair.namespace}/pods/{pair.pod(pair.b)}"
    if how == "evict":
        message = refused(pair.node_a.request, "POST", path + "/eviction", body={
            "apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": pair.pod(pair.b), "namespace": pair.namespace}})
        assert f"node {pair.a} can only evict pods with spec.nodeName set to itself" \
            in message, message
    else:
        message = refused(pair.node_a.request, "DELETE", path)
        assert f'node "{pair.a}" can only delete pods with spec.nodeName set to itself' \
            in message, message


# -- keys that are not the agent's, on its own node ---------------------------------------


OTHERS_KEYS = (
    [annotation(prefix + name) for prefix in (CLUO_PREFIX, FLUO_PREFIX)
     for name in not_the_agents(Kind.ANNOTATION)]
    + [label(prefix + name) for prefix in (CLUO_PREFIX, FLUO_PREFIX)
       for name in not_the_agents(Kind.LABEL)]
    + [annotation(HOOK), annotation(PAUSED_ANNOTATION), label("cluo.flatcar-linux.net/x")]
)


def key_id(patch: dict[str, Any]) -> str:
    ((kind, values),) = patch["metadata"].items()
    ((key, _),) = values.items()
    return f"{kind}:{key}"


@pytest.mark.parametrize("patch", OTHERS_KEYS, ids=key_id)
@pytest.mark.parametrize("subresource", ["", "status"])
def test_node_may_not_write_a_key_the_agent_does_not_own(
        pair: Pair, patch: dict[str, Any], subresource: str) -> None:
    # nodes/status too: a node may patch its status, and that update takes the metadata
    # as sent; only the policy stands between it and reboot-ok.
    message = refused(patch_node, pair.node_a, pair.a, patch, subresource=subresource)
    assert POLICY in message, message


@pytest.mark.parametrize("key", [CLUO_PREFIX + "reboot-ok", HOOK])
def test_node_may_not_remove_a_key_the_agent_does_not_own(
        pair: Pair, kube_admin: kubernetes.client.ApiClient, key: str) -> None:
    CoreV1Api(kube_admin).patch_node(pair.a, annotation(key, "false"))
    assert POLICY in refused(patch_node, pair.node_a, pair.a, annotation(key, None))
    assert POLICY in refused(patch_node, pair.node_a, pair.a, annotation(key, "true"))


def test_a_registering_node_may_not_bring_the_coordinators_keys(
        policy: ControlPlane) -> None:
    name = f"new-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "annotations": {CLUO_PREFIX + "reboot-ok": "true"}}}
    with policy.node_kube_client(name) as client:
        assert POLICY in refused(client.request, "POST", "/api/v1/nodes", body=body)


# -- leases and secrets -------------------------------------------------------------------


@pytest.mark.parametrize("lease", [slot_lease_name(0), LEADER_LEASE_NAME])
def test_node_may_not_touch_the_coordinators_leases(
        pair: Pair, kube_admin: kubernetes.client.ApiClient, lease: str) -> None:
    leases = CoordinationV1Api(kube_admin)
    path = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
    try:
        holder = leases.read_namespaced_lease(lease, NAMESPACE).spec.holder_identity
        created = False
    except ApiException as err:
        if err.status != 404:
            raise
        holder, created = "someone", True
        leases.create_namespaced_lease(NAMESPACE, V1Lease(
            metadata=V1ObjectMeta(name=lease), spec=V1LeaseSpec(holder_identity=holder)))
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lease, "namespace": NAMESPACE},
            "spec": {"holderIdentity": pair.a}}
    expected = 'can only access leases in the "kube-node-lease" system namespace'
    try:
        for method, target, payload in (
            ("POST", path, body),
            ("PUT", f"{path}/{lease}", body),
            ("PATCH", f"{path}/{lease}", {"spec": {"holderIdentity": pair.a}}),
            ("DELETE", f"{path}/{lease}", None),
            ("GET", f"{path}/{lease}", None),
        ):
            kwargs: dict[str, Any] = {"body": payload} if payload is not None else {}
            if method == "PATCH":
                kwargs["content_type"] = MERGE_PATCH
            message = refused(pair.node_a.request, method, target, **kwargs)
            assert expected in message, (method, message)
        assert leases.read_namespaced_lease(lease, NAMESPACE).spec.holder_identity == holder
    finally:
        if created:
            leases.delete_namespaced_lease(lease, NAMESPACE)


@pytest.mark.parametrize("where", ["test", NAMESPACE, "kube-system"])
def test_node_may_not_read_secrets(
        pair: Pair, kube_admin: kubernetes.client.ApiClient, where: str) -> None:
    namespace = pair.namespace if where == "test" else where
    core = CoreV1Api(kube_admin)
    secret = core.create_namespaced_secret(namespace, kubernetes.client.V1Secret(
        metadata=V1ObjectMeta(generate_name="s-"), string_data={"k": "v"}))
    try:
        path = f"/api/v1/namespaces/{namespace}/secrets"
        message = refused(pair.node_a.request, "GET", f"{path}/{secret.metadata.name}")
        assert "no relationship found between node" in message, message
        assert "cannot list resource" in refused(pair.node_a.request, "GET", path)
        assert "cannot list resource" in refused(pair.node_a.request, "GET", "/api/v1/secrets")
    finally:
        core.delete_namespaced_secret(secret.metadata.name, namespace)


# -- revoking one node --------------------------------------------------------------------


def test_a_revoked_node_may_change_no_cluo_key_and_cannot_unrevoke_itself(
        pair: Pair, policy: ControlPlane, kube_admin: kubernetes.client.ApiClient) -> None:
    core = CoreV1Api(kube_admin)
    nodes = KubeNodes(pair.node_a, Keys())
    nodes.patch_metadata(pair.a, {Keys().reboot_needed: "false"})  # allowed before
    core.patch_node(pair.a, label(REVOKED))
    for patch in (annotation(CLUO_PREFIX + "reboot-needed"),
                  annotation(CLUO_PREFIX + "reboot-needed", None),
                  label(CLUO_PREFIX + "group", "stable")):
        message = refused(patch_node, pair.node_a, pair.a, patch)
        assert POLICY in message and "is revoked" in message, message
    message = refused(patch_node, pair.node_a, pair.a, label(REVOKED, None))
    assert f"is not allowed to modify labels: {REVOKED}" in message, message
    # Node B, and anything but cluo's keys on node A, are untouched by the revocation.
    with policy.node_kube_client(pair.b) as node_b:
        KubeNodes(node_b, Keys()).patch_metadata(pair.b, {Keys().reboot_needed: "true"})
    patch_node(pair.node_a, pair.a, annotation("example.com/kubelet-note", "x"))


# -- what the agent needs on its own node -------------------------------------------------


def every_agent_write() -> NodePatch:
    return NodePatch(reboot_needed=True, reboot_in_progress=True,
                     agent_made_unschedulable=True, boot_id_before_reboot="b-1",
                     blocked_reason="a pod", status="UPDATE_STATUS_IDLE",
                     new_version="4152.2.0", last_checked_time="1700000000")


@pytest.mark.parametrize("prefix", [CLUO_PREFIX, FLUO_PREFIX])
def test_node_may_do_everything_the_agent_does_on_itself(
        pair: Pair, kube_admin: kubernetes.client.ApiClient, prefix: str) -> None:
    keys = Keys(prefix)
    nodes = KubeNodes(pair.node_a, keys)
    with nodes.watch(pair.a, None, timeout_seconds=5) as watch:
        first = next(iter(watch))
    assert first.node.name == pair.a
    written = every_agent_write().to_metadata(keys)
    nodes.patch_metadata(pair.a, written.annotations, written.labels)
    for name in ("id", "version", "group"):
        nodes.patch_metadata(pair.a, labels={keys.key(name): "x"})
    # The grant taken and the cycle's end: the mark and spec.unschedulable in one patch.
    granted = NodePatch(reboot_in_progress=True, agent_made_unschedulable=True,
                        blocked_reason="").to_metadata(keys)
    node = nodes.patch(pair.a, NodeChange(granted.annotations, granted.labels, True))
    assert node.unschedulable and node.state.agent_made_unschedulable
    cleared = NodePatch(reboot_needed=False, reboot_in_progress=False,
                        agent_made_unschedulable=False, boot_id_before_reboot="",
                        blocked_reason="").to_metadata(keys)
    node = nodes.patch(pair.a, NodeChange(cleared.annotations, cleared.labels, False))
    assert not node.unschedulable
    assert node.annotations.get(keys.boot_id_before_reboot) is None
    # A read-modify-write with the node's resourceVersion is allowed as well.
    node = nodes.update(pair.a, lambda _node: NodeChange(
        annotations={keys.agent_made_unschedulable: "true"}, unschedulable=True))
    assert node.unschedulable
    nodes.emit_event(pair.a, "ConfinementCheck", "from the node's own credential")
    events = CoreV1Api(kube_admin).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={pair.a},reason=ConfinementCheck")
    assert len(events.items) == 1

    pods = KubePods(pair.node_a)
    on_a = pods.pods_on_node(pair.a)
    assert [p.name for p in on_a] == [pair.pod(pair.a)]
    assert isinstance(pods.evict(on_a[0]), Evicted)
    core = CoreV1Api(kube_admin)
    core.create_namespaced_pod(pair.namespace, make_pod("second", pair.a))
    second = next(p for p in pods.pods_on_node(pair.a) if p.name == "second")
    pods.delete(second, grace_period_seconds=0)


# -- the confined agent, a whole cycle with the real coordinator --------------------------


NEED_REBOOT = (dbus.Int64(1_700_000_000), 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT",
               "4152.2.0", dbus.Int64(300_000_000))
IDLE = (dbus.Int64(1_700_000_100), 0.0, "UPDATE_STATUS_IDLE", "0.0.0", dbus.Int64(0))


@pytest.mark.dbus
def test_confined_agent_completes_a_drain_and_reboot_granted_by_the_coordinator(
    policy: ControlPlane, kube_admin: kubernetes.client.ApiClient,
    update_engine_mock: MockService, logind_mock: MockService, system_bus_address: str,
    namespace: str, tmp_path: Path,
) -> None:
    core = CoreV1Api(kube_admin)
    keys = Keys()
    selector = f"cluo-confinement={uuid.uuid4().hex[:8]}"
    coord_kubeconfig = policy.service_account_kubeconfig(
        NAMESPACE, "cluo-coord", tmp_path / "coord.kubeconfig")
    host = HostDir(tmp_path / "host")
    with KubeletEmulator(kube_admin, heartbeat_interval=2.0, grace_period_scale=0.05) as kubelet:
        key, value = selector.split("=")
        node = kubelet.add_node(f"c-{uuid.uuid4().hex[:8]}", labels={key: value},
                                boot_id=host.boot_id)
        core.create_namespaced_pod(namespace, make_pod("web", node.name))
        wait_for(lambda: core.read_namespaced_pod("web", namespace).status.phase == "Running",
                 TIMEOUT, "pod web Running")
        kubelet_conf = policy.node_kubeconfig(node.name, tmp_path / "kubelet.conf")
        agent = AgentProcess(node.name, kubelet_conf, system_bus_address, host,
                             tmp_path / "agent.log")
        coord = CoordProcess.start(coord_kubeconfig, selector, tmp_path / "coord.log",
                                   identity="confinement", leader_elect=False)
        try:
            agent.start()

            def annotations() -> dict[str, str]:
                return dict(core.read_node(node.name).metadata.annotations or {})

            def waiting(predicate: Any, what: str) -> Any:
                try:
                    return wait_for(predicate, TIMEOUT, what)
                except TimeoutError as err:
                    raise AssertionError(f"{err}\n--- agent:\n{agent.log()[-4000:]}\n"
                                         f"--- coordinator:\n{coord.log_tail()}") from None

            waiting(lambda: annotations().get(keys.status) == "UPDATE_STATUS_IDLE",
                    "the agent to mirror update_engine's idle status")
            update_engine_mock.mock.SetStatus(*NEED_REBOOT)
            waiting(lambda: len(logind_mock.calls("Reboot")) == 1,
                    "the coordinator's grant, the drain and logind Reboot(false)")
            assert core.list_namespaced_pod(namespace).items == [], "drained before the reboot"
            assert core.read_node(node.name).spec.unschedulable

            agent.kill()
            node.shutdown()
            update_engine_mock.mock.SetStatus(*IDLE)
            node.boot(host.reboot())
            agent.start()
            waiting(lambda: annotations().get(keys.reboot_ok) == "false"
                    and not core.read_node(node.name).spec.unschedulable
                    and annotations().get(keys.reboot_needed) == "false",
                    "the coordinator to close the cycle and the agent to uncordon")
            assert len(logind_mock.calls("Reboot")) == 1
            assert "ERROR_KIND=forbidden" not in agent.log(), agent.log()[-4000:]
        finally:
            agent.kill()
            coord.stop()
            core.delete_node(node.name)
