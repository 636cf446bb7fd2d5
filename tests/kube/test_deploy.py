"""deploy/ applies to a real API server, and its RBAC grants exactly what cluo needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.controlplane import ControlPlane

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COORD = "system:serviceaccount:cluo-system:cluo-coord"
AGENT = "system:serviceaccount:cluo-system:cluo-agent"


@pytest.fixture(scope="module")
def applied(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "-k", str(DEPLOY))
    return control_plane


def test_apply_creates_every_object(applied: ControlPlane) -> None:
    out = applied.kubectl(
        "get", "-n", "cluo-system", "-o", "name",
        "deployment/cluo-coord", "service/cluo-coord-metrics", "serviceaccount/cluo-coord",
        "serviceaccount/cluo-agent", "pdb/cluo-coord", "role/cluo-coord-leases",
    ).stdout.split()
    assert len(out) == 6
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
    result = plane.kubectl("auth", "can-i", "--as", user, *args, check=False)
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, result.stderr
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
        (AGENT, ("patch", "nodes"), True),
        (AGENT, ("create", "pods", "--subresource=eviction", "-n", "default"), True),
        (AGENT, ("list", "pods", "-n", "kube-system"), True),
        (AGENT, ("create", "events", "-n", "default"), True),
        (AGENT, ("update", "leases.coordination.k8s.io", "-n", "cluo-system"), False),
        (AGENT, ("delete", "nodes"), False),
        (AGENT, ("get", "secrets", "-n", "kube-system"), False),
        (AGENT, ("create", "pods", "-n", "default"), False),
    ],
)
def test_rbac_is_least_privilege(
    applied: ControlPlane, user: str, args: tuple[str, ...], allowed: bool
) -> None:
    assert _can(applied, user, *args) is allowed
