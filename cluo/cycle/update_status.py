"""update_engine's status, typed.

update_engine (``com.coreos.update1``) reports its state as the D-Bus tuple ``xdssx``:
``(last_checked_time, progress, current_operation, new_version, new_size)``, both from
``GetStatus()`` and in every ``StatusUpdate`` signal. This module turns that tuple into
an ``UpdateEngineStatus`` and says what it means for the agent.

``current_operation`` is kept as the raw string, because update_engine may grow states
we do not know: an unknown string reads as ``UpdateOperation.UNKNOWN`` and never raises,
and the raw text is still there to mirror into the node's ``status`` annotation.

This module is pure: it imports no I/O library and reads no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# The D-Bus signature of GetStatus() and of the StatusUpdate signal.
STATUS_SIGNATURE = "xdssx"


class UpdateStatusError(ValueError):
    """update_engine sent a status that does not have the shape ``xdssx``."""

    kind = "bad-update-engine-status"


class UpdateOperation(enum.Enum):
    """The known values of ``current_operation``, plus ``UNKNOWN`` for anything else."""

    IDLE = "UPDATE_STATUS_IDLE"
    CHECKING_FOR_UPDATE = "UPDATE_STATUS_CHECKING_FOR_UPDATE"
    UPDATE_AVAILABLE = "UPDATE_STATUS_UPDATE_AVAILABLE"
    DOWNLOADING = "UPDATE_STATUS_DOWNLOADING"
    VERIFYING = "UPDATE_STATUS_VERIFYING"
    FINALIZING = "UPDATE_STATUS_FINALIZING"
    UPDATED_NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    REPORTING_ERROR_EVENT = "UPDATE_STATUS_REPORTING_ERROR_EVENT"
    # Any other string. The raw text stays in UpdateEngineStatus.current_operation.
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, raw: str) -> UpdateOperation:
        """The operation named by ``raw``; ``UNKNOWN`` for a string we do not know."""
        for operation in cls:
            if operation.value == raw and operation is not cls.UNKNOWN:
                return operation
        return cls.UNKNOWN


@dataclass(frozen=True)
class UpdateEngineStatus:
    """One status report of update_engine, as it came over D-Bus."""

    last_checked_time: int  # Unix seconds of the last update check, 0 if never
    progress: float  # 0.0 .. 1.0 while downloading
    current_operation: str  # raw; see ``operation`` for the typed reading
    new_version: str  # "0.0.0" when there is none
    new_size: int  # bytes

    @classmethod
    def from_dbus(cls, values: Sequence[object]) -> UpdateEngineStatus:
        """Parse the ``xdssx`` body of ``GetStatus()`` or ``StatusUpdate``.

        Raises ``UpdateStatusError`` naming the field that is wrong. An unknown
        ``current_operation`` string is not an error.
        """
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise UpdateStatusError(
                f"update_engine status must be a sequence of 5 values ({STATUS_SIGNATURE}), "
                f"got {type(values).__name__}"
            )
        if len(values) != 5:
            raise UpdateStatusError(
                f"update_engine status must have 5 values ({STATUS_SIGNATURE}), "
                f"got {len(values)}: {list(values)!r}"
            )
        last_checked_time, progress, current_operation, new_version, new_size = values
        return cls(
            last_checked_time=_int64("last_checked_time", last_checked_time),
            progress=_double("progress", progress),
            current_operation=_string("current_operation", current_operation),
            new_version=_string("new_version", new_version),
            new_size=_int64("new_size", new_size),
        )

    @property
    def operation(self) -> UpdateOperation:
        return UpdateOperation.parse(self.current_operation)

    @property
    def is_known_operation(self) -> bool:
        return self.operation is not UpdateOperation.UNKNOWN

    @property
    def reboot_needed(self) -> bool:
        """update_engine installed an update and waits for a reboot to boot into it."""
        return self.operation is UpdateOperation.UPDATED_NEED_REBOOT


def _wrong_type(field: str, expected: str, value: object) -> UpdateStatusError:
    return UpdateStatusError(
        f"update_engine status field {field!r} must be {expected}, "
        f"got {type(value).__name__} {value!r}"
    )


def _int64(field: str, value: object) -> int:
    # bool is an int subclass; a D-Bus 'x' never arrives as a bool.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(field, "an int64 (x)", value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise UpdateStatusError(
            f"update_engine status field {field!r} is out of int64 range: {value!r}"
        )
    return value


def _double(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(field, "a double (d)", value)
    return float(value)


def _string(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type(field, "a string (s)", value)
    return value
