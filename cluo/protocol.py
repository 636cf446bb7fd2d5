"""The wire contract between cluo-agent, cluo-coord, hook DaemonSets and admins.

Every annotation and label key cluo reads or writes is declared here, once, with who
writes it and which values it takes. The keys keep CLUO's names under a configurable
prefix, so cluo drops into a CLUO cluster (the default prefix) or a FLUO cluster
(``FLUO_PREFIX``) and existing hook DaemonSets keep working. Keys that cluo adds to the
CLUO protocol are marked ``cluo_extension``.

This module is pure: it imports no I/O library and reads no clock.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeVar

from cluo.kube.objects import api_time, seconds_time

CLUO_PREFIX = "container-linux-update.v1.coreos.com/"
FLUO_PREFIX = "flatcar-linux-update.v1.flatcar-linux.net/"
DEFAULT_PREFIX = CLUO_PREFIX

_T = TypeVar("_T")

TRUE = "true"
FALSE = "false"

# Reboot slots: one coordination.k8s.io/v1 Lease per slot, in the coordinator's
# namespace, named SLOT_LEASE_PREFIX + slot index; holderIdentity is the node name.
SLOT_LEASE_PREFIX = "cluo-reboot-slot-"
LEADER_LEASE_NAME = "cluo-coord-leader"
# Marks a Lease as a cluo reboot slot, so other Leases in the namespace are ignored.
SLOT_LEASE_LABEL = "cluo.flatcar-linux.net/reboot-slot"
# Slot Lease annotations (written by the coordinator only). spec.leaseDurationSeconds
# stays unset: a slot never expires on its own.
SLOT_HOLDER_BOOT_ID = "cluo.flatcar-linux.net/holder-boot-id"  # holder's bootID at grant
SLOT_HOLDER_UID = "cluo.flatcar-linux.net/holder-uid"  # holder Node's metadata.uid at grant
SLOT_RELEASED_AT = "cluo.flatcar-linux.net/released-at"  # RFC 3339, set on release
SLOT_STUCK = "cluo.flatcar-linux.net/stuck"  # "true": the holder missed reboot_timeout
# The health gate's baseline (cluo_coord.health): the controllers and budgets of the
# holder's evicted pods, recorded at the grant as compact JSON, removed on release.
SLOT_WORKLOADS = "cluo.flatcar-linux.net/workloads"
# The global pause: "true" on the coordinator's leader Lease (`cluo-coord pause`).
PAUSED_ANNOTATION = "cluo.flatcar-linux.net/paused"
# The announced OS version (the holder's new-version when it took the slot), on the slot
# Lease: a node that comes back on an older one failed its reboot proof.
SLOT_ANNOUNCED_VERSION = "cluo.flatcar-linux.net/announced-version"
# Who paused the roll ("admin" or "brake"), why, and since when (RFC 3339), beside the
# pause on the leader Lease; and the nodes that failed their reboot proof (a JSON list of
# {"node", "why", "at"}) that the brake counts. Written by cluo-coord only.
PAUSED_BY_ANNOTATION = "cluo.flatcar-linux.net/paused-by"
PAUSED_REASON_ANNOTATION = "cluo.flatcar-linux.net/paused-reason"
PAUSED_AT_ANNOTATION = "cluo.flatcar-linux.net/paused-at"
FAILED_REBOOTS_ANNOTATION = "cluo.flatcar-linux.net/failed-reboots"
# The status the leading coordinator publishes (a ConfigMap in its namespace).
STATUS_CONFIGMAP_NAME = "cluo-status"

_PREFIX_RE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z0-9]([-a-z0-9]*[a-z0-9])?/$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class ProtocolError(ValueError):
    """A key, prefix or value does not follow the protocol."""


class Kind(enum.Enum):
    ANNOTATION = "annotation"
    LABEL = "label"


class Writer(enum.Enum):
    AGENT = "agent"
    COORDINATOR = "coordinator"
    ADMIN = "admin"
    HOOK = "hook"


@dataclass(frozen=True)
class KeySpec:
    """One key of the protocol: its name below the prefix and its meaning."""

    name: str
    kind: Kind
    writer: Writer
    values: str
    meaning: str
    cluo_extension: bool = False


# The whole vocabulary, in the order docs/protocol.md lists it.
SPECS: tuple[KeySpec, ...] = (
    KeySpec("reboot-needed", Kind.ANNOTATION, Writer.AGENT, "true/false",
            "update_engine reported UPDATE_STATUS_UPDATED_NEED_REBOOT, or an admin asked "
            "for a reboot by setting it to true."),
    KeySpec("reboot-in-progress", Kind.ANNOTATION, Writer.AGENT, "true/false",
            "The agent acted on the grant: it is draining or rebooting the node."),
    KeySpec("reboot-ok", Kind.ANNOTATION, Writer.COORDINATOR, "true/false",
            "The grant. true: the node may drain and reboot. Set back to false (never "
            "deleted) once the after-reboot phase is over."),
    KeySpec("reboot-paused", Kind.ANNOTATION, Writer.ADMIN, "true/false",
            "true: the coordinator grants this node nothing, and cancels a grant it gave "
            "before the reboot began: reboot-ok=false, labels and hook annotations removed, "
            "the slot freed once the agent has stopped and uncordoned the node."),
    KeySpec("status", Kind.ANNOTATION, Writer.AGENT, "UPDATE_STATUS_*",
            "update_engine's current_operation, mirrored."),
    KeySpec("new-version", Kind.ANNOTATION, Writer.AGENT, "OS version",
            "update_engine's new_version (0.0.0 when there is none), mirrored."),
    KeySpec("last-checked-time", Kind.ANNOTATION, Writer.AGENT, "Unix seconds",
            "update_engine's last_checked_time, mirrored."),
    KeySpec("agent-made-unschedulable", Kind.ANNOTATION, Writer.AGENT, "true/false",
            "The agent cordoned the node, so cluo may uncordon it: the coordinator in its "
            "reset at the end of a proven reboot (removing this key in the same write), "
            "the agent after an aborted or withdrawn cycle. While a cordoned node carries "
            "it, the node counts against --max-concurrent and keeps its slot. A node an "
            "admin cordoned stays cordoned."),
    KeySpec("boot-id-before-reboot", Kind.ANNOTATION, Writer.AGENT, "boot id",
            "/proc/sys/kernel/random/boot_id recorded just before the agent asked logind "
            "to reboot; a different boot id afterwards proves the reboot happened. The "
            "coordinator removes it in its reset at the end of a proven reboot, the agent "
            "after an aborted or withdrawn cycle.",
            cluo_extension=True),
    KeySpec("blocked-reason", Kind.ANNOTATION, Writer.AGENT, "text, empty when none",
            "Why the agent's current cycle cannot go on (pods blocking the drain, a "
            "refused reboot); cleared when it goes on. Together with reboot-ok=true and "
            "reboot-in-progress=false it hands the grant back: the coordinator sets "
            "reboot-ok=false and frees the slot. The coordinator clears it when it grants "
            "reboot-ok=true.", cluo_extension=True),
    KeySpec("reboot-reason", Kind.ANNOTATION, Writer.AGENT, "text, absent when none",
            "What asked for the reboot the agent announced with reboot-needed=true: "
            "update_engine and its new version, /run/reboot-required (with the packages "
            "/run/reboot-required.pkgs lists), a request on the host (SIGUSR1) or an "
            "admin's reboot-needed=true. Removed when reboot-needed goes back to false.",
            cluo_extension=True),
    KeySpec("drain-failures", Kind.ANNOTATION, Writer.COORDINATOR, "count",
            "Grants in a row that the agent handed back with a blocked-reason (its drain "
            "timed out). From the first one the node takes no slot before drain-retry-at "
            "and queues behind nodes with fewer; at --max-drain-attempts it is out of the "
            "roll until an admin clears it (cluo-coord retry NODE, or removing this "
            "annotation). Removed when a reboot of the node is done.", cluo_extension=True),
    KeySpec("drain-retry-at", Kind.ANNOTATION, Writer.COORDINATOR, "RFC 3339 time",
            "The earliest time the node whose drain failed may take a reboot slot again "
            "(--drain-backoff, doubling per failure up to --drain-backoff-max); absent "
            "once the node is out of the roll.", cluo_extension=True),
    KeySpec("release-slot", Kind.ANNOTATION, Writer.ADMIN, "true",
            "An admin releases the reboot slot of a node that did not come back; the "
            "coordinator clears it when done.", cluo_extension=True),
    KeySpec("fleetlock-id", Kind.ANNOTATION, Writer.ADMIN, "FleetLock client id",
            "The id this node's FleetLock client (Zincati) sends; wins over the id cluo-coord "
            "derives from the node's machine id (docs/fleetlock.md).", cluo_extension=True),
    KeySpec("fleetlock-client", Kind.ANNOTATION, Writer.COORDINATOR, "FleetLock client id",
            "cluo-coord runs this node's reboot cycle for the FleetLock client of that id "
            "(it writes the agent's keys); removed when the cycle is over.",
            cluo_extension=True),
    KeySpec("reboot-needed", Kind.LABEL, Writer.AGENT, "true/false",
            "Mirror of the reboot-needed annotation, for selectors."),
    KeySpec("before-reboot", Kind.LABEL, Writer.COORDINATOR, "true (absent otherwise)",
            "Before-reboot hook DaemonSets select on it; removed when the grant is given."),
    KeySpec("after-reboot", Kind.LABEL, Writer.COORDINATOR, "true (absent otherwise)",
            "After-reboot hook DaemonSets select on it; removed when the slot is released."),
    KeySpec("id", Kind.LABEL, Writer.AGENT, "os-release ID",
            "ID from /etc/os-release, quotes stripped."),
    KeySpec("version", Kind.LABEL, Writer.AGENT, "os-release VERSION",
            "VERSION from /etc/os-release, quotes stripped."),
    KeySpec("group", Kind.LABEL, Writer.AGENT, "update group",
            "GROUP from /usr/share/flatcar/update.conf, overridden by "
            "/etc/flatcar/update.conf."),
)


@dataclass(frozen=True)
class Keys:
    """The full key strings for one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix) or len(self.prefix) > 254:
            raise ProtocolError(
                f"annotation prefix {self.prefix!r} is not a DNS subdomain followed by '/'"
            )

    def key(self, name: str) -> str:
        if not any(spec.name == name for spec in SPECS):
            raise ProtocolError(f"{name!r} is not a key of the protocol")
        return self.prefix + name

    @property
    def reboot_needed(self) -> str:
        return self.prefix + "reboot-needed"

    @property
    def reboot_in_progress(self) -> str:
        return self.prefix + "reboot-in-progress"

    @property
    def reboot_ok(self) -> str:
        return self.prefix + "reboot-ok"

    @property
    def reboot_paused(self) -> str:
        return self.prefix + "reboot-paused"

    @property
    def status(self) -> str:
        return self.prefix + "status"

    @property
    def new_version(self) -> str:
        return self.prefix + "new-version"

    @property
    def last_checked_time(self) -> str:
        return self.prefix + "last-checked-time"

    @property
    def agent_made_unschedulable(self) -> str:
        return self.prefix + "agent-made-unschedulable"

    @property
    def boot_id_before_reboot(self) -> str:
        return self.prefix + "boot-id-before-reboot"

    @property
    def blocked_reason(self) -> str:
        return self.prefix + "blocked-reason"

    @property
    def reboot_reason(self) -> str:
        return self.prefix + "reboot-reason"

    @property
    def drain_failures(self) -> str:
        return self.prefix + "drain-failures"

    @property
    def drain_retry_at(self) -> str:
        return self.prefix + "drain-retry-at"

    @property
    def release_slot(self) -> str:
        return self.prefix + "release-slot"

    @property
    def fleetlock_id(self) -> str:
        return self.prefix + "fleetlock-id"

    @property
    def fleetlock_client(self) -> str:
        return self.prefix + "fleetlock-client"

    @property
    def before_reboot(self) -> str:
        return self.prefix + "before-reboot"

    @property
    def after_reboot(self) -> str:
        return self.prefix + "after-reboot"

    @property
    def id(self) -> str:
        return self.prefix + "id"

    @property
    def version(self) -> str:
        return self.prefix + "version"

    @property
    def group(self) -> str:
        return self.prefix + "group"


def parse_bool(key: str, value: str | None) -> bool:
    """Read a "true"/"false" value; a missing key is false, anything else is an error."""
    if value is None or value == FALSE:
        return False
    if value == TRUE:
        return True
    raise ProtocolError(f"{key} must be 'true' or 'false', not {value!r}")


def render_bool(value: bool) -> str:
    return TRUE if value else FALSE


def parse_bool_lenient(key: str, value: str | None) -> tuple[bool, str | None]:
    """Like parse_bool, but a bad value reads as false and comes back as a complaint.

    Readers use this so that one mistyped annotation on one node is reported instead
    of stopping the whole controller.
    """
    try:
        return parse_bool(key, value), None
    except ProtocolError as err:
        return False, str(err)


def label_value(raw: str) -> str:
    """Turn free text (an os-release field, a group) into a valid label value.

    Quotes are stripped (FLUO crash-looped on quoted VERSION values); characters a
    label value cannot hold become '_'; the result is cut to 63 characters.
    """
    value = raw.strip().strip("\"'")
    value = re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:63]
    value = value.strip("_.-")
    if not _LABEL_VALUE_RE.match(value):  # pragma: no cover - the steps above ensure it
        raise ProtocolError(f"cannot make a label value out of {raw!r}")
    return value


@dataclass(frozen=True)
class NodeProtocolState:
    """What a node's annotations and labels say, typed.

    ``complaints`` lists values that did not parse; they read as false.
    """

    reboot_needed: bool = False
    reboot_in_progress: bool = False
    reboot_ok: bool = False
    reboot_paused: bool = False
    agent_made_unschedulable: bool = False
    release_slot: bool = False
    reboot_needed_label: bool = False
    before_reboot: bool = False
    after_reboot: bool = False
    status: str = ""
    new_version: str = ""
    last_checked_time: str = ""
    boot_id_before_reboot: str = ""
    blocked_reason: str = ""
    reboot_reason: str = ""
    drain_failures: int = 0
    drain_retry_at: datetime | None = None
    complaints: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_metadata(
        cls,
        keys: Keys,
        annotations: Mapping[str, str] | None,
        labels: Mapping[str, str] | None,
    ) -> NodeProtocolState:
        annotations = annotations or {}
        labels = labels or {}
        complaints: list[str] = []

        def flag(source: Mapping[str, str], key: str) -> bool:
            value, complaint = parse_bool_lenient(key, source.get(key))
            if complaint:
                complaints.append(complaint)
            return value

        failures = annotations.get(keys.drain_failures, "0")
        counted = re.fullmatch(r"[0-9]{1,9}", failures) is not None
        if not counted:
            complaints.append(
                f"{keys.drain_failures} must be a count (0, 1, 2, ...), not {failures!r}")
        retry = annotations.get(keys.drain_retry_at)
        drain_retry_at = api_time(retry)
        if retry is not None and drain_retry_at is None:
            complaints.append(f"{keys.drain_retry_at} must be an RFC 3339 time, not {retry!r}")

        return cls(
            reboot_needed=flag(annotations, keys.reboot_needed),
            reboot_in_progress=flag(annotations, keys.reboot_in_progress),
            reboot_ok=flag(annotations, keys.reboot_ok),
            reboot_paused=flag(annotations, keys.reboot_paused),
            agent_made_unschedulable=flag(annotations, keys.agent_made_unschedulable),
            release_slot=flag(annotations, keys.release_slot),
            reboot_needed_label=flag(labels, keys.reboot_needed),
            before_reboot=flag(labels, keys.before_reboot),
            after_reboot=flag(labels, keys.after_reboot),
            status=annotations.get(keys.status, ""),
            new_version=annotations.get(keys.new_version, ""),
            last_checked_time=annotations.get(keys.last_checked_time, ""),
            boot_id_before_reboot=annotations.get(keys.boot_id_before_reboot, ""),
            blocked_reason=annotations.get(keys.blocked_reason, ""),
            reboot_reason=annotations.get(keys.reboot_reason, ""),
            drain_failures=int(failures) if counted else 0,
            drain_retry_at=drain_retry_at,
            complaints=tuple(complaints),
        )


def hooks_done(keys_required: tuple[str, ...], annotations: Mapping[str, str] | None) -> bool:
    """True when every user-chosen hook annotation is "true" (CLUO hook semantics)."""
    annotations = annotations or {}
    return all(annotations.get(key) == TRUE for key in keys_required)


def parse_hook_annotations(raw: str) -> tuple[str, ...]:
    """Parse a comma-separated list of hook annotation keys (full keys, not names)."""
    keys = tuple(part.strip() for part in raw.split(",") if part.strip())
    for key in keys:
        prefix, _, name = key.rpartition("/")
        if not name or not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", name):
            raise ProtocolError(f"hook annotation {key!r} is not a valid annotation key")
        if prefix and not _PREFIX_RE.match(prefix + "/"):
            raise ProtocolError(f"hook annotation {key!r} has an invalid prefix {prefix!r}")
    return keys


def slot_lease_name(index: int) -> str:
    if index < 0:
        raise ProtocolError(f"slot index must not be negative, got {index}")
    return f"{SLOT_LEASE_PREFIX}{index}"

# --- encoding: what each side writes (the reading is NodeProtocolState above) -----------


@dataclass(frozen=True)
class MetadataPatch:
    """Labels and annotations to write on a Node; a ``None`` value deletes the key."""

    labels: Mapping[str, str | None] = field(default_factory=dict)
    annotations: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class NodePatch:
    """What the agent writes on its node; ``None`` leaves a field alone.

    An empty ``boot_id_before_reboot`` or ``blocked_reason`` removes the annotation
    (NodeProtocolState reads a missing one as empty).
    """

    reboot_needed: bool | None = None  # annotation and label
    reboot_in_progress: bool | None = None
    agent_made_unschedulable: bool | None = None
    boot_id_before_reboot: str | None = None
    blocked_reason: str | None = None
    reboot_reason: str | None = None
    status: str | None = None
    new_version: str | None = None
    last_checked_time: str | None = None

    def to_metadata(self, keys: Keys) -> MetadataPatch:
        """The labels and annotations to write; a ``None`` value deletes the key."""
        annotations: dict[str, str | None] = {}
        labels: dict[str, str | None] = {}
        if self.reboot_needed is not None:
            annotations[keys.reboot_needed] = render_bool(self.reboot_needed)
            labels[keys.reboot_needed] = render_bool(self.reboot_needed)
        if self.reboot_in_progress is not None:
            annotations[keys.reboot_in_progress] = render_bool(self.reboot_in_progress)
        if self.agent_made_unschedulable is not None:
            annotations[keys.agent_made_unschedulable] = render_bool(
                self.agent_made_unschedulable
            )
        if self.boot_id_before_reboot is not None:
            annotations[keys.boot_id_before_reboot] = self.boot_id_before_reboot or None
        if self.blocked_reason is not None:
            annotations[keys.blocked_reason] = self.blocked_reason or None
        if self.reboot_reason is not None:
            annotations[keys.reboot_reason] = self.reboot_reason or None
        if self.status is not None:
            annotations[keys.status] = self.status
        if self.new_version is not None:
            annotations[keys.new_version] = self.new_version
        if self.last_checked_time is not None:
            annotations[keys.last_checked_time] = self.last_checked_time
        return MetadataPatch(labels=labels, annotations=annotations)

    def apply_to(self, node: NodeProtocolState) -> NodeProtocolState:
        """The node's protocol state once this patch is written."""
        return replace(
            node,
            reboot_needed=_keep(self.reboot_needed, node.reboot_needed),
            reboot_in_progress=_keep(self.reboot_in_progress, node.reboot_in_progress),
            agent_made_unschedulable=_keep(
                self.agent_made_unschedulable, node.agent_made_unschedulable
            ),
            boot_id_before_reboot=_keep(self.boot_id_before_reboot, node.boot_id_before_reboot),
            blocked_reason=_keep(self.blocked_reason, node.blocked_reason),
            reboot_reason=_keep(self.reboot_reason, node.reboot_reason),
            status=_keep(self.status, node.status),
            new_version=_keep(self.new_version, node.new_version),
            last_checked_time=_keep(self.last_checked_time, node.last_checked_time),
        )


def _keep(new: _T | None, old: _T) -> _T:
    return old if new is None else new


def _deleting(keys: Iterable[str]) -> dict[str, str | None]:
    return dict.fromkeys(keys)


def before_reboot_patch(keys: Keys, clear_annotations: Iterable[str]) -> MetadataPatch:
    """The coordinator labels a node before-reboot=true and clears stale before-reboot
    hook annotations."""
    return MetadataPatch(labels={keys.before_reboot: TRUE},
                         annotations=_deleting(clear_annotations))


def grant_patch(keys: Keys, clear_annotations: Iterable[str]) -> MetadataPatch:
    """The grant: reboot-ok=true, the before-reboot label and hook annotations removed,
    and ``blocked-reason`` cleared (a reason left from an earlier attempt must not read as
    an abort of this one)."""
    annotations = _deleting(clear_annotations)
    annotations[keys.reboot_ok] = TRUE
    annotations[keys.blocked_reason] = None
    return MetadataPatch(labels={keys.before_reboot: None}, annotations=annotations)


def after_reboot_patch(keys: Keys, clear_annotations: Iterable[str]) -> MetadataPatch:
    """The coordinator labels a node after-reboot=true and clears stale after-reboot hook
    annotations."""
    return MetadataPatch(labels={keys.after_reboot: TRUE},
                         annotations=_deleting(clear_annotations))


@dataclass(frozen=True)
class DrainBackoff:
    """What the coordinator records on a node whose drain failed: the failed attempts in
    a row, and when it may take a slot again (None: not before an admin clears it)."""

    failures: int
    retry_at: datetime | None


NO_DRAIN_FAILURES = DrainBackoff(0, None)  # both annotations removed


def drain_backoff_annotations(keys: Keys, backoff: DrainBackoff) -> dict[str, str | None]:
    """The ``drain-failures`` and ``drain-retry-at`` annotations for ``backoff``;
    ``NO_DRAIN_FAILURES`` removes both."""
    return {
        keys.drain_failures: str(backoff.failures) if backoff.failures else None,
        keys.drain_retry_at: None if backoff.retry_at is None else seconds_time(backoff.retry_at),
    }


def reset_patch(keys: Keys, clear_annotations: Iterable[str], *,
                clear_release_slot: bool = False,
                drain_backoff: DrainBackoff | None = None,
                uncordon: bool = False, finished: bool = False) -> MetadataPatch:
    """reboot-ok=false, both phase labels and every hook annotation removed; with
    ``clear_release_slot`` the admin's ``release-slot`` annotation too; with
    ``drain_backoff`` the drain failures recorded (or cleared) in the same write; with
    ``uncordon`` the agent's ``agent-made-unschedulable`` removed, for the write that
    also sets spec.unschedulable false (the coordinator's uncordon at the end of a cycle);
    with ``finished`` (the node's cycle is over) the agent's ``boot-id-before-reboot``
    removed, so the agent has nothing left to write for the cycle."""
    annotations = _deleting(clear_annotations)
    annotations[keys.reboot_ok] = FALSE
    if clear_release_slot:
        annotations[keys.release_slot] = None
    if uncordon:
        annotations[keys.agent_made_unschedulable] = None
    if finished:
        annotations[keys.boot_id_before_reboot] = None
    if drain_backoff is not None:
        annotations.update(drain_backoff_annotations(keys, drain_backoff))
    return MetadataPatch(labels={keys.before_reboot: None, keys.after_reboot: None},
                         annotations=annotations)
