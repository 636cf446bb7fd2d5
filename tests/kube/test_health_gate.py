"""The health gate: a rebooted node's slot waits until the workloads it ran recovered.

The real cluo-coord (the Rig of tests/kube/test_coordinator.py: its console script,
deploy/'s RBAC, emulated nodes, stand-in agents) and the real controllers that decide
recovery: the replicaset controller keeps a ReplicaSet's pods and its
``availableReplicas``, the disruption controller its PodDisruptionBudget's
``disruptionsAllowed``, KWOK makes a pod bound to an emulated node Ready. There is no
scheduler: the ReplicaSet's template names the node its pods run on.

Node A runs a ReplicaSet's two pods, covered by a budget that allows one disruption; B
waits for the slot. When A is granted the test drains it (as the agent would) and points
the template at a node that does not exist, so the replacement pods stay Pending: A
comes back, but its slot stays taken (the gate closed, an Event and a gauge say why) and
B gets nothing. Once the template points at node C and the pending pods are replaced,
the pods turn Ready there, the ReplicaSet and the budget recover, A's slot is released
and B is granted.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import (
    AppsV1Api,
    CoreV1Api,
    PolicyV1Api,
    V1Container,
    V1LabelSelector,
    V1ObjectMeta,
    V1PodDisruptionBudget,
    V1PodDisruptionBudgetSpec,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ReplicaSet,
    V1ReplicaSetSpec,
)

from testbed.coordinator import CoordProcess
from testbed.waiting import assert_stays, wait_for
from tests.kube.test_coordinator import KEYS, Rig, coord_kubeconfig, rig

__all__ = ["coord_kubeconfig", "rig"]  # the fixtures this module uses

pytestmark = pytest.mark.kube

TIMEOUT = 60.0
HELD_FOR = 4.0  # s: how long B must wait while A's workloads have not recovered


def replica_set(name: str, app: str, node: str) -> V1ReplicaSet:
    return V1ReplicaSet(
        metadata=V1ObjectMeta(name=name),
        spec=V1ReplicaSetSpec(
            replicas=2, selector=V1LabelSelector(match_labels={"app": app}),
            template=V1PodTemplateSpec(
                metadata=V1ObjectMeta(labels={"app": app}),
                spec=V1PodSpec(node_name=node, termination_grace_period_seconds=0,
                               containers=[V1Container(name="web", image="nginx")]))))


def test_the_next_grant_waits_until_rescheduled_pods_are_ready_and_the_budget_recovered(
    rig: Rig, kube_admin: kubernetes.client.ApiClient, namespace: str,
) -> None:
    core, apps, policy = CoreV1Api(kube_admin), AppsV1Api(kube_admin), PolicyV1Api(kube_admin)
    a, b = rig.add_nodes(2)  # A first in the queue
    c = rig.emulator.add_node(f"c{rig.test_id}-elsewhere").name  # not managed, no reboot
    app = f"web-{rig.test_id}"
    apps.create_namespaced_replica_set(namespace, replica_set("web", app, a))
    policy.create_namespaced_pod_disruption_budget(namespace, V1PodDisruptionBudget(
        metadata=V1ObjectMeta(name="web"),
        spec=V1PodDisruptionBudgetSpec(min_available=1,
                                       selector=V1LabelSelector(match_labels={"app": app}))))

    def available() -> int:
        return apps.read_namespaced_replica_set("web", namespace).status.available_replicas or 0

    def allowed() -> int:
        status = policy.read_namespaced_pod_disruption_budget("web", namespace).status
        return int(status.disruptions_allowed or 0) if status else 0

    wait_for(lambda: available() == 2 and allowed() == 1, TIMEOUT,
             "the ReplicaSet's two pods Ready on A and the budget allowing one disruption")

    coord = rig.start()
    with rig.agents():
        wait_for(lambda: rig.annotations(a).get(KEYS.reboot_ok) == "true", TIMEOUT,
                 "A to be granted")
        # The drain, and nowhere for the evicted pods to run for now.
        apps.patch_namespaced_replica_set("web", namespace, {"spec": {"template": {"spec": {
            "nodeName": f"nowhere-{rig.test_id}"}}}})
        _delete_pods(core, namespace, app, on=a)

        wait_for(lambda: _gate_closed(coord, a), TIMEOUT, "A's health gate to close")
        assert_stays(lambda: set(rig.slot_holders().values()) == {a}, HELD_FOR,
                     "A to keep the slot and B to get none while A's workloads are down")
        (closed,) = [entry for entry in coord.entries() if entry.get("msg") ==
                     "health gate closed"]
        assert "ReplicaSet" in closed["why"] and "PodDisruptionBudget" in closed["why"]
        assert rig.events(a, "WorkloadsNotRecovered")
        assert coord.metric("cluo_health_gates_closed") == 1.0
        assert rig.annotations(a).get(KEYS.reboot_needed) == "false"  # A itself is back

        # The pods are rescheduled on C; A is released only once they are Ready there.
        apps.patch_namespaced_replica_set("web", namespace, {"spec": {"template": {"spec": {
            "nodeName": c}}}})
        _delete_pods(core, namespace, app, on=f"nowhere-{rig.test_id}")
        recovered_at = wait_for(lambda: available() == 2 and allowed() == 1 and time.time(),
                                TIMEOUT, "the pods Ready on C and the budget recovered")
        wait_for(lambda: rig.done(a) and rig.done(b), TIMEOUT,
                 "A to be released, then B granted, rebooted and released")
    (opened,) = [entry for entry in coord.entries() if entry.get("msg") == "health gate open"
                 and entry.get("node") == a]
    # A's slot goes back, or straight to B in one compare-and-swap (the hand-over).
    release = next(entry for entry in coord.entries()
                   if (entry.get("msg") == "reboot slot released" and entry.get("node") == a)
                   or (entry.get("msg") == "reboot slot handed over" and entry.get("from") == a))
    assert _timestamp(release) >= recovered_at - 1.0  # (clock granularity)
    assert _timestamp(opened) <= _timestamp(release)
    assert coord.metric("cluo_health_gates_closed") == 0.0


def _delete_pods(core: CoreV1Api, namespace: str, app: str, *, on: str) -> None:
    for pod in core.list_namespaced_pod(namespace, label_selector=f"app={app}").items:
        if pod.spec.node_name == on:
            core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)


def _gate_closed(coord: CoordProcess, node: str) -> bool:
    return any(entry.get("msg") == "health gate closed" and entry.get("node") == node
               for entry in coord.entries())


def _timestamp(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["time"]).timestamp()
