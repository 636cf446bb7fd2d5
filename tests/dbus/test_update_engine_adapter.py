"""cluo_host.update_engine against the update_engine mock, on a system bus.

The plain cases use the shared private bus (`system_bus_address`, `update_engine_mock`).
The others need a bus of their own, `system_like_bus`: dbusmock's private bus only lets
the user who started it connect (dbus-daemon's default without an `<allow user>` rule),
and it cannot be restarted. Ours has a policy like Debian's system.conf: anyone may
connect and emit signals, only root may own names or call services. That is exactly what
makes a spoofed StatusUpdate possible on a real host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbus
import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from cluo.cycle.update_status import UpdateEngineStatus, UpdateOperation
from cluo_host.update_engine import (
    DBUS_NAME,
    DBUS_PATH,
    UNIDENTIFIED_SENDER,
    Backoff,
    BusDisconnected,
    BusReconnected,
    StatusIgnored,
    StatusUpdated,
    UpdateEngine,
    UpdateEngineError,
    UpdateEngineEvent,
)
from testbed.dbus_bus import (
    CALL_TIMEOUT,
    UPDATE_ENGINE_TEMPLATE,
    MockService,
    connect,
    spawn_mock,
)
from testbed.dbus_templates import update_engine as update1
from testbed.waiting import wait_for

pytestmark = pytest.mark.dbus

NOBODY = 65534
ADAPTER_LOGGER = "cluo_host.update_engine"
IGNORED_NOT_ROOT = "status update ignored: sender is neither update_engine nor root"

DOWNLOADING = (1_700_000_000, 0.25, "UPDATE_STATUS_DOWNLOADING", "4152.2.1", 2**33 + 7)
NEED_REBOOT = (1_700_000_123, 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "4152.2.1", 2**33 + 7)
CHECKING = (1_700_000_200, 0.0, "UPDATE_STATUS_CHECKING_FOR_UPDATE", "0.0.0", 0)
SPOOFED = (1_700_000_300, 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "6666.6.6", 1)


def as_parameters(status: tuple[int, float, str, str, int]) -> dict[str, Any]:
    """Template parameters that make the mock start with `status`."""
    last_checked_time, progress, operation, version, size = status
    return {
        "LastCheckedTime": dbus.Int64(last_checked_time),
        "Progress": dbus.Double(progress),
        "CurrentOperation": operation,
        "NewVersion": version,
        "NewSize": dbus.Int64(size),
    }


def typed(status: tuple[int, float, str, str, int]) -> UpdateEngineStatus:
    return UpdateEngineStatus.from_dbus(status)


class Events:
    """Collects the adapter's events; every wait is bounded."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[UpdateEngineEvent] = asyncio.Queue()

    def __call__(self, event: UpdateEngineEvent) -> None:
        self.queue.put_nowait(event)

    async def next(self) -> UpdateEngineEvent:
        return await asyncio.wait_for(self.queue.get(), CALL_TIMEOUT)

    async def next_status(self) -> StatusUpdated:
        event = await self.next()
        assert isinstance(event, StatusUpdated), event
        return event

    async def next_status_skipping(
        self, expected: UpdateEngineStatus, repeated: UpdateEngineStatus
    ) -> StatusUpdated:
        """The next status event that is `expected`, allowing repeats of `repeated` first
        (a signal sent just before a (re)subscription's barrier is delivered after it)."""
        while True:
            event = await self.next_status()
            if event.status == expected:
                return event
            assert event.status == repeated, event


@dataclass
class FastBackoff:
    """An injected sleep that records the delays it was asked for and waits only briefly."""

    delays: list[float]
    attempts: asyncio.Event

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= 3:
            self.attempts.set()
        await asyncio.sleep(0.02)


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario, CALL_TIMEOUT * 6))


# -- a system-like bus of our own ------------------------------------------------------------

SYSTEM_LIKE_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
    <allow send_destination="*"/>
  </policy>
</busconfig>
"""


class SystemLikeBus:
    """A dbus-daemon with a system-like policy, that can be stopped and started again on the
    same address. Its directory is world-traversable so an unprivileged process can connect.
    """

    def __init__(self, directory: Path, log_path: Path) -> None:
        self.socket = directory / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self.config = directory / "system-like.conf"
        self.config.write_text(SYSTEM_LIKE_CONFIG.format(socket=self.socket))
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["dbus-daemon", "--nofork", f"--config-file={self.config}", "--print-address=1"],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        # The address is printed once the daemon listens.
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(CALL_TIMEOUT):
                raise TimeoutError("dbus-daemon did not print its address")
        printed = self.process.stdout.readline().decode()
        assert printed.startswith(self.address), printed

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(CALL_TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process = None


@pytest.fixture
def system_like_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SystemLikeBus]:
    # Not under tmp_path: pytest makes that 0700, and the unprivileged spoofer must get in.
    directory = Path(tempfile.mkdtemp(prefix="cluo-bus-"))
    directory.chmod(0o755)
    bus = SystemLikeBus(directory, tmp_path / "dbus-daemon.log")
    bus.start()
    # spawn_mock (and the mocks it starts) use the bus named here.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    try:
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def mocks(system_like_bus: SystemLikeBus, tmp_path: Path) -> Iterator[list[MockService]]:
    """update_engine mocks started on `system_like_bus` during a test, stopped after it."""
    started: list[MockService] = []
    yield started
    # The bus goes away with the test, so there is no name release to wait for.
    for mock in started:
        mock.spawned.terminate()


def start_update_engine(
    mocks: list[MockService], tmp_path: Path, status: tuple[int, float, str, str, int]
) -> MockService:
    mock = spawn_mock(
        UPDATE_ENGINE_TEMPLATE, as_parameters(status), tmp_path / f"update-engine-{len(mocks)}.log"
    )
    mocks.append(mock)
    return mock


# -- spoofing --------------------------------------------------------------------------------

# Emits a StatusUpdate on update_engine's path and interface, waits until the bus has routed
# it (a round trip on the same connection), prints its unique name, and stays connected until
# its stdin closes, so the agent can still ask the bus who it is.
SPOOFER = """
import asyncio, select, sys
from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

async def main(address, status):
    bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
    await asyncio.wait_for(bus.connect(), 5)
    signal = Message.new_signal(
        "/com/coreos/update1", "com.coreos.update1.Manager", "StatusUpdate", "xdssx", status
    )
    await asyncio.wait_for(bus.send(signal), 5)
    ping = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus", member="GetId")
    await asyncio.wait_for(bus.call(ping), 5)
    print(bus.unique_name, flush=True)
    select.select([sys.stdin], [], [], 30)

asyncio.run(main(sys.argv[1], [int(sys.argv[2]), float(sys.argv[3]), sys.argv[4],
                               sys.argv[5], int(sys.argv[6])]))
"""


class UnprivilegedSpoofer:
    """SPOOFER in a process running as `nobody`."""

    def __init__(self, address: str, status: tuple[int, float, str, str, int]) -> None:
        self.argv = [
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-c", SPOOFER, address, *map(str, status),
        ]  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None

    async def emit(self) -> str:
        """Emit the signal; the spoofer's unique name once the bus has routed it."""
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), CALL_TIMEOUT)
        assert line.startswith(b":"), f"spoofer failed, exit status {self.process.returncode}"
        return line.decode().strip()

    async def leave(self) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        await asyncio.wait_for(self.process.wait(), CALL_TIMEOUT)


async def emit_status(bus: MessageBus, status: tuple[int, float, str, str, int]) -> None:
    """Emit a StatusUpdate on update_engine's path and interface from `bus`."""
    signal = Message.new_signal(
        update1.MAIN_OBJ,
        update1.MAIN_IFACE,
        update1.STATUS_SIGNAL,
        update1.STATUS_SIGNATURE,
        list(status),
    )
    await asyncio.wait_for(bus.send(signal), CALL_TIMEOUT)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs a root connection")
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running the spoofer as nobody needs root and setpriv",
)


# -- on the shared private bus ---------------------------------------------------------------


@pytest.mark.parametrize("update_engine_mock", [as_parameters(DOWNLOADING)], indirect=True)
def test_connect_returns_the_current_status_and_changes_arrive_typed(
    update_engine_mock, system_bus_address
):
    async def scenario():
        events = Events()
        engine = UpdateEngine(events)
        try:
            initial = await engine.connect(system_bus_address)
            update_engine_mock.mock.SetStatus(*NEED_REBOOT)
            changed = await events.next_status()
            current = await engine.get_status()
        finally:
            await engine.close()
        return initial, changed, current

    initial, changed, current = run(scenario())

    assert initial == typed(DOWNLOADING)
    assert initial.operation is UpdateOperation.DOWNLOADING
    assert changed.status == typed(NEED_REBOOT)
    assert changed.status.reboot_needed
    assert changed.from_owner
    assert current == typed(NEED_REBOOT)


def test_an_unknown_operation_arrives_as_unknown(update_engine_mock, system_bus_address):
    future = (1_700_000_400, 0.5, "UPDATE_STATUS_TIME_TRAVELLING", "9999.0.0", 42)

    async def scenario():
        events = Events()
        engine = UpdateEngine(events)
        try:
            await engine.connect(system_bus_address)
            update_engine_mock.mock.SetStatus(*future)
            return await events.next_status()
        finally:
            await engine.close()

    changed = run(scenario())

    assert changed.status.operation is UpdateOperation.UNKNOWN
    assert changed.status.current_operation == "UPDATE_STATUS_TIME_TRAVELLING"


def test_connect_without_update_engine_raises(system_bus_address):
    async def scenario():
        engine = UpdateEngine(Events())
        try:
            await engine.connect(system_bus_address)
        finally:
            await engine.close()

    with pytest.raises(UpdateEngineError) as failed:
        run(scenario())

    assert failed.value.kind == "unavailable"
    assert "ServiceUnknown" in str(failed.value)


# -- on a system-like bus of our own ---------------------------------------------------------


@needs_setpriv
def test_a_status_update_spoofed_by_an_unprivileged_user_is_ignored(
    system_like_bus, mocks, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger=ADAPTER_LOGGER)
    update_engine = start_update_engine(mocks, tmp_path, DOWNLOADING)

    async def scenario():
        events = Events()
        engine = UpdateEngine(events)
        spoofer = UnprivilegedSpoofer(system_like_bus.address, SPOOFED)
        try:
            await engine.connect(system_like_bus.address)
            try:
                spoofer_name = await spoofer.emit()
                # Delivery is in arrival order: the spoof is judged before this arrives.
                update_engine.mock.SetStatus(*CHECKING)
                ignored = await events.next()
                changed = await events.next_status()
            finally:
                await spoofer.leave()
            current = await engine.get_status()
        finally:
            await engine.close()
        return spoofer_name, ignored, changed, current, events

    spoofer_name, ignored, changed, current, events = run(scenario())

    assert ignored == StatusIgnored(
        spoofer_name, f"its sender is neither update_engine nor root (uid {NOBODY})")
    assert changed.status == typed(CHECKING)
    assert current == typed(CHECKING)
    assert events.queue.empty()
    (ignored,) = [r for r in caplog.records if r.getMessage() == IGNORED_NOT_ROOT]
    assert ignored.levelno == logging.WARNING
    assert spoofer_name == ignored.SENDER
    assert ignored.UID == NOBODY


@needs_root
def test_a_root_connection_that_is_not_update_engine_is_accepted(system_like_bus, mocks, tmp_path):
    """A root process with a bus connection of its own emits the signal and stays
    connected until the agent has asked the bus who it is."""
    start_update_engine(mocks, tmp_path, DOWNLOADING)

    async def scenario():
        events = Events()
        engine = UpdateEngine(events)
        try:
            await engine.connect(system_like_bus.address)
            async with connect(system_like_bus.address) as root_bus:
                await emit_status(root_bus, NEED_REBOOT)
                received = await events.next_status()
                return received, root_bus.unique_name
        finally:
            await engine.close()

    received, root_name = run(scenario())

    assert received.status == typed(NEED_REBOOT)
    assert received.sender == root_name
    assert not received.from_owner


def unique_names(bus: dbus.bus.BusConnection) -> set[str]:
    names = bus.call_blocking(DBUS_NAME, DBUS_PATH, DBUS_NAME, "ListNames", "", ())
    return {str(name) for name in names if str(name).startswith(":")}


@needs_root
@pytest.mark.skipif(shutil.which("busctl") is None, reason="needs busctl")
def test_a_one_shot_root_sender_is_ignored_and_said_so(system_like_bus, mocks, tmp_path, caplog):
    """`busctl emit` as root (and `locksmithctl send-need-reboot` alike): connect, emit,
    disconnect. The bus cannot say who a connection that is gone was, so the signal is not
    accepted, and the adapter says so (the agent shows it on the node)."""
    caplog.set_level(logging.INFO, logger=ADAPTER_LOGGER)
    start_update_engine(mocks, tmp_path, DOWNLOADING)
    address = system_like_bus.address
    watcher = dbus.bus.BusConnection(address)

    async def scenario():
        events = Events()
        engine = UpdateEngine(events)
        try:
            await engine.connect(address)
            before = unique_names(watcher)
            # The event loop is held (blocking calls) until busctl is gone from the bus, so
            # the adapter reads the signal only after its sender disconnected: the race a
            # one-shot sender always loses on a real host, made certain.
            subprocess.run(  # noqa: ASYNC221
                ["busctl", f"--address={address}", "emit", update1.MAIN_OBJ,
                 update1.MAIN_IFACE, update1.STATUS_SIGNAL, update1.STATUS_SIGNATURE,
                 *map(str, NEED_REBOOT)],
                check=True, timeout=CALL_TIMEOUT)
            wait_for(lambda: unique_names(watcher) <= before, CALL_TIMEOUT,
                     "busctl's connection to be gone from the bus")
            ignored = await events.next()
            current = await engine.get_status()
        finally:
            await engine.close()
        return ignored, current, events

    try:
        ignored, current, events = run(scenario())
    finally:
        watcher.close()

    assert isinstance(ignored, StatusIgnored), ignored
    assert ignored.reason == UNIDENTIFIED_SENDER
    assert "disconnected before it could be identified as root" in ignored.reason
    assert current == typed(DOWNLOADING)
    assert events.queue.empty(), "nothing accepted"
    (logged,) = [r for r in caplog.records
                 if r.getMessage() == "status update ignored: sender could not be identified"]
    assert ignored.sender == logged.SENDER


def test_an_update_engine_restart_is_followed(system_like_bus, mocks, tmp_path):
    first = start_update_engine(mocks, tmp_path, DOWNLOADING)

    async def scenario():
        events = Events()
        engine = UpdateEngine(events)
        try:
            await engine.connect(system_like_bus.address)
            first.mock.SetStatus(*CHECKING)
            from_first = await events.next_status()
            await asyncio.wait_for(asyncio.to_thread(first.stop), CALL_TIMEOUT)
            second = await asyncio.wait_for(
                asyncio.to_thread(start_update_engine, mocks, tmp_path, NEED_REBOOT),
                CALL_TIMEOUT,
            )
            # Like the daemon, the new mock announces its status when it starts.
            announced = await events.next_status()
            second.mock.SetStatus(*DOWNLOADING)
            changed = await events.next_status()
            connected = engine.connected
        finally:
            await engine.close()
        return from_first, announced, changed, connected

    from_first, announced, changed, connected = run(scenario())

    assert from_first.from_owner
    assert connected
    # Accepted as update_engine's, not merely as a root connection's: the owner was followed.
    for event in (announced, changed):
        assert event.from_owner
        assert event.sender != from_first.sender
    assert announced.status == typed(NEED_REBOOT)
    assert changed.status == typed(DOWNLOADING)


def test_the_bus_going_away_and_coming_back_is_reported_and_followed(
    system_like_bus, mocks, tmp_path
):
    first = start_update_engine(mocks, tmp_path, DOWNLOADING)
    backoff = Backoff(initial=0.05, maximum=0.2, factor=2.0)

    async def scenario():
        events = Events()
        sleep = FastBackoff(delays=[], attempts=asyncio.Event())
        engine = UpdateEngine(events, backoff=backoff, sleep=sleep)
        try:
            await engine.connect(system_like_bus.address)
            await asyncio.wait_for(asyncio.to_thread(first.stop), CALL_TIMEOUT)
            await asyncio.wait_for(asyncio.to_thread(system_like_bus.stop), CALL_TIMEOUT)
            lost = await events.next()
            with pytest.raises(UpdateEngineError) as while_lost:
                await engine.get_status()
            # Let a few attempts fail against the missing bus before it comes back.
            await asyncio.wait_for(sleep.attempts.wait(), CALL_TIMEOUT)
            await asyncio.wait_for(asyncio.to_thread(system_like_bus.start), CALL_TIMEOUT)
            second = await asyncio.wait_for(
                asyncio.to_thread(start_update_engine, mocks, tmp_path, NEED_REBOOT),
                CALL_TIMEOUT,
            )
            back = await events.next()
            # Subscribed again: a change on the new bus arrives.
            second.mock.SetStatus(*CHECKING)
            changed = await events.next_status_skipping(typed(CHECKING), typed(NEED_REBOOT))
        finally:
            await engine.close()
        return lost, while_lost.value, back, changed, sleep.delays

    lost, while_lost, back, changed, delays = run(scenario())

    assert isinstance(lost, BusDisconnected)
    assert while_lost.kind == "unavailable"
    assert isinstance(back, BusReconnected)
    assert back.status == typed(NEED_REBOOT)
    assert changed.from_owner
    assert delays[:3] == [0.05, 0.1, 0.2]
    assert max(delays) == 0.2
