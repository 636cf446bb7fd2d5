"""dbusmock services on a system bus, for tests/dbus (private bus) and tests/e2e (real bus).

The templates live in testbed/dbus_templates/. On the private bus started by dbusmock's
`dbusmock_system` fixture (which exports DBUS_SYSTEM_BUS_ADDRESS), `spawn_mock` runs one in
its own process; `mock_command` gives the argv to run one as a service of its own, e.g. as
ExecStart= of a systemd unit on a real system bus. `SystemBusDaemon` is a private system
bus of its own that a test can restart at the same address.
"""

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import dbus
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbusmock import MOCK_IFACE, SpawnedMock
from dbusmock import BusType as MockBusType
from dbusmock.mockobject import load_module

TEMPLATES_DIR = Path(__file__).parent / "dbus_templates"
UPDATE_ENGINE_TEMPLATE = TEMPLATES_DIR / "update_engine.py"
LOGIND_TEMPLATE = TEMPLATES_DIR / "logind.py"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"

# Upper bound, in seconds, for any single bus call or awaited signal in the tests.
CALL_TIMEOUT = 5.0


class MockService:
    """A dbusmock template running in its own process on the system bus at `address`.

    `obj` is the dbus-python proxy of the template's main object (call its methods with
    dbus_interface=...); `mock` is the same object on the dbusmock control interface
    (SetStatus, AddInhibitor, GetMethodCalls, ...). Everything the mock logs goes to log_path.
    """

    def __init__(
        self, spawned: SpawnedMock, obj: Any, bus_name: str, address: str, log_path: Path
    ) -> None:
        self.spawned = spawned
        self.obj = obj
        self.bus_name = bus_name
        self.address = address
        self.log_path = log_path

    @property
    def mock(self) -> dbus.Interface:
        return dbus.Interface(self.obj, dbus_interface=MOCK_IFACE)

    def calls(self, method: str) -> list[list[Any]]:
        """Arguments of every recorded call of `method`, oldest first."""
        return [list(args) for _timestamp, args in self.mock.GetMethodCalls(method)]

    def stop(self) -> None:
        """End the mock process and wait until the bus has released its name."""
        self.spawned.terminate()
        asyncio.run(wait_until_name_released(self.address, self.bus_name))

    def __enter__(self) -> "MockService":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class SystemBusDaemon:
    """A private system bus's dbus-daemon at a fixed socket in `folder`, which can be
    stopped and started again at the same address, as a restarted system bus is.

    The policy lets anyone own any name and send anything, as dbusmock's private bus does.
    """

    def __init__(self, folder: Path) -> None:
        self.socket = folder / "system_bus_socket"
        self._config = folder / "system-bus.conf"
        self._config.write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            f"<busconfig><type>system</type><keep_umask/><listen>unix:path={self.socket}</listen>"
            '<policy context="default"><allow send_destination="*" eavesdrop="true"/>'
            '<allow eavesdrop="true"/><allow own="*"/></policy></busconfig>\n'
        )
        self._daemon: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> None:
        """Start dbus-daemon and return once it listens (it prints its pid then)."""
        self._daemon = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self._config}", "--print-pid=1"],
            stdout=subprocess.PIPE,
        )
        assert self._daemon.stdout is not None
        pid = self._daemon.stdout.readline().strip()
        self._daemon.stdout.close()
        if not pid or int(pid) != self._daemon.pid or not self.socket.exists():
            raise RuntimeError(f"dbus-daemon did not start on {self.socket}")
        self.starts += 1

    def stop(self) -> None:
        """SIGTERM (then SIGKILL): every connection to the bus is cut."""
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.terminate()
            try:
                self._daemon.wait(CALL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._daemon.kill()
                self._daemon.wait(CALL_TIMEOUT)
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> "SystemBusDaemon":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def spawn_mock(template: Path, parameters: dict[str, Any] | None, log_path: Path) -> MockService:
    """Start `template` on the private system bus and wait until it answers.

    The bus is the one in DBUS_SYSTEM_BUS_ADDRESS (set by `dbusmock_system`); refusing to run
    without it keeps mocks off the host's real system bus.
    Parameters travel as a{sv}: a plain int becomes int32, so pass dbus.Int64 for big ones.
    """
    _variable, address = MockBusType.SYSTEM.environ
    if not address:
        raise RuntimeError("DBUS_SYSTEM_BUS_ADDRESS is not set: start a private bus first")
    module = load_module(str(template))
    with log_path.open("ab") as log:
        # The child keeps its own copy of the log fd. Not a pipe: a chatty mock would fill it
        # and block.
        spawned = SpawnedMock.spawn_with_template(
            str(template),
            parameters,
            MockBusType.SYSTEM,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    # spawned.obj was introspected before the template was loaded, so it does not know the
    # template's signatures (a plain int would be sent as int32); this proxy does.
    obj = MockBusType.SYSTEM.get_connection().get_object(module.BUS_NAME, module.MAIN_OBJ)
    return MockService(spawned, obj, module.BUS_NAME, address, log_path)


def mock_command(
    template: Path, parameters: dict[str, Any] | None = None, python: str = sys.executable
) -> list[str]:
    """argv that runs `template` on the system bus (DBUS_SYSTEM_BUS_ADDRESS or the default)."""
    argv = [python, "-m", "dbusmock", "--system", "--template", str(template)]
    if parameters:
        argv += ["--parameters", json.dumps(parameters)]
    return argv


@asynccontextmanager
async def connect(address: str, *, negotiate_unix_fd: bool = False) -> AsyncIterator[MessageBus]:
    """A dbus-fast connection to the system bus at `address`, closed on exit."""
    bus = MessageBus(
        bus_address=address, bus_type=BusType.SYSTEM, negotiate_unix_fd=negotiate_unix_fd
    )
    await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
    try:
        yield bus
    finally:
        bus.disconnect()
        await asyncio.wait_for(bus.wait_for_disconnect(), CALL_TIMEOUT)


async def wait_until_name_released(address: str, name: str) -> None:
    """Return once `name` has no owner on the bus at `address`."""
    async with connect(address) as bus:
        released = asyncio.Event()

        def on_message(msg: Message) -> None:
            if msg.member == "NameOwnerChanged" and msg.body[0] == name and not msg.body[2]:
                released.set()

        bus.add_message_handler(on_message)
        rule = f"type='signal',sender='{DBUS_NAME}',member='NameOwnerChanged',arg0='{name}'"
        await _call_bus_daemon(bus, "AddMatch", rule)
        # AddMatch has been processed, so a release after this answer will be delivered.
        if (await _call_bus_daemon(bus, "NameHasOwner", name))[0]:
            await asyncio.wait_for(released.wait(), CALL_TIMEOUT)


async def _call_bus_daemon(bus: MessageBus, member: str, arg: str) -> list[Any]:
    request = Message(
        destination=DBUS_NAME,
        path=DBUS_PATH,
        interface=DBUS_IFACE,
        member=member,
        signature="s",
        body=[arg],
    )
    reply = await asyncio.wait_for(bus.call(request), CALL_TIMEOUT)
    if reply is None or reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"bus daemon refused {member}: {reply and reply.body}")
    return list(reply.body)
