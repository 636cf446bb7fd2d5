"""Reboot-slot Leases (coordination.k8s.io/v1) on a real API server.

One Lease per slot, ``cluo-reboot-slot-<i>`` in the coordinator's namespace, labelled
``cluo.flatcar-linux.net/reboot-slot``. Every write is a compare-and-swap: a replace or a
JSON merge patch carrying the resourceVersion the planner saw (a precondition), or a
create, which fails if the Lease exists; so a write computed from a stale view fails with
``KubeError(kind="conflict")`` instead of taking a slot someone else holds. An
acquisition of an existing Lease, a release and the health gate's record are merge
patches, so they need no read first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cluo.errors import KubeError
from cluo.kube.client import JSON, KubeClient
from cluo.kube.objects import api_time, micro_time, seconds_time
from cluo.kube.resources import MERGE_PATCH, events_path, leases_path
from cluo.protocol import (
    SLOT_ANNOUNCED_VERSION,
    SLOT_HOLDER_BOOT_ID,
    SLOT_HOLDER_UID,
    SLOT_LEASE_LABEL,
    SLOT_LEASE_PREFIX,
    SLOT_RELEASED_AT,
    SLOT_STUCK,
    SLOT_WORKLOADS,
    slot_lease_name,
)
from cluo_coord.groups import group_slot_lease_name
from cluo_coord.planner import AcquireSlot, MarkStuck, ReleaseSlot, SlotLease

log = logging.getLogger(__name__)

HOLDER_BOOT_ID = SLOT_HOLDER_BOOT_ID
HOLDER_UID = SLOT_HOLDER_UID
EVENT_MESSAGE_LIMIT = 1024  # as cluo.kube.nodes posts them
RELEASED_AT = SLOT_RELEASED_AT
STUCK = SLOT_STUCK
WORKLOADS = SLOT_WORKLOADS


# Planner rule 15: a group's slot Lease, ``cluo-reboot-group-<group>-<hash>-<index>``
# (cluo_coord.groups.group_slot_lease_name), records its group in this annotation; older
# coordinators, which read only ``cluo-reboot-slot-<index>``, pass it by.
SLOT_GROUP = "cluo.flatcar-linux.net/slot-group"

# What a release clears of the Lease's spec (leaseTransitions stays, counting holders).
RELEASED_SPEC_FIELDS = ("holderIdentity", "acquireTime", "renewTime", "leaseDurationSeconds",
                        "preferredHolder", "strategy")


def lease_name(index: int, group: str = "") -> str:
    """The Lease of global slot ``index``, or of slot ``index`` of ``group``."""
    return group_slot_lease_name(group, index) if group else slot_lease_name(index)


def slot_from_object(obj: Mapping[str, Any]) -> SlotLease | None:
    """A SlotLease from a Lease object, or None if the Lease is not a slot."""
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name") or "")
    annotations = metadata.get("annotations") or {}
    group = str(annotations.get(SLOT_GROUP) or "")
    if group:
        tail = name.rpartition("-")[2]
        if not tail.isdigit() or name != group_slot_lease_name(group, int(tail)):
            return None
        index = int(tail)
    elif not name.startswith(SLOT_LEASE_PREFIX):
        return None
    else:
        try:
            index = int(name.removeprefix(SLOT_LEASE_PREFIX))
        except ValueError:
            return None
    spec = obj.get("spec") or {}
    return SlotLease(
        index=index,
        holder=str(spec.get("holderIdentity") or "") or None,
        resource_version=str(metadata.get("resourceVersion") or "") or None,
        acquired_at=api_time(spec.get("acquireTime")),
        holder_boot_id=str(annotations.get(HOLDER_BOOT_ID) or ""),
        released_at=api_time(annotations.get(RELEASED_AT)),
        stuck=annotations.get(STUCK) == "true",
        holder_uid=str(annotations.get(HOLDER_UID) or ""),
        group=group,
        announced_version=str(annotations.get(SLOT_ANNOUNCED_VERSION) or ""),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


class KubeSlots:
    """The slot Leases of one namespace."""

    def __init__(self, api: KubeClient, namespace: str) -> None:
        self._api = api
        self._namespace = namespace
        # Lease name -> (the resourceVersion of this process's last write of it, the health
        # gate's record on that version): a Lease at a version is what was written then.
        self._written: dict[str, tuple[str, str | None]] = {}

    @property
    def namespace(self) -> str:
        return self._namespace

    def list(self) -> tuple[list[SlotLease], str]:
        """Every slot Lease, and the list's resourceVersion (to watch from)."""
        body = self._api.call(f"listing reboot-slot leases in {self._namespace!r}", "GET",
                              self._path(), query={"labelSelector": SLOT_LEASE_LABEL})
        slots = [s for s in map(slot_from_object, body.get("items") or []) if s is not None]
        return sorted(slots, key=lambda s: (s.group, s.index)), str(
            (body.get("metadata") or {}).get("resourceVersion") or ""
        )

    def acquire(self, change: AcquireSlot, workloads: str | None = None) -> SlotLease:
        """A create, or one merge patch at the planned resourceVersion (no read first:
        the planner saw the Lease free at that version, or naming the holder it hands the
        slot over from (``change.handed_from``), and its leaseTransitions, which
        ``change.transitions`` counts on). ``workloads``: the health gate's record of the
        node (JSON), written in the same compare-and-swap (the grant follows at once)."""
        name = lease_name(change.slot, change.group)
        action = f"taking reboot slot {name!r} for node {change.node!r}"
        annotations: dict[str, str | None] = {
            HOLDER_BOOT_ID: change.holder_boot_id, HOLDER_UID: change.holder_uid or None,
            RELEASED_AT: None, STUCK: None, SLOT_GROUP: change.group or None,
            SLOT_ANNOUNCED_VERSION: change.announced_version or None, WORKLOADS: workloads,
        }
        spec = {
            "holderIdentity": change.node,
            "acquireTime": micro_time(change.at),
            "renewTime": micro_time(change.at),
        }
        if change.expected_resource_version is None:
            body = self._lease(name, None, annotations, spec, transitions=0)
            return self._write(action, "POST", self._path(), body)
        return self._write(action, "PATCH", self._path(name), {
            "metadata": {"resourceVersion": change.expected_resource_version,
                         "labels": {SLOT_LEASE_LABEL: "true"}, "annotations": annotations},
            "spec": {**dict.fromkeys(RELEASED_SPEC_FIELDS), **spec,
                     "leaseTransitions": change.transitions}})

    def release(self, change: ReleaseSlot) -> SlotLease:
        """One merge patch at the planned resourceVersion (a precondition: 409 if the
        Lease changed since), no read first: the holder and its fields go, released-at
        is set, every other annotation and leaseTransitions stay."""
        name = lease_name(change.slot, change.group)
        action = f"releasing reboot slot {name!r} held by {change.node!r}"
        body = {
            "metadata": {
                "resourceVersion": change.expected_resource_version,
                "annotations": {
                    RELEASED_AT: micro_time(change.at), HOLDER_BOOT_ID: None, HOLDER_UID: None,
                    STUCK: None, SLOT_ANNOUNCED_VERSION: None, WORKLOADS: None,
                },
            },
            "spec": dict.fromkeys(RELEASED_SPEC_FIELDS),
        }
        return self._write(action, "PATCH", self._path(name), body)

    def record_workloads(self, index: int, node: str, expected_resource_version: str,
                         record: str) -> SlotLease:
        """Write the health gate's baseline (``record``, JSON) on slot ``index`` held by
        ``node``: a compare-and-swap at ``expected_resource_version``, so it also proves
        the Lease unchanged since the plan (planner rule 3) right before the grant."""
        name = slot_lease_name(index)
        action = f"recording the workloads of node {node!r} on reboot slot {name!r}"
        # One merge patch, no read first: the planner granted ``node`` from a view of the
        # Lease at this version naming it, so the precondition also proves it names it.
        return self._write(action, "PATCH", self._path(name), {"metadata": {
            "resourceVersion": expected_resource_version,
            "annotations": {WORKLOADS: record}}})

    def workloads(self, index: int, resource_version: str | None = None) -> str | None:
        """The health gate's baseline on slot ``index`` (None: none): as this process
        wrote it if its last write of the Lease made ``resource_version`` (the version
        the caller sees), else read uncached."""
        name = slot_lease_name(index)
        written = self._written.get(name)
        if resource_version is not None and written is not None \
                and written[0] == resource_version:
            return written[1]
        lease = self.read(name) or {}
        return ((lease.get("metadata") or {}).get("annotations") or {}).get(WORKLOADS)

    def mark_stuck(self, change: MarkStuck) -> SlotLease:
        name = lease_name(change.slot, change.group)
        action = f"marking reboot slot {name!r} of {change.node!r} stuck"
        current = self._read(name, action)
        metadata = dict(current.get("metadata") or {})
        metadata["annotations"] = {**(metadata.get("annotations") or {}), STUCK: "true"}
        metadata["resourceVersion"] = change.expected_resource_version
        body = {**current, "metadata": metadata}
        return self._write(action, "PUT", self._path(name), body)

    def delete(self, index: int) -> None:
        """Delete a slot Lease (the admin's way to free a slot whose node is gone)."""
        name = slot_lease_name(index)
        try:
            self._api.call(f"deleting reboot slot {name!r}", "DELETE", self._path(name))
        except KubeError as err:
            if err.kind != "not_found":
                raise

    def emit_event(self, index: int, reason: str, message: str, *, type: str,
                   component: str) -> None:
        """Record a core/v1 Event about slot Lease ``index``, in its namespace (``kubectl
        -n NAMESPACE describe lease cluo-reboot-slot-N`` lists it). For what happened to a
        holder whose Node is gone. Never raises: a failure is logged."""
        name = slot_lease_name(index)
        now = seconds_time(datetime.now(UTC))
        try:
            lease = self.read(name) or {}
            involved = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": name,
                        "namespace": self._namespace,
                        "uid": str((lease.get("metadata") or {}).get("uid") or "")}
            self._api.call(f"recording event for reboot slot {name!r}", "POST",
                           events_path(self._namespace), body={
                               "apiVersion": "v1", "kind": "Event",
                               "metadata": {"generateName": f"{name}.",
                                            "namespace": self._namespace},
                               "involvedObject": involved, "reason": reason,
                               "message": message[:EVENT_MESSAGE_LIMIT], "type": type,
                               "source": {"component": component},
                               "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                               "reportingComponent": component,
                               "reportingInstance": component,
                           })
        except KubeError as err:
            log.warning("could not record an event", extra={
                "SLOT": index, "REASON": reason, "ERROR": str(err), "ERROR_KIND": err.kind})

    def read(self, name: str) -> dict[str, Any] | None:
        """The Lease ``name`` of this namespace as the API server has it; None if missing."""
        try:
            return self._read(name, f"reading lease {name!r}")
        except KubeError as err:
            if err.kind == "not_found":
                return None
            raise

    # -- helpers ---------------------------------------------------------------------

    def _lease(
        self, name: str, resource_version: str | None, annotations: Mapping[str, str | None],
        spec: Mapping[str, Any], *, transitions: int,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": self._namespace,
            "labels": {SLOT_LEASE_LABEL: "true"},
            "annotations": {k: v for k, v in annotations.items() if v is not None},
        }
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {**spec, "leaseTransitions": transitions},
        }

    def _read(self, name: str, action: str) -> dict[str, Any]:
        body = self._api.call(action, "GET", self._path(name))
        assert isinstance(body, dict)
        return body

    def _path(self, name: str = "") -> str:
        return leases_path(self._namespace, name)

    def _write(self, action: str, method: str, path: str, body: Mapping[str, Any]) -> SlotLease:
        """POST, PUT or (a JSON merge patch) PATCH ``body``; 409 -> KubeError conflict."""
        try:
            written = self._api.call(action, method, path, body=dict(body),
                                     content_type=MERGE_PATCH if method == "PATCH" else JSON)
        except KubeError as err:
            if err.status == 409:  # AlreadyExists on create, Conflict on replace
                raise KubeError(action, "the slot changed since it was read: not taken",
                                kind="conflict", status=409) from err
            raise
        slot = slot_from_object(written)
        assert slot is not None
        metadata = written.get("metadata") or {}
        self._written[str(metadata.get("name") or "")] = (
            str(metadata.get("resourceVersion") or ""),
            (metadata.get("annotations") or {}).get(WORKLOADS))
        log.info("reboot slot written", extra={"SLOT": slot.index, "HOLDER": slot.holder or "",
                                               "ACTION": action})
        return slot
