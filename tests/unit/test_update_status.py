"""update_engine's xdssx status, typed."""

from __future__ import annotations

import pytest

from cluo.cycle.update_status import UpdateEngineStatus, UpdateOperation, UpdateStatusError

NEED_REBOOT = (1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "4152.2.0", 543210)


@pytest.mark.parametrize(
    ("raw", "operation"),
    [
        ("UPDATE_STATUS_IDLE", UpdateOperation.IDLE),
        ("UPDATE_STATUS_CHECKING_FOR_UPDATE", UpdateOperation.CHECKING_FOR_UPDATE),
        ("UPDATE_STATUS_UPDATE_AVAILABLE", UpdateOperation.UPDATE_AVAILABLE),
        ("UPDATE_STATUS_DOWNLOADING", UpdateOperation.DOWNLOADING),
        ("UPDATE_STATUS_VERIFYING", UpdateOperation.VERIFYING),
        ("UPDATE_STATUS_FINALIZING", UpdateOperation.FINALIZING),
        ("UPDATE_STATUS_UPDATED_NEED_REBOOT", UpdateOperation.UPDATED_NEED_REBOOT),
        ("UPDATE_STATUS_REPORTING_ERROR_EVENT", UpdateOperation.REPORTING_ERROR_EVENT),
    ],
)
def test_every_known_operation_parses(raw: str, operation: UpdateOperation) -> None:
    assert UpdateOperation.parse(raw) is operation


@pytest.mark.parametrize(
    "raw",
    ["", "UPDATE_STATUS_ATTEMPTING_ROLLBACK", "update_status_idle", "UNKNOWN", "\x00", "é"],
)
def test_unknown_operation_reads_as_unknown_and_keeps_the_raw_string(raw: str) -> None:
    status = UpdateEngineStatus.from_dbus((0, 0.0, raw, "0.0.0", 0))

    assert status.operation is UpdateOperation.UNKNOWN
    assert not status.is_known_operation
    assert status.current_operation == raw
    assert not status.reboot_needed


def test_parses_need_reboot_status_from_dbus_tuple() -> None:
    status = UpdateEngineStatus.from_dbus(NEED_REBOOT)

    assert status == UpdateEngineStatus(
        last_checked_time=1700000000,
        progress=0.0,
        current_operation="UPDATE_STATUS_UPDATED_NEED_REBOOT",
        new_version="4152.2.0",
        new_size=543210,
    )
    assert status.reboot_needed


def test_accepts_the_list_dbus_fast_returns_and_an_integral_progress() -> None:
    status = UpdateEngineStatus.from_dbus([5, 1, "UPDATE_STATUS_DOWNLOADING", "1.2.3", 9])

    assert status.progress == 1.0
    assert isinstance(status.progress, float)
    assert status.operation is UpdateOperation.DOWNLOADING


@pytest.mark.parametrize(
    "operation",
    [op for op in UpdateOperation if op is not UpdateOperation.UPDATED_NEED_REBOOT],
)
def test_only_updated_need_reboot_needs_a_reboot(operation: UpdateOperation) -> None:
    status = UpdateEngineStatus(0, 0.0, operation.value, "0.0.0", 0)

    assert not status.reboot_needed


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("xdssx", "sequence of 5 values"),
        (None, "sequence of 5 values"),
        ((1, 0.0, "UPDATE_STATUS_IDLE", "0.0.0"), "5 values"),
        ((1, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0, 0), "5 values"),
        (("1", 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0), "'last_checked_time'"),
        ((True, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0), "'last_checked_time'"),
        ((1.5, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0), "'last_checked_time'"),
        ((1, "0.5", "UPDATE_STATUS_IDLE", "0.0.0", 0), "'progress'"),
        ((1, False, "UPDATE_STATUS_IDLE", "0.0.0", 0), "'progress'"),
        ((1, 0.0, b"UPDATE_STATUS_IDLE", "0.0.0", 0), "'current_operation'"),
        ((1, 0.0, None, "0.0.0", 0), "'current_operation'"),
        ((1, 0.0, "UPDATE_STATUS_IDLE", 3, 0), "'new_version'"),
        ((1, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0.0), "'new_size'"),
        ((1, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 2**63), "'new_size' is out of int64 range"),
    ],
)
def test_malformed_status_raises_naming_what_is_wrong(values: object, message: str) -> None:
    with pytest.raises(UpdateStatusError, match=message):
        UpdateEngineStatus.from_dbus(values)  # type: ignore[arg-type]


def test_status_error_is_a_value_error_with_a_kind() -> None:
    with pytest.raises(ValueError) as caught:
        UpdateEngineStatus.from_dbus(())

    assert isinstance(caught.value, UpdateStatusError)
    assert caught.value.kind == "bad-update-engine-status"
