"""What the benchmarks need around the test bed: a control plane that writes an audit log,
a private system bus, and the audit log read back as typed requests.

Why an audit log: kube-apiserver 1.34's ``apiserver_request_total`` has no label naming the
client (its labels are verb, group, version, resource, subresource, scope, component, code,
dry_run), so it cannot tell the agent's requests from the kubelet emulator's or the
controller manager's. The audit log records each request with its user agent and user, at
the API server, which is what the benchmarks count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dbusmock import BusType
from dbusmock.testcase import PrivateDBus

from testbed.controlplane import ControlPlane

# Metadata for every request; the bodies of Node patches and of the writes to Leases in
# cluo-system as well (Request level), so a benchmark can tell which write set
# reboot-ok=true, which freed a slot (they are few: heartbeats go to kube-node-lease).
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Request
    verbs: ["patch"]
    resources: [{group: "", resources: ["nodes"]}]
  - level: Request
    verbs: ["create", "update", "patch"]
    namespaces: ["cluo-system"]
    resources: [{group: "coordination.k8s.io", resources: ["leases"]}]
  - level: Metadata
"""
SYSTEM_BUS_VARIABLE = "DBUS_SYSTEM_BUS_ADDRESS"
AUDIT_LOG_MAX_MB = 100_000


class AuditedControlPlane(ControlPlane):
    """The test bed's control plane with the API server's audit log on (Metadata level):
    two more kube-apiserver flags; everything else is the test bed's."""

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"


@contextlib.contextmanager
def running_audited_plane() -> Iterator[AuditedControlPlane]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = Path(tempfile.mkdtemp(prefix="cluo-bench-cp-", dir=base))
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    try:
        plane = AuditedControlPlane.start(workdir, extra_apiserver_args=(
            "--audit-policy-file", str(policy), "--audit-log-path", str(workdir / "audit.log"),
            # Never rotated (0 means lumberjack's 100 MB, which a roll of 1,000 nodes
            # passes): the benchmarks read the one file.
            "--audit-log-maxsize", str(AUDIT_LOG_MAX_MB)))
    except BaseException:
        # start() stops what it started, but the folder is ours (in /dev/shm: memory).
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    assert isinstance(plane, AuditedControlPlane)  # start() is a classmethod: cls(...)
    try:
        yield plane
    finally:
        plane.cleanup()


@contextlib.contextmanager
def private_system_bus() -> Iterator[str]:
    """A private dbus-daemon as the system bus (DBUS_SYSTEM_BUS_ADDRESS set meanwhile)."""
    previous = os.environ.get(SYSTEM_BUS_VARIABLE)
    bus = PrivateDBus(BusType.SYSTEM)
    bus.start()  # sets DBUS_SYSTEM_BUS_ADDRESS, which spawn_mock requires
    try:
        yield bus.address
    finally:
        bus.stop()
        if previous is None:
            os.environ.pop(SYSTEM_BUS_VARIABLE, None)
        else:
            os.environ[SYSTEM_BUS_VARIABLE] = previous


@dataclass(frozen=True)
class AuditedRequest:
    """One request as the API server's audit log records it."""

    audit_id: str
    received: datetime
    verb: str
    resource: str  # "nodes", "pods/eviction", ... ("" for non-resource URLs)
    code: int
    user: str
    user_agent: str
    uri: str

    @property
    def is_watch(self) -> bool:
        return self.verb == "watch"


def read_audit_log(path: Path) -> list[AuditedRequest]:
    """Every request in the log, once each (a watch logs ResponseStarted and -Complete)."""
    seen: dict[str, AuditedRequest] = {}
    with contextlib.suppress(FileNotFoundError), path.open() as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            audit_id = event.get("auditID", "")
            if not audit_id or audit_id in seen:
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            seen[audit_id] = AuditedRequest(
                audit_id=audit_id,
                received=datetime.fromisoformat(event["requestReceivedTimestamp"]),
                verb=event.get("verb", ""),
                resource=resource,
                code=int((event.get("responseStatus") or {}).get("code") or 0),
                user=(event.get("user") or {}).get("username", ""),
                user_agent=event.get("userAgent", ""),
                uri=event.get("requestURI", ""),
            )
    return sorted(seen.values(), key=lambda r: r.received)


@dataclass(frozen=True)
class AuditedWrite:
    """A write whose body the audit policy records (a Node patch, a cluo-system Lease write).

    ``completed`` is the API server's ``stageTimestamp`` of ResponseComplete (microseconds,
    the server's clock): the moment the write was stored and answered.
    """

    received: datetime
    completed: datetime
    verb: str
    resource: str
    namespace: str
    name: str
    code: int
    user: str
    body: dict[str, Any]

    @property
    def annotations(self) -> dict[str, str]:
        metadata = self.body.get("metadata") or {}
        return {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()
                if v is not None}

    @property
    def removed_annotations(self) -> frozenset[str]:
        metadata = self.body.get("metadata") or {}
        return frozenset(str(k) for k, v in (metadata.get("annotations") or {}).items()
                         if v is None)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def read_audited_writes(path: Path) -> list[AuditedWrite]:
    """Every write logged with its body (see AUDIT_POLICY), in order of completion."""
    writes: list[AuditedWrite] = []
    with contextlib.suppress(FileNotFoundError), path.open() as lines:
        for line in lines:
            if '"requestObject"' not in line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if event.get("stage") != "ResponseComplete":
                continue
            ref = event.get("objectRef") or {}
            body = event.get("requestObject")
            writes.append(AuditedWrite(
                received=datetime.fromisoformat(event["requestReceivedTimestamp"]),
                completed=datetime.fromisoformat(event["stageTimestamp"]),
                verb=event.get("verb", ""),
                resource=ref.get("resource", ""),
                namespace=ref.get("namespace", ""),
                name=ref.get("name", "") or _body_name(body),
                code=int((event.get("responseStatus") or {}).get("code") or 0),
                user=(event.get("user") or {}).get("username", ""),
                body=body if isinstance(body, dict) else {},
            ))
    return sorted(writes, key=lambda w: w.completed)


def _body_name(body: object) -> str:
    metadata = body.get("metadata") if isinstance(body, dict) else None
    return str((metadata or {}).get("name") or "")


def unique_suffix() -> str:
    return uuid.uuid4().hex[:6]
