"""Reboot-slot Leases on the real API server: every write is a compare-and-swap."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo_coord.leases import WORKLOADS, KubeSlots
from cluo_coord.planner import AcquireSlot, MarkStuck, ReleaseSlot
from testbed.controlplane import ControlPlane

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def coord_api(
    control_plane: ControlPlane,
) -> Callable[[], KubeClient]:
    """Clients authenticated as the cluo-coord ServiceAccount of deploy/ (real RBAC)."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "coordinator-rbac.yaml"))
    return lambda: control_plane.service_account_kube_client(
        "cluo-system", "cluo-coord", "cluo-coord")


def test_two_coordinators_racing_for_a_free_slot_only_one_wins(
    coord_api: Callable[[], KubeClient],
    kube_client: KubeClient,
) -> None:
    first, second = KubeSlots(coord_api(), "cluo-system"), KubeSlots(coord_api(), "cluo-system")
    slots, _ = first.list()
    assert all(s.index != 7 for s in slots)
    taken = first.acquire(AcquireSlot(7, "node-a", None, "boot-a", T0))
    assert taken.holder == "node-a"
    assert taken.holder_boot_id == "boot-a"
    assert taken.acquired_at == T0
    with pytest.raises(KubeError) as lost:
        second.acquire(AcquireSlot(7, "node-b", None, "boot-b", T0))
    assert lost.value.kind == "conflict"
    assert [s.holder for s in second.list()[0] if s.index == 7] == ["node-a"]
    # Deleting a slot is an admin's action, not the coordinator's (RBAC says so).
    with pytest.raises(KubeError) as denied:
        first.delete(7)
    assert denied.value.kind == "forbidden"
    KubeSlots(kube_client, "cluo-system").delete(7)


def test_stale_resource_version_cannot_take_release_or_mark(
    coord_api: Callable[[], KubeClient],
    kube_client: KubeClient,
) -> None:
    slots = KubeSlots(coord_api(), "cluo-system")
    created = slots.acquire(AcquireSlot(8, "node-a", None, "boot-a", T0, "uid-a"))
    assert created.resource_version is not None
    assert created.holder_uid == "uid-a"
    released = slots.release(ReleaseSlot(8, "node-a", created.resource_version, T0))
    assert released.holder is None
    assert released.released_at == T0
    assert (released.holder_boot_id, released.holder_uid) == ("", "")
    stale = created.resource_version
    for write in (
        lambda: slots.acquire(AcquireSlot(8, "node-b", stale, "boot-b", T0)),
        lambda: slots.release(ReleaseSlot(8, "node-a", stale, T0)),
        lambda: slots.mark_stuck(MarkStuck(8, "node-a", stale)),
    ):
        with pytest.raises(KubeError) as refused:
            write()
        assert refused.value.kind == "conflict"
    assert released.resource_version is not None
    retaken = slots.acquire(AcquireSlot(8, "node-b", released.resource_version, "boot-b", T0,
                                        "uid-b"))
    assert (retaken.holder, retaken.holder_boot_id, retaken.released_at) == ("node-b", "boot-b",
                                                                             None)
    assert retaken.holder_uid == "uid-b"
    assert retaken.resource_version is not None
    stuck = slots.mark_stuck(MarkStuck(8, "node-b", retaken.resource_version))
    assert stuck.stuck and stuck.holder == "node-b"
    admin = KubeSlots(kube_client, "cluo-system")
    admin.delete(8)
    admin.delete(8)  # deleting a missing slot is not an error


def test_a_retake_is_one_patch_carrying_the_record_and_counting_the_holders(
    coord_api: Callable[[], KubeClient],
    kube_client: KubeClient,
) -> None:
    slots = KubeSlots(coord_api(), "cluo-system")
    created = slots.acquire(AcquireSlot(9, "node-a", None, "boot-a", T0))
    assert created.transitions == 0 and created.resource_version is not None
    released = slots.release(ReleaseSlot(9, "node-a", created.resource_version, T0))
    assert released.resource_version is not None
    record = '{"controllers":[],"node":"node-b","pdbs":{}}'
    retaken = slots.acquire(AcquireSlot(9, "node-b", released.resource_version, "boot-b", T0,
                                        transitions=released.transitions + 1,
                                        grant_follows=True), record)
    assert (retaken.holder, retaken.transitions, retaken.released_at) == ("node-b", 1, None)
    assert slots.workloads(9) == record
    admin = KubeSlots(kube_client, "cluo-system")
    admin.delete(9)


def test_the_record_at_the_version_of_its_own_write_is_known_without_a_read(
    coord_api: Callable[[], KubeClient],
    kube_client: KubeClient,
) -> None:
    slots = KubeSlots(coord_api(), "cluo-system")
    admin = KubeSlots(kube_client, "cluo-system")
    record = '{"controllers":[],"node":"node-a","pdbs":{}}'
    taken = slots.acquire(AcquireSlot(10, "node-a", None, "boot-a", T0, grant_follows=True),
                          record)
    assert taken.resource_version is not None
    assert slots.workloads(10, taken.resource_version) == record
    # An admin removes the record (docs/coordinator.md: to open a gate): a new version.
    kube_client.call("removing the record", "PATCH",
                     "/apis/coordination.k8s.io/v1/namespaces/cluo-system/leases/"
                     "cluo-reboot-slot-10",
                     body={"metadata": {"annotations": {WORKLOADS: None}}},
                     content_type="application/merge-patch+json")
    moved = admin.read("cluo-reboot-slot-10")
    assert moved is not None
    version = moved["metadata"]["resourceVersion"]
    assert version != taken.resource_version
    assert slots.workloads(10, version) is None, "a version it did not write is read"
    assert slots.workloads(10) is None
    # The version of its own write still answers from that write: no read was made.
    assert slots.workloads(10, taken.resource_version) == record
    admin.delete(10)
