"""The test control plane is real: PDBs, the Eviction API and RBAC behave as in a cluster."""

from __future__ import annotations

from collections.abc import Callable

import kubernetes.client
import pytest
from kubernetes.client import (
    CoreV1Api,
    PolicyV1Api,
    RbacAuthorizationV1Api,
    RbacV1Subject,
    V1Container,
    V1DeleteOptions,
    V1Eviction,
    V1LabelSelector,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodDisruptionBudget,
    V1PodDisruptionBudgetSpec,
    V1PodSpec,
    V1PolicyRule,
    V1Role,
    V1RoleBinding,
    V1RoleRef,
)
from kubernetes.client.rest import ApiException

from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

pytestmark = pytest.mark.kube


def _pod(name: str, node: str) -> V1Pod:
    return V1Pod(
        metadata=V1ObjectMeta(
            name=name,
            labels={"app": "web"},
            owner_references=[V1OwnerReference(
                api_version="apps/v1", kind="ReplicaSet", name="web-1234",
                uid="00000000-0000-0000-0000-000000000001", controller=True,
            )],
        ),
        spec=V1PodSpec(node_name=node, containers=[V1Container(name="c", image="pause")]),
    )


def _eviction(name: str, namespace: str) -> V1Eviction:
    return V1Eviction(
        metadata=V1ObjectMeta(name=name, namespace=namespace),
        delete_options=V1DeleteOptions(grace_period_seconds=0),
    )


def test_pdb_blocks_second_eviction_and_rbac_denies_missing_permission(
    kube_admin: kubernetes.client.ApiClient,
    namespace: str,
    service_account_client: Callable[[str, str], kubernetes.client.ApiClient],
) -> None:
    core = CoreV1Api(kube_admin)
    policy = PolicyV1Api(kube_admin)
    with KubeletEmulator(kube_admin, grace_period_scale=0.0) as kubelet:
        node = kubelet.add_node(f"{namespace}-node")
        for name in ("web-a", "web-b"):
            core.create_namespaced_pod(namespace, _pod(name, node.name))
        policy.create_namespaced_pod_disruption_budget(namespace, V1PodDisruptionBudget(
            metadata=V1ObjectMeta(name="web"),
            spec=V1PodDisruptionBudgetSpec(
                min_available=1, selector=V1LabelSelector(match_labels={"app": "web"})
            ),
        ))

        def running_and_ready(name: str) -> bool:
            pod = core.read_namespaced_pod(name, namespace)
            return pod.status.phase == "Running" and any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
            )

        wait_for(lambda: running_and_ready("web-a") and running_and_ready("web-b"),
                 timeout=30, what="both pods Running and Ready")

        def pdb_processed() -> bool:
            pdb = policy.read_namespaced_pod_disruption_budget("web", namespace)
            status = pdb.status
            return bool(
                status
                and status.observed_generation == pdb.metadata.generation
                and status.current_healthy == 2
                and status.disruptions_allowed == 1
            )

        wait_for(pdb_processed, timeout=60,
                 what="the disruption controller to allow exactly one disruption")

        # A ServiceAccount that may list pods but not create evictions is refused by RBAC.
        rbac = RbacAuthorizationV1Api(kube_admin)
        rbac.create_namespaced_role(namespace, V1Role(
            metadata=V1ObjectMeta(name="pod-reader"),
            rules=[V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
        ))
        rbac.create_namespaced_role_binding(namespace, V1RoleBinding(
            metadata=V1ObjectMeta(name="pod-reader"),
            role_ref=V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                               name="pod-reader"),
            subjects=[RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ))
        reader = CoreV1Api(service_account_client(namespace, "reader"))

        def listed() -> set[str] | None:
            try:
                return {p.metadata.name for p in reader.list_namespaced_pod(namespace).items}
            except ApiException as err:
                if err.status == 403:  # the authorizer's informer has not seen the binding yet
                    return None
                raise

        assert wait_for(listed, 10, "the RBAC authorizer to see the new RoleBinding") == {
            "web-a", "web-b"
        }
        with pytest.raises(ApiException) as denied:
            reader.create_namespaced_pod_eviction("web-a", namespace,
                                                  _eviction("web-a", namespace))
        assert denied.value.status == 403

        core.create_namespaced_pod_eviction("web-a", namespace, _eviction("web-a", namespace))
        with pytest.raises(ApiException) as blocked:
            core.create_namespaced_pod_eviction("web-b", namespace,
                                                _eviction("web-b", namespace))
        assert blocked.value.status == 429
        assert "disruption budget" in blocked.value.body
