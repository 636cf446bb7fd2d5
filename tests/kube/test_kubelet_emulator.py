"""The kubelet emulator (KWOK plus testbed/kubelet.py) against a real kube-apiserver: the node
and pod behaviour that the agent and the coordinator rely on in every other kube and e2e test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client.rest import ApiException

from testbed.kubelet import NODE_LEASE_NAMESPACE, KubeletEmulator, KwokError
from testbed.waiting import assert_stays, wait_for

pytestmark = pytest.mark.kube

HEARTBEAT = 0.5  # seconds between node Lease renewals (KWOK: a 2 s lease, renewed every 0.5 s)
GRACE_SCALE = 0.1  # pods' grace periods run ten times faster
TIMEOUT = 15.0


@pytest.fixture
def core(kube_admin: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_admin)


@pytest.fixture
def leases(kube_admin: kubernetes.client.ApiClient) -> kubernetes.client.CoordinationV1Api:
    return kubernetes.client.CoordinationV1Api(kube_admin)


def started_emulator(kube_admin: kubernetes.client.ApiClient) -> KubeletEmulator:
    return KubeletEmulator(
        kube_admin, heartbeat_interval=HEARTBEAT, grace_period_scale=GRACE_SCALE
    ).start()


@pytest.fixture
def kubelet(
    kube_admin: kubernetes.client.ApiClient,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
) -> Iterator[KubeletEmulator]:
    emulator = started_emulator(kube_admin)
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
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    name: str,
    node: str,
    *,
    grace: int = 30,
    labels: dict[str, str] | None = None,
) -> None:
    """Create a pod already bound to `node` (there is no scheduler)."""
    core.create_namespaced_pod(
        namespace,
        kubernetes.client.V1Pod(
            metadata=kubernetes.client.V1ObjectMeta(name=name, labels=labels),
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


def read_node(core: kubernetes.client.CoreV1Api, name: str) -> object:
    """The Node, or None once it is gone."""
    try:
        return core.read_node(name)
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


def restart_count(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> int:
    pod = core.read_namespaced_pod_status(name, namespace)
    return int(pod.status.container_statuses[0].restart_count)


def wait_unknown(core: kubernetes.client.CoreV1Api, node: str) -> None:
    wait_for(
        lambda: node_condition(core, node).status == "Unknown",
        TIMEOUT,
        f"node {node}'s Ready condition to become Unknown",
    )


def assert_lease_frozen(leases: kubernetes.client.CoordinationV1Api, node: str) -> None:
    frozen = renew_time(leases, node)
    assert_stays(
        lambda: renew_time(leases, node) == frozen,
        5 * HEARTBEAT,
        f"node {node}'s Lease renewTime frozen while the host is down",
    )


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
    assert api_node.status.node_info.kernel_version.endswith("-flatcar")
    assert api_node.status.node_info.kubelet_version.startswith("v1.")
    assert api_node.status.capacity["pods"] == "110"
    ready = node_condition(core, name)
    assert (ready.status, ready.reason) == ("True", "KubeletReady")
    assert ready.last_heartbeat_time is not None
    lease = leases.read_namespaced_lease(name, NODE_LEASE_NAMESPACE)
    assert lease.metadata.owner_references[0].uid == api_node.metadata.uid
    first_renewal = lease.spec.renew_time
    wait_for(
        lambda: renew_time(leases, name) > first_renewal,
        TIMEOUT,
        "the node Lease to be renewed",
    )


def test_reports_node_status_every_status_report_interval_while_up(
    kube_admin: kubernetes.client.ApiClient, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    emulator = KubeletEmulator(
        kube_admin, heartbeat_interval=HEARTBEAT, status_report_interval=1.0
    ).start()
    try:
        node = emulator.add_node(f"{namespace}-n1")
        first = node_condition(core, node.name)
        wait_for(
            lambda: node_condition(core, node.name).last_heartbeat_time
            > first.last_heartbeat_time,
            TIMEOUT,
            "a status report (Ready's lastHeartbeatTime moving on)",
        )
        later = node_condition(core, node.name)
        assert later.status == "True"
        assert later.last_transition_time == first.last_transition_time

        node.shutdown()
        wait_unknown(core, node.name)
        frozen = node_condition(core, node.name).last_heartbeat_time
        assert_stays(
            lambda: node_condition(core, node.name).last_heartbeat_time == frozen,
            3.0,
            "no status report while the host is down",
        )
    finally:
        emulator.stop(delete_nodes=True)


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


def test_shutdown_makes_the_node_unknown_and_tainted_its_pods_not_ready_and_its_lease_silent(
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
    wait_unknown(core, node.name)
    ready = node_condition(core, node.name)
    assert ready.reason == "NodeStatusUnknown"
    assert ready.message == "Kubelet stopped posting node status."
    assert node_condition(core, node.name, "MemoryPressure").status == "Unknown"
    wait_for(
        lambda: unreachable_taints(core, node.name) == ["NoExecute", "NoSchedule"],
        TIMEOUT,
        "the unreachable taints on the node",
    )
    wait_for(lambda: pod_not_ready(core, namespace, "web"), TIMEOUT, "pod web to be NotReady")
    assert_lease_frozen(leases, node.name)
    # Nothing the emulator (or KWOK) does later undoes the down state.
    assert node_condition(core, node.name).status == "Unknown"
    assert pod_not_ready(core, namespace, "web")


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
    wait_for(lambda: pod_not_ready(core, namespace, "web"), TIMEOUT, "pod web to be NotReady")
    down_since = renew_time(leases, node.name)

    second_boot = node.boot()

    assert second_boot != first_boot
    assert node.is_up
    assert node.boot_id == second_boot
    api_node = core.read_node_status(node.name)
    assert api_node.status.node_info.boot_id == second_boot
    assert node_condition(core, node.name).status == "True"
    assert unreachable_taints(core, node.name) == []
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready again")
    assert restart_count(core, namespace, "web") == 1
    wait_for(
        lambda: renew_time(leases, node.name) > down_since,
        TIMEOUT,
        "the node Lease to be renewed after the boot",
    )

    given = str(uuid.uuid4())
    assert node.boot(given) == given  # e2e tests pass an nspawn host's real boot id
    assert core.read_node_status(node.name).status.node_info.boot_id == given
    wait_for(
        lambda: restart_count(core, namespace, "web") == 2 and pod_ready(core, namespace, "web"),
        TIMEOUT,
        "pod web to run again after the second boot, restarted once more",
    )


def test_with_a_grace_period_a_short_reboot_leaves_the_node_as_it_was_and_a_long_one_not(
    kube_admin: kubernetes.client.ApiClient,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    grace = 6.0  # the node lifecycle controller's node-monitor-grace-period, seconds
    emulator = KubeletEmulator(
        kube_admin, heartbeat_interval=HEARTBEAT, grace_period_scale=GRACE_SCALE,
        node_monitor_grace_period=grace,
    ).start()
    try:
        node = emulator.add_node(f"{namespace}-n1")
        first_boot = node.boot_id
        bind_pod(core, namespace, "web", node.name)
        wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")

        node.shutdown()  # a reboot shorter than the grace period: nobody marks the node
        assert not node.is_up
        assert_lease_frozen(leases, node.name)  # the kubelet is silent all the same
        assert node_condition(core, node.name).status == "True"
        assert unreachable_taints(core, node.name) == []
        assert pod_ready(core, namespace, "web")
        second_boot = node.boot()

        assert second_boot != first_boot
        assert core.read_node_status(node.name).status.node_info.boot_id == second_boot
        assert node_condition(core, node.name).status == "True"
        assert_stays(
            lambda: node_condition(core, node.name).status == "True"
            and unreachable_taints(core, node.name) == [] and pod_ready(core, namespace, "web"),
            grace,
            "the briefly rebooted node Ready and untainted, its pod Ready, past the grace period",
        )

        node.shutdown()  # down for longer than the grace period: marked as at once without
        wait_unknown(core, node.name)
        assert node_condition(core, node.name).reason == "NodeStatusUnknown"
        wait_for(
            lambda: unreachable_taints(core, node.name) == ["NoExecute", "NoSchedule"],
            TIMEOUT,
            "the unreachable taints once the grace period has passed",
        )
        wait_for(lambda: pod_not_ready(core, namespace, "web"), TIMEOUT, "pod web NotReady")
        third_boot = node.boot()
        assert core.read_node_status(node.name).status.node_info.boot_id == third_boot
        assert node_condition(core, node.name).status == "True"
        assert unreachable_taints(core, node.name) == []
        wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web Ready again")
    finally:
        core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
        emulator.stop(delete_nodes=True)


def test_pod_readiness_is_what_the_disruption_controller_counts(
    kubelet: KubeletEmulator, core: kubernetes.client.CoreV1Api, namespace: str,
    kube_admin: kubernetes.client.ApiClient,
) -> None:
    policy = kubernetes.client.PolicyV1Api(kube_admin)
    node = kubelet.add_node(f"{namespace}-n1")
    for name in ("web-1", "web-2"):
        bind_pod(core, namespace, name, node.name, labels={"app": "web"})
    policy.create_namespaced_pod_disruption_budget(
        namespace,
        kubernetes.client.V1PodDisruptionBudget(
            metadata=kubernetes.client.V1ObjectMeta(name="web"),
            spec=kubernetes.client.V1PodDisruptionBudgetSpec(
                min_available=1,
                selector=kubernetes.client.V1LabelSelector(match_labels={"app": "web"}),
            ),
        ),
    )

    def healthy() -> tuple[int, int]:
        status = policy.read_namespaced_pod_disruption_budget("web", namespace).status
        return (status.current_healthy or 0, status.disruptions_allowed or 0)

    wait_for(lambda: healthy() == (2, 1), TIMEOUT, "budget web: 2 healthy, 1 disruption allowed")
    node.shutdown()
    wait_for(lambda: healthy() == (0, 0), TIMEOUT, "budget web: no healthy pod while down")
    node.boot()
    wait_for(lambda: healthy() == (2, 1), TIMEOUT, "budget web: both healthy after the boot")


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


# -- several emulators, scale, failures ------------------------------------------------------


def test_two_emulators_side_by_side_leave_each_others_nodes_alone(
    kubelet: KubeletEmulator,
    kube_admin: kubernetes.client.ApiClient,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    mine = kubelet.add_node(f"{namespace}-mine")
    other = started_emulator(kube_admin)
    try:
        theirs = other.add_node(f"{namespace}-theirs")
        bind_pod(core, namespace, "web", theirs.name)
        wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to be Ready")

        theirs.shutdown()
        wait_unknown(core, theirs.name)
        # The first emulator's KWOK neither revives the other's down node nor its pod.
        assert_lease_frozen(leases, theirs.name)
        assert node_condition(core, theirs.name).status == "Unknown"
        assert pod_not_ready(core, namespace, "web")
        assert node_condition(core, mine.name).status == "True"
    finally:
        other.stop(delete_nodes=True)

    assert read_node(core, theirs.name) is None
    with pytest.raises(ApiException) as gone:
        leases.read_namespaced_lease(theirs.name, NODE_LEASE_NAMESPACE)
    assert gone.value.status == 404
    since = renew_time(leases, mine.name)
    wait_for(
        lambda: renew_time(leases, mine.name) > since,
        TIMEOUT,
        "the first emulator's node Lease to be renewed after the second one stopped",
    )


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


def test_a_missing_kwok_binary_is_a_clear_error(
    kube_admin: kubernetes.client.ApiClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "kwok"
    monkeypatch.setenv("KWOK_BINARY", str(missing))
    emulator = KubeletEmulator(kube_admin)

    with pytest.raises(KwokError) as caught:
        emulator.start()

    assert "hack/build-kwok.sh" in str(caught.value)
    assert f"KWOK_BINARY={missing} is not an executable file" in str(caught.value)


# Last in the file: it restarts the session's kube-apiserver.
def test_rides_out_an_api_server_restart(
    kubelet: KubeletEmulator,
    control_plane,
    core: kubernetes.client.CoreV1Api,
    leases: kubernetes.client.CoordinationV1Api,
    namespace: str,
) -> None:
    node = kubelet.add_node(f"{namespace}-n1")

    control_plane.stop_apiserver()
    time.sleep(2 * HEARTBEAT)  # KWOK's Lease renewals and watches fail for a while
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
        "a pod bound after the restart to be Ready (KWOK's watch was re-established)",
    )
    node.shutdown()
    wait_unknown(core, node.name)
    node.boot()
    wait_for(lambda: pod_ready(core, namespace, "web"), TIMEOUT, "pod web to run after a boot")
