"""The test bed itself: the dbusmock templates answer a dbus-fast client like the real daemons."""

import asyncio
import os
import stat

import dbus
import pytest
from dbus_fast import DBusError

from testbed.dbus_bus import CALL_TIMEOUT, connect
from testbed.dbus_templates import logind as login1
from testbed.dbus_templates import update_engine

pytestmark = pytest.mark.dbus

STATUS_TYPES = [int, float, str, str, int]
DOWNLOADING = {
    "LastCheckedTime": dbus.Int64(1_700_000_000),
    "Progress": dbus.Double(0.25),
    "CurrentOperation": "UPDATE_STATUS_DOWNLOADING",
    "NewVersion": "4152.2.1",
    "NewSize": dbus.Int64(2**33 + 7),
}
NEED_REBOOT = (1_700_000_123, 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "4152.2.1", 2**40 + 3)


def update_engine_manager(bus):
    proxy = bus.get_proxy_object(
        update_engine.BUS_NAME, update_engine.MAIN_OBJ, update_engine.INTROSPECTION_XML
    )
    return proxy.get_interface(update_engine.MAIN_IFACE)


def logind_manager(bus):
    proxy = bus.get_proxy_object(login1.BUS_NAME, login1.MAIN_OBJ, login1.INTROSPECTION_XML)
    return proxy.get_interface(login1.MAIN_IFACE)


async def within_timeout(awaitable):
    return await asyncio.wait_for(awaitable, CALL_TIMEOUT)


def test_update_engine_starts_idle_without_a_new_version(update_engine_mock, system_bus_address):
    async def get_status():
        async with connect(system_bus_address) as bus:
            return await within_timeout(update_engine_manager(bus).call_get_status())

    status = asyncio.run(get_status())

    assert status == [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0]
    assert [type(value) for value in status] == STATUS_TYPES


@pytest.mark.parametrize("update_engine_mock", [DOWNLOADING], indirect=True)
def test_update_engine_reports_status_and_signals_each_change(
    update_engine_mock, system_bus_address
):
    async def watch_one_change():
        async with connect(system_bus_address) as bus:
            manager = update_engine_manager(bus)
            signalled = asyncio.Queue()
            manager.on_status_update(lambda *status: signalled.put_nowait(status))
            # AddMatch is not acknowledged; this round trip makes sure it is in place.
            initial = await within_timeout(manager.call_get_status())
            update_engine_mock.mock.SetStatus(*NEED_REBOOT)
            changed = await within_timeout(signalled.get())
            current = await within_timeout(manager.call_get_status())
            return initial, changed, current

    initial, changed, current = asyncio.run(watch_one_change())

    assert initial == [1_700_000_000, 0.25, "UPDATE_STATUS_DOWNLOADING", "4152.2.1", 2**33 + 7]
    assert changed == NEED_REBOOT
    assert current == list(NEED_REBOOT)
    for status in (initial, changed, current):
        assert [type(value) for value in status] == STATUS_TYPES


def test_logind_records_a_reboot_call(logind_mock, system_bus_address):
    async def reboot():
        async with connect(system_bus_address) as bus:
            await within_timeout(logind_manager(bus).call_reboot(False))

    asyncio.run(reboot())

    assert logind_mock.calls("Reboot") == [[False]]
    assert isinstance(logind_mock.calls("Reboot")[0][0], dbus.Boolean)
    assert logind_mock.calls("RebootWithFlags") == []


def test_logind_lists_added_inhibitors_and_held_inhibit_locks(logind_mock, system_bus_address):
    kubelet = ("shutdown", "kubelet", "Kubelet needs time to stop pods", "delay", 0, 4242)
    logind_mock.mock.AddInhibitor(*kubelet)
    ours = ("shutdown", "cluo-test", "holding a lock", "block", os.getuid(), os.getpid())

    async def inhibit_and_release():
        async with connect(system_bus_address, negotiate_unix_fd=True) as bus:
            manager = logind_manager(bus)
            before = await within_timeout(manager.call_list_inhibitors())
            fd = await within_timeout(manager.call_inhibit(*ours[:4]))
            try:
                is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
                held = await within_timeout(manager.call_list_inhibitors())
            finally:
                os.close(fd)
            released = await within_timeout(manager.call_list_inhibitors())
            return before, is_pipe, held, released

    before, is_pipe, held, released = asyncio.run(inhibit_and_release())

    assert before == [kubelet]
    assert is_pipe
    assert held == [kubelet, ours]
    assert released == [kubelet]


def test_logind_reboot_fails_with_the_set_error_and_is_still_recorded(
    logind_mock, system_bus_address
):
    logind_mock.mock.SetRebootError(
        login1.BLOCKED_BY_INHIBITOR_ERROR, login1.BLOCKED_BY_INHIBITOR_MESSAGE
    )

    async def reboot_refused_then_allowed():
        async with connect(system_bus_address) as bus:
            manager = logind_manager(bus)
            with pytest.raises(DBusError) as refused:
                await within_timeout(manager.call_reboot(False))
            with pytest.raises(DBusError) as refused_with_flags:
                await within_timeout(manager.call_reboot_with_flags(0))
            assert logind_mock.mock.ClearRebootError() == 2, "both refusals counted"
            await within_timeout(manager.call_reboot(False))
            return refused.value, refused_with_flags.value

    refused, refused_with_flags = asyncio.run(reboot_refused_then_allowed())

    for error in (refused, refused_with_flags):
        assert error.type == login1.BLOCKED_BY_INHIBITOR_ERROR
        assert error.text == login1.BLOCKED_BY_INHIBITOR_MESSAGE
    assert logind_mock.calls("Reboot") == [[False], [False]]
    assert logind_mock.calls("RebootWithFlags") == [[0]]
