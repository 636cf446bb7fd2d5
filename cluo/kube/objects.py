"""What every API object carries, read one way: its name, its resourceVersion, its times.

Objects are plain JSON (dicts with the API server's camelCase keys). Both programs read
the same fields through these functions, so a missing or odd field reads the same
everywhere: an empty string, or None for a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "Obj",
    "api_time",
    "micro_time",
    "name_of",
    "newer_or_same",
    "seconds_time",
    "version_of",
]

Obj = dict[str, Any]  # an API object as JSON


def name_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def version_of(obj: Mapping[str, Any]) -> str:
    """The object's resourceVersion ("" if it has none)."""
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def newer_or_same(candidate: str, current: str) -> bool:
    """Whether an object at resourceVersion ``candidate`` may replace one at ``current``.

    Resource versions are etcd revisions in every API server in use; should one not be a
    number, the later arrival wins.
    """
    try:
        return int(candidate) >= int(current)
    except ValueError:
        return True


def api_time(value: object) -> datetime | None:
    """An API server time (RFC 3339, ``Z`` or an offset), or None if absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def seconds_time(at: datetime) -> str:
    """A metav1.Time: UTC, whole seconds (an Event's timestamps)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(at: datetime) -> str:
    """A metav1.MicroTime: UTC with microseconds (a Lease's times), as the API requires."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
