"""The kubelet emulator against a real kube-apiserver: the node and pod behaviour that the agent
and the coordinator rely on in every other kube and e2e test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import kubernetes.client
import pytest
from kubernetes.client.rest import ApiException

from testbed.kubelet import NODE_LEASE_NAMESPACE, USER_AGENT, KubeletEmulator
from testbed.waiting import assert_stays, wait_for

pytestmark = pytest.mark.kube

HEARTBEAT = 0.3  # seconds between node Lease renewals
GRACE_SCALE = 0.1  # pods' grace periods run ten times faster
TIMEOUT = 15.0


@pytest.fixture
def core(kube_admin: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_admin)


@pytest.fixture
def leases(kube_admin: kubernetes.client.ApiClient) -> kubernetes.client.CoordinationV1Api:
    return kubernetes.client.CoordinationV1Api(kube_admin)


@pytest.fixture
def kubelet(
    kube_admin: kubernetes.client.ApiClient,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
) -> Iterator[KubeletEmulator]:
    emulator = KubeletEmulator(
        kube_admin, heartbeat_interval=HEARTBEAT, grace_period_scale=GRACE_SCALE
    ).start()
    yield emulator
    # Once the emulator stops nothing would finish these pods' deletions: remove them now.
    core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
    emulator.stop(delete_nodes=True)


# -- helpers ---------------------------------------------------------------------------------


def node_condition(
    core: kubernetes.client.CoreV1Api, node: str, ctype: str = "Ready"
) -> kubernetes.client.V1NodeCondition:
    conditions = core.read_node_status(node).status.conditions or []
    return next(c for c in conditions if c.type == ctype)


def unreachable_taints(core: kubernetes.client.CoreV1Api, node: str) -> list[str]:
    taints = core.read_node(node).spec.taints or []
    return sorted(t.effect for t in taints if t.key == "node.kubernetes.io/unreachable")


def renew_time(leases: kubernetes.client.CoordinationV1Api, node: str) -> datetime:
    return leases.read_namespaced_lease(node, NODE_LEASE_NAMESPACE).spec.renew_time


def bind_pod(
    core: kubernetes.client.CoreV1Api, namespace: str, name: str, node: str, *, grace: int = 30
) -> None:
    """Create a pod already bound to `node` (there is no scheduler)."""
    core.create_namespaced_pod(
        namespace,
        kubernetes.client.V1Pod(
            metadata=kubernetes.client.V1ObjectMeta(name=name),
            spec=kubernetes.client.V1PodSpec(
                node_name=node,
                termination_grace_period_seconds=grace,
                containers=[
                    kubernetes.client.V1Container(name="app", image="registry.k8s.io/pause:3.10")
                ],
            ),
        ),
    )


def read_pod(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> object:
    """The pod, or None once it is gone."""
    try:
        return core.read_namespaced_pod(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def pod_ready(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> bool:
    pod = core.read_namespaced_pod_status(name, namespace)
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    return pod.status.phase == "Running" and conditions.get("Ready") == "True"


def pod_not_ready(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> bool:
    pod = core.read_namespaced_pod_status(name, namespace)
    return any(c.type == "Ready" and c.status == "False" for c in pod.status.conditions or [])


# -- registration and heartbeats -------------------------------------------------------------


def test_registers_a_ready_node_with_its_boot_id_and_renews_its_lease(
    kubelet: KubeletEmulator,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    name = f"{namespace}-n1"
    boot_id = str(uuid.uuid4())

    node = kubelet.add_node(name, labels={"pool": "blue"}, boot_id=boot_id)

    assert node.is_up
    assert node.boot_id == boot_id
    api_node = core.read_node(name)
    assert api_node.metadata.labels["pool"] == "blue"
    assert api_node.status.node_info.boot_id == boot_id
    assert api_node.status.node_info.os_image.startswith("Flatcar Container Linux")
    assert api_node.status.node_info.kubelet_version.startswith("v1.")
    assert node_condition(core, name).status == "True"
    assert node_condition(core, name).last_heartbeat_time is not None
    lease = leases.read_namespaced_lease(name, NODE_LEASE_NAMESPACE)
    assert lease.spec.holder_identity == name
    assert lease.metadata.owner_references[0].uid == api_node.metadata.uid
    first_renewal = lease.spec.renew_time
    wait_for(
        lambda: renew_time(leases, name) > first_renewal,
        TIMEOUT,
        "the node Lease to be renewed",
    )


def test_writes_under_its_own_user_agent(
    kubelet: KubeletEmulator,
    core: kubernetes.client.CoreV1Api,
    kube_admin: kubernetes.client.ApiClient,
    namespace: str,
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")

    # The API server names the field manager of an update after the client's user agent.
    managers = {entry.manager for entry in core.read_node(node.name).metadata.managed_fields}
    assert managers == {USER_AGENT}
    assert kube_admin.user_agent != USER_AGENT  # the caller's client is left alone


def test_bound_pod_becomes_running_and_ready(
    kubelet: KubeletEmulator, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")

    bind_pod(core, namespace, "web", node.name)

    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Running and Ready")
    pod = core.read_namespaced_pod("web", namespace)
    conditions = {c.type: c.status for c in pod.status.conditions}
    for ctype in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
        assert conditions[ctype] == "True", ctype
    (container,) = pod.status.container_statuses
    assert container.ready and container.started
    assert container.state.running.started_at is not None
    assert container.restart_count == 0
    assert pod.status.pod_ip
    assert pod.status.host_ip
    assert pod.status.start_time is not None


def test_pod_on_a_node_nobody_emulates_stays_pending(
    kubelet: KubeletEmulator, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    kubelet.add_node(f"{namespace}-n1")

    bind_pod(core, namespace, "orphan", f"{namespace}-elsewhere")
    bind_pod(core, namespace, "web", f"{namespace}-n1")

    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")
    assert core.read_namespaced_pod("orphan", namespace).status.phase == "Pending"


# -- shutdown and boot -----------------------------------------------------------------------


def test_shutdown_makes_the_node_unknown_its_pods_not_ready_and_stops_heartbeats(
    kubelet: KubeletEmulator,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")
    bind_pod(core, namespace, "web", node.name)
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")

    node.shutdown()

    assert not node.is_up
    wait_for(
        lambda: node_condition(core, node.name).status == "Unknown",
        TIMEOUT,
        "the node's Ready condition to become Unknown",
    )
    ready = node_condition(core, node.name)
    assert ready.reason == "NodeStatusUnknown"
    assert ready.message == "Kubelet stopped posting node status."
    wait_for(
        lambda: unreachable_taints(core, node.name) == ["NoExecute", "NoSchedule"],
        TIMEOUT,
        "the unreachable taints on the node",
    )
    wait_for(lambda: pod_not_ready(core, namespace, "web"), TIMEOUT, "pod web to be NotReady")
    frozen = renew_time(leases, node.name)
    assert_stays(
        lambda: renew_time(leases, node.name) == frozen,
        5 * HEARTBEAT,
        "the node Lease's renewTime frozen while the host is down",
    )


def test_boot_reports_a_new_boot_id_and_runs_the_pods_again(
    kubelet: KubeletEmulator,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")
    first_boot = node.boot_id
    bind_pod(core, namespace, "web", node.name)
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")
    node.shutdown()
    wait_for(
        lambda: node_condition(core, node.name).status == "Unknown",
        TIMEOUT,
        "the node's Ready condition to become Unknown",
    )
    down_since = renew_time(leases, node.name)

    second_boot = node.boot()

    assert second_boot != first_boot
    assert node.is_up
    assert node.boot_id == second_boot
    wait_for(
        lambda: core.read_node_status(node.name).status.node_info.boot_id == second_boot,
        TIMEOUT,
        "the node to report the new bootID",
    )
    assert node_condition(core, node.name).status == "True"
    wait_for(
        lambda: unreachable_taints(core, node.name) == [],
        TIMEOUT,
        "the unreachable taints to be removed",
    )
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready again")
    assert (
        core.read_namespaced_pod("web", namespace).status.container_statuses[0].restart_count == 1
    )
    wait_for(
        lambda: renew_time(leases, node.name) > down_since,
        TIMEOUT,
        "the node Lease to be renewed after the boot",
    )

    given = str(uuid.uuid4())
    assert node.boot(given) == given  # e2e tests pass an nspawn host's real boot id
    wait_for(
        lambda: core.read_node_status(node.name).status.node_info.boot_id == given,
        TIMEOUT,
        "the node to report the given bootID",
    )


# -- pod deletions ---------------------------------------------------------------------------


def test_terminating_pod_disappears_after_its_scaled_grace_period_and_not_before(
    kubelet: KubeletEmulator, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    grace = 20
    scaled = grace * GRACE_SCALE
    node = kubelet.add_node(f"{namespace}-n1")
    bind_pod(core, namespace, "web", node.name, grace=grace)
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")

    deleted_at = time.monotonic()
    core.delete_namespaced_pod("web", namespace)

    terminating = read_pod(core, namespace, "web")
    assert terminating is not None, "the pod vanished at once, without its grace period"
    assert terminating.metadata.deletion_timestamp is not None
    wait_for(
        lambda: read_pod(core, namespace, "web") is None,
        scaled + TIMEOUT,
        "pod web to be deleted after its grace period",
    )
    assert time.monotonic() - deleted_at >= scaled


def test_terminating_pod_on_a_down_node_stays_until_the_node_boots(
    kubelet: KubeletEmulator, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")
    bind_pod(core, namespace, "web", node.name, grace=1)
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")
    node.shutdown()

    core.delete_namespaced_pod("web", namespace)

    assert_stays(
        lambda: read_pod(core, namespace, "web") is not None,
        10 * 1 * GRACE_SCALE + 5 * HEARTBEAT,
        "the terminating pod on the down node to stay",
    )
    node.boot()
    wait_for(
        lambda: read_pod(core, namespace, "web") is None,
        TIMEOUT,
        "pod web to be deleted once its node booted",
    )


# -- scale and outages -----------------------------------------------------------------------


def test_serves_a_hundred_nodes_at_once(
    kubelet: KubeletEmulator,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    names = [f"{namespace}-n{i:03d}" for i in range(100)]

    started = time.monotonic()
    kubelet.add_nodes(names, labels={"fleet": namespace})
    registered_in = time.monotonic() - started

    assert registered_in < 30, f"registering 100 nodes took {registered_in:.1f}s"
    nodes = core.list_node(label_selector=f"fleet={namespace}").items
    assert sorted(n.metadata.name for n in nodes) == names
    for api_node in nodes:
        ready = next(c for c in api_node.status.conditions if c.type == "Ready")
        assert ready.status == "True", api_node.metadata.name
    first = {
        lease.metadata.name: lease.spec.renew_time
        for lease in leases.list_namespaced_lease(NODE_LEASE_NAMESPACE).items
        if lease.metadata.name in set(names)
    }
    assert sorted(first) == names

    def all_renewed() -> bool:
        current = leases.list_namespaced_lease(NODE_LEASE_NAMESPACE).items
        renewed = {
            lease.metadata.name
            for lease in current
            if lease.spec.renew_time > first.get(lease.metadata.name, lease.spec.renew_time)
        }
        return renewed >= set(names)

    wait_for(all_renewed, TIMEOUT, "all 100 node Leases to be renewed")
    print(f"\nregistered 100 nodes in {registered_in:.2f}s")


def test_rides_out_an_api_server_restart(
    kubelet: KubeletEmulator,
    control_plane,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")

    control_plane.stop_apiserver()
    time.sleep(2 * HEARTBEAT)  # heartbeats and the pod watch fail for a while
    control_plane.start_apiserver()

    back_since = renew_time(leases, node.name)
    wait_for(
        lambda: renew_time(leases, node.name) > back_since,
        TIMEOUT,
        "the node Lease to be renewed after the API server restart",
    )
    bind_pod(core, namespace, "web", node.name)
    wait_for(
        lambda: pod_ready(core, namespace, "web"),
        TIMEOUT,
        "a pod bound after the restart to be Ready (the watch was re-established)",
    )
