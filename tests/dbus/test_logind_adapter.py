"""cluo_host.logind against the logind mock on the private system bus."""

from __future__ import annotations

import asyncio

import pytest

from cluo.cycle.inhibitors import Inhibitor
from cluo_host.logind import Logind, LogindError, RebootFailed, RebootRefused
from testbed.dbus_bus import CALL_TIMEOUT
from testbed.dbus_templates import logind as login1

pytestmark = pytest.mark.dbus

KUBELET_DELAY = ("shutdown", "kubelet", "Kubelet needs time to stop pods", "delay", 0, 4242)
BACKUP_BLOCK = ("shutdown:sleep", "backup", "nightly backup running", "block", 0, 777)
SLEEP_BLOCK = ("sleep:idle", "desktop", "presenting", "block", 1000, 888)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, CALL_TIMEOUT * 2))


def test_lists_every_inhibitor_typed(logind_mock, system_bus_address):
    for inhibitor in (KUBELET_DELAY, BACKUP_BLOCK, SLEEP_BLOCK):
        logind_mock.mock.AddInhibitor(*inhibitor)

    inhibitors = run(Logind(system_bus_address).list_inhibitors())

    assert inhibitors == [
        Inhibitor(*KUBELET_DELAY),
        Inhibitor(*BACKUP_BLOCK),
        Inhibitor(*SLEEP_BLOCK),
    ]


def test_only_block_inhibitors_on_shutdown_are_blocking(logind_mock, system_bus_address):
    for inhibitor in (KUBELET_DELAY, BACKUP_BLOCK, SLEEP_BLOCK):
        logind_mock.mock.AddInhibitor(*inhibitor)

    blocking = run(Logind(system_bus_address).blocking_shutdown_inhibitors())

    assert blocking == [Inhibitor(*BACKUP_BLOCK)]


def test_no_inhibitors_means_nothing_blocks(logind_mock, system_bus_address):
    assert run(Logind(system_bus_address).blocking_shutdown_inhibitors()) == []


def test_reboot_calls_reboot_false_once_and_takes_no_inhibitor(logind_mock, system_bus_address):
    run(Logind(system_bus_address).reboot())

    assert logind_mock.calls("Reboot") == [[False]]
    assert logind_mock.calls("RebootWithFlags") == []
    assert logind_mock.calls("Inhibit") == []


def test_reboot_blocked_by_an_inhibitor_raises_reboot_refused(logind_mock, system_bus_address):
    logind_mock.mock.SetRebootError(
        login1.BLOCKED_BY_INHIBITOR_ERROR, login1.BLOCKED_BY_INHIBITOR_MESSAGE
    )

    with pytest.raises(RebootRefused) as refused:
        run(Logind(system_bus_address).reboot())

    assert refused.value.error_name == login1.BLOCKED_BY_INHIBITOR_ERROR
    assert refused.value.message == login1.BLOCKED_BY_INHIBITOR_MESSAGE
    assert refused.value.kind == "blocked"
    assert logind_mock.calls("Reboot") == [[False]]


def test_reboot_access_denied_is_a_forbidden_refusal(logind_mock, system_bus_address):
    logind_mock.mock.SetRebootError("org.freedesktop.DBus.Error.AccessDenied", "no")

    with pytest.raises(RebootRefused) as refused:
        run(Logind(system_bus_address).reboot())

    assert refused.value.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert refused.value.kind == "forbidden"


def test_reboot_without_logind_on_the_bus_fails_rather_than_is_refused(system_bus_address):
    with pytest.raises(RebootFailed) as failed:
        run(Logind(system_bus_address).reboot())

    assert failed.value.kind == "unavailable"
    assert "ServiceUnknown" in str(failed.value)


def test_reboot_without_a_bus_fails(tmp_path):
    with pytest.raises(RebootFailed) as failed:
        run(Logind(f"unix:path={tmp_path / 'no-bus'}").reboot())

    assert failed.value.kind == "unavailable"


def test_listing_without_a_bus_raises_logind_error(tmp_path):
    with pytest.raises(LogindError) as failed:
        run(Logind(f"unix:path={tmp_path / 'no-bus'}").list_inhibitors())

    assert failed.value.kind == "unavailable"
