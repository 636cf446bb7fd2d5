"""The brake on bad releases: the roll pauses itself after K failed reboot proofs.

A slot holder *fails its reboot proof* when (planner rule 14):

- it did not come back within ``--reboot-timeout`` (the MarkStuck case of rule 7, for a
  node that had its grant);
- it came back (a new boot id) but was still not Ready at ``--reboot-timeout``;
- it came back on an OS version older than the one update_engine announced (the
  holder's ``new-version`` when it took the slot, recorded on the slot Lease, against
  its os-release ``version`` label once back): update_engine rolled back to the old
  partition, the new release did not boot.

Each failure is recorded on the leader Lease (``failed-reboots``, a JSON list), so the
count survives restarts and leader changes; once ``--max-failed-reboots`` nodes are on
it the roll pauses (``paused=true``, ``paused-by=brake``, a reason and a time) until an
operator resumes it (``cluo-coord resume``, which clears the record too).

`RollState` is that part of the leader Lease, read and written as annotations. Pure:
no I/O, no clock; the writes are leader.py's (``update_roll_state``).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from cluo.kube.objects import api_time, seconds_time
from cluo.protocol import (
    FAILED_REBOOTS_ANNOTATION,
    PAUSED_ANNOTATION,
    PAUSED_AT_ANNOTATION,
    PAUSED_BY_ANNOTATION,
    PAUSED_REASON_ANNOTATION,
)

# Flatcar's versions: MAJOR.MINOR.PATCH (4081.2.0), dev builds with a suffix
# (3815.0.0+nightly-20240101-2100). update_engine says 0.0.0 when it has none.
_VERSION = re.compile(r"\s*(\d+(?:\.\d+)*)")
NO_VERSION = (0, 0, 0)


class PausedBy(enum.StrEnum):
    """Who paused the roll."""

    ADMIN = "admin"  # cluo-coord pause (or --pause)
    BRAKE = "brake"  # the coordinator, after --max-failed-reboots failed reboot proofs


def parse_version(text: str) -> tuple[int, ...] | None:
    """``4081.2.0`` -> (4081, 2, 0); None for an empty, unreadable or 0.0.0 version.

    Only the leading dotted numbers count; a build suffix (``+...``) is ignored."""
    match = _VERSION.match(text or "")
    if match is None:
        return None
    parts = tuple(int(part) for part in match.group(1).split("."))
    if not any(parts):
        return None
    return parts


def older_version(running: str, announced: str) -> bool:
    """Whether ``running`` is older than ``announced``; False when either is unknown.

    Numeric, part by part, a missing part counting as 0 (``4081.2`` is ``4081.2.0``)."""
    have, want = parse_version(running), parse_version(announced)
    if have is None or want is None:
        return False
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) < want + (0,) * (width - len(want))


@dataclass(frozen=True)
class FailedReboot:
    """One node that failed its reboot proof: why, and when that was seen."""

    node: str
    why: str
    at: datetime | None = None

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "why": self.why,
                "at": seconds_time(self.at) if self.at else ""}


@dataclass(frozen=True)
class RollState:
    """The roll's pause and the brake's record, as the leader Lease carries them.

    ``paused_by`` is empty for a pause written by an older cluo-coord (only ``paused``).
    ``complaints`` lists what could not be read (a malformed record reads as empty).
    """

    paused: bool = False
    paused_by: str = ""
    reason: str = ""
    since: datetime | None = None
    failed: tuple[FailedReboot, ...] = ()
    complaints: tuple[str, ...] = ()

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> RollState:
        annotations = annotations or {}
        failed, complaints = _failed_from_json(annotations.get(FAILED_REBOOTS_ANNOTATION, ""))
        return cls(
            paused=annotations.get(PAUSED_ANNOTATION) == "true",
            paused_by=annotations.get(PAUSED_BY_ANNOTATION, ""),
            reason=annotations.get(PAUSED_REASON_ANNOTATION, ""),
            since=api_time(annotations.get(PAUSED_AT_ANNOTATION)),
            failed=failed,
            complaints=complaints,
        )

    def annotations(self) -> dict[str, str | None]:
        """Every annotation of the state; None deletes one (a merge into the Lease's)."""
        paused = self.paused
        return {
            PAUSED_ANNOTATION: "true" if paused else None,
            PAUSED_BY_ANNOTATION: (self.paused_by or None) if paused else None,
            PAUSED_REASON_ANNOTATION: (self.reason or None) if paused else None,
            PAUSED_AT_ANNOTATION: seconds_time(self.since) if paused and self.since else None,
            FAILED_REBOOTS_ANNOTATION: json.dumps([f.to_json() for f in self.failed],
                                                  separators=(",", ":"))
            if self.failed else None,
        }

    @property
    def failed_nodes(self) -> frozenset[str]:
        return frozenset(failure.node for failure in self.failed)

    def with_failure(self, failure: FailedReboot) -> RollState:
        """The record with ``failure`` (a node already on it keeps its first entry)."""
        if failure.node in self.failed_nodes:
            return self
        return replace(self, failed=(*self.failed, failure))

    def paused_as(self, by: PausedBy, reason: str, at: datetime) -> RollState:
        """Paused by ``by``; a roll already paused keeps who paused it, why and since."""
        if self.paused:
            return self
        return replace(self, paused=True, paused_by=by.value, reason=reason, since=at)

    def resumed(self) -> RollState:
        """Running again, with an empty record (what ``cluo-coord resume`` writes)."""
        return RollState()

    def describe_pause(self) -> str:
        """'paused by the brake since ...: reason', for logs, holds and the status view."""
        if not self.paused:
            return "running"
        who = f" by {self.paused_by}" if self.paused_by else ""
        since = f" since {seconds_time(self.since)}" if self.since else ""
        reason = f": {self.reason}" if self.reason else ""
        return f"paused{who}{since}{reason}"


def brake_reason(failed: tuple[FailedReboot, ...], limit: int) -> str:
    """The pause reason the brake writes: how many failed, the limit, and who."""
    names = ", ".join(f"{f.node} ({f.why})" for f in failed)
    return (f"{len(failed)} node(s) failed the reboot proof (--max-failed-reboots {limit}): "
            f"{names}")


def _failed_from_json(raw: str) -> tuple[tuple[FailedReboot, ...], tuple[str, ...]]:
    if not raw.strip():
        return (), ()
    bad = (f"{FAILED_REBOOTS_ANNOTATION} is not a JSON list of {{node, why, at}}: "
           f"{raw[:80]!r}; it reads as empty",)
    try:
        items = json.loads(raw)
    except ValueError:
        return (), bad
    if not isinstance(items, list):
        return (), bad
    failed: list[FailedReboot] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("node"), str):
            return (), bad
        failed.append(FailedReboot(item["node"], str(item.get("why") or ""),
                                   api_time(str(item.get("at") or "")) if item.get("at")
                                   else None))
    return tuple(failed), ()
