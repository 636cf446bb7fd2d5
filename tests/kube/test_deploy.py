"""deploy/ applies to a real API server, and its RBAC grants exactly what cluo needs.

cluo-agent has no account of its own: it acts as its node (system:node:<name>, group
system:nodes), which the Node authorizer confines; deploy/ grants that group nothing.
tests/kube/test_agent_confinement.py shows the confinement write by write."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.controlplane import ControlPlane

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COORD = "system:serviceaccount:cluo-system:cluo-coord"
AGENT = "system:node:n1"  # the kubelet credential the agent uses, on node n1


@pytest.fixture(scope="module")
def applied(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "-k", str(DEPLOY))
    return control_plane


def test_apply_creates_every_object(applied: ControlPlane) -> None:
    out = applied.kubectl(
        "get", "-n", "cluo-system", "-o", "name",
        "deployment/cluo-coord", "service/cluo-coord-metrics", "serviceaccount/cluo-coord",
        "pdb/cluo-coord", "role/cluo-coord-leases",
    ).stdout.split()
    assert len(out) == 5
    policies = applied.kubectl(
        "get", "-o", "name", "validatingadmissionpolicy/cluo-node-keys",
        "validatingadmissionpolicybinding/cluo-node-keys").stdout.split()
    assert len(policies) == 2
    # No agent account and no agent RBAC: nothing to steal from a node's user-data.
    gone = applied.kubectl("get", "-n", "cluo-system", "serviceaccount/cluo-agent",
                           "clusterrolebinding/cluo-agent", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, gone.stdout + gone.stderr
    # What is in the cluster now is what deploy/ says: kubectl diff finds nothing.
    diff = applied.kubectl("diff", "-k", str(DEPLOY), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_coordinator_pod_is_hardened(applied: ControlPlane) -> None:
    jsonpath = "{.spec.template.spec.containers[0].securityContext}"
    security = applied.kubectl(
        "get", "-n", "cluo-system", "deployment/cluo-coord", "-o", f"jsonpath={jsonpath}"
    ).stdout
    assert '"readOnlyRootFilesystem":true' in security
    assert '"allowPrivilegeEscalation":false' in security
    assert '"drop":["ALL"]' in security


def _can(plane: ControlPlane, user: str, *args: str) -> bool:
    groups = ["--as-group", "system:nodes"] if user.startswith("system:node:") else []
    result = plane.kubectl("auth", "can-i", "--as", user, *groups, *args, check=False)
    # A denial may give its reason: "no - node 'n1' cannot read 'n2', ...".
    answer = result.stdout.strip().split(" - ", 1)[0]
    assert answer in {"yes", "no"}, result.stdout + result.stderr
    return answer == "yes"


@pytest.mark.parametrize(
    ("user", "args", "allowed"),
    [
        (COORD, ("patch", "nodes"), True),
        (COORD, ("watch", "nodes"), True),
        (COORD, ("update", "leases.coordination.k8s.io", "-n", "cluo-system"), True),
        (COORD, ("update", "leases.coordination.k8s.io", "-n", "kube-node-lease"), False),
        (COORD, ("create", "pods", "--subresource=eviction", "-n", "default"), False),
        (COORD, ("delete", "nodes"), False),
        (COORD, ("get", "secrets", "-n", "cluo-system"), False),
        # The health gate and the blockers: read only, and only what they read.
        (COORD, ("list", "pods", "--all-namespaces"), True),
        (COORD, ("get", "pods", "-n", "default"), False),
        (COORD, ("watch", "pods", "--all-namespaces"), False),
        (COORD, ("get", "replicasets.apps", "-n", "default"), True),
        (COORD, ("get", "statefulsets.apps", "-n", "default"), True),
        (COORD, ("get", "replicationcontrollers", "-n", "default"), True),
        (COORD, ("list", "replicasets.apps", "-n", "default"), False),
        (COORD, ("get", "deployments.apps", "-n", "default"), False),
        (COORD, ("list", "poddisruptionbudgets.policy", "-n", "default"), True),
        (COORD, ("update", "poddisruptionbudgets.policy", "-n", "default"), False),
        (COORD, ("delete", "pods", "-n", "default"), False),
        # The status view: the one ConfigMap cluo-status in its namespace.
        (COORD, ("create", "configmaps", "-n", "cluo-system"), True),
        (COORD, ("update", "configmaps/cluo-status", "-n", "cluo-system"), True),
        (COORD, ("get", "configmaps/cluo-status", "-n", "cluo-system"), True),
        (COORD, ("update", "configmaps/other", "-n", "cluo-system"), False),
        (COORD, ("get", "configmaps/other", "-n", "cluo-system"), False),
        (COORD, ("delete", "configmaps/cluo-status", "-n", "cluo-system"), False),
        (COORD, ("list", "configmaps", "-n", "cluo-system"), False),
        (COORD, ("create", "configmaps", "-n", "default"), False),
        (AGENT, ("get", "nodes/n1"), True),
        (AGENT, ("get", "nodes/n2"), False),
        (AGENT, ("list", "nodes"), False),
        (AGENT, ("patch", "nodes/n1"), True),
        (AGENT, ("create", "pods", "--subresource=eviction", "-n", "default"), True),
        (AGENT, ("create", "events", "-n", "default"), True),
        (AGENT, ("patch", "events", "-n", "default"), True),
        (AGENT, ("update", "leases.coordination.k8s.io", "-n", "cluo-system"), False),
        (AGENT, ("delete", "nodes/n1"), False),
        (AGENT, ("list", "secrets", "-n", "kube-system"), False),
    ],
)
def test_rbac_is_least_privilege(
    applied: ControlPlane, user: str, args: tuple[str, ...], allowed: bool
) -> None:
    assert _can(applied, user, *args) is allowed
