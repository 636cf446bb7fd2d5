"""systemd-logind on the system bus: inhibitors and the reboot itself.

Since systemd 257 a ``block`` inhibitor on ``shutdown`` makes logind refuse even root's
``Reboot``; on 256 and older root ignores it. So the driver checks
``blocking_shutdown_inhibitors()`` first, and ``reboot()`` reports a refusal or a failure as
a typed error to report and retry, never as a silent "done" (CLUO #177, FLUO #19).

This adapter never takes an inhibitor lock of its own (it never calls ``Inhibit``), so it
cannot block its own reboot.

Each operation uses its own short-lived connection: logind is asked a few times per
reboot, and a fresh connection needs no reconnect logic when the bus restarts. Calls are
plain ``Message`` objects (no introspection, typed code), each bounded by ``call_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from cluo.cycle.inhibitors import Inhibitor
from cluo.errors import CluoError, ErrorKind

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_INTERFACE = "org.freedesktop.login1.Manager"
LIST_INHIBITORS_METHOD = "ListInhibitors"
REBOOT_METHOD = "Reboot"
INHIBITORS_SIGNATURE = "a(ssssuu)"

DEFAULT_CALL_TIMEOUT = 10.0

# Errors that come from the bus rather than from logind: the request never got an answer
# from logind, so the reboot failed rather than being refused.
_DELIVERY_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.Timeout",
        "org.freedesktop.DBus.Error.TimedOut",
        "org.freedesktop.DBus.Error.NoServer",
        "org.freedesktop.DBus.Error.Spawn.ChildExited",
    }
)
_ACCESS_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.freedesktop.DBus.Error.AuthFailed",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    }
)
BLOCKED_BY_INHIBITOR_ERROR = "org.freedesktop.login1.BlockedByInhibitorLock"

log = logging.getLogger(__name__)

_T = TypeVar("_T")

__all__ = [
    "Inhibitor",
    "Logind",
    "LogindError",
    "RebootError",
    "RebootFailed",
    "RebootRefused",
    "Rebooter",
]


class LogindError(CluoError):
    """Talking to logind failed; the text says what was being done."""


class RebootError(LogindError):
    """``reboot()`` did not get logind to reboot the host."""


class RebootRefused(RebootError):
    """logind answered ``Reboot`` with a D-Bus error (an inhibitor, access denied, ...).

    ``kind`` is "forbidden" for access errors and "blocked" otherwise (refused for now).
    """

    def __init__(self, error_name: str, message: str) -> None:
        kind: ErrorKind = "forbidden" if error_name in _ACCESS_ERRORS else "blocked"
        super().__init__(f"logind refused to reboot: {error_name}: {message}", kind=kind)
        self.error_name = error_name
        self.message = message


class RebootFailed(RebootError):
    """``Reboot`` got no answer from logind: timeout, bus gone, logind not running.

    The host may still be going down (logind can stop the bus before we read the reply).
    """


class Rebooter(Protocol):
    """What the agent driver needs from logind."""

    async def list_inhibitors(self) -> list[Inhibitor]: ...

    async def blocking_shutdown_inhibitors(self) -> list[Inhibitor]: ...

    async def reboot(self) -> None: ...


class Logind:
    """logind's Manager on the system bus (or on ``bus_address``)."""

    def __init__(
        self, bus_address: str | None = None, *, call_timeout: float = DEFAULT_CALL_TIMEOUT
    ) -> None:
        self._bus_address = bus_address
        self._call_timeout = call_timeout

    async def list_inhibitors(self) -> list[Inhibitor]:
        """Every inhibitor lock logind knows. Raises ``LogindError``."""
        action = "listing logind inhibitors"
        async with self._connection(action) as bus:
            reply = await self._call(bus, _manager_call(LIST_INHIBITORS_METHOD), action)
        if reply.message_type == MessageType.ERROR:
            raise LogindError(f"{action}: {_error_text(reply)}", kind=_kind_of(reply))
        if reply.signature != INHIBITORS_SIGNATURE:
            raise LogindError(
                f"{action}: answer has signature {reply.signature!r}, "
                f"expected {INHIBITORS_SIGNATURE!r}",
                kind="invalid",
            )
        return [
            Inhibitor(what=what, who=who, why=why, mode=mode, uid=uid, pid=pid)
            for what, who, why, mode, uid, pid in reply.body[0]
        ]

    async def blocking_shutdown_inhibitors(self) -> list[Inhibitor]:
        """Inhibitors in mode "block" on "shutdown": on systemd >= 257 they make logind
        refuse ``Reboot``. Raises ``LogindError``."""
        return [inhibitor for inhibitor in await self.list_inhibitors() if inhibitor.blocks_reboot]

    async def reboot(self) -> None:
        """Ask logind to reboot now (``Reboot(false)``: not interactive, no polkit prompt).

        Returns when logind accepted; the host then goes down. Raises ``RebootRefused`` when
        logind answered with an error and ``RebootFailed`` when there was no answer.
        """
        action = "asking logind to reboot"
        log.info("asking logind to reboot")
        try:
            async with self._connection(action) as bus:
                reply = await self._call(
                    bus, _manager_call(REBOOT_METHOD, signature="b", body=[False]), action
                )
        except LogindError as err:
            raise RebootFailed(str(err), kind=err.kind) from err
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or ""
            if name in _DELIVERY_ERRORS:
                raise RebootFailed(f"{action}: {_error_text(reply)}", kind=_kind_of(reply))
            raise RebootRefused(name, _error_message(reply))

    @asynccontextmanager
    async def _connection(self, action: str) -> AsyncIterator[MessageBus]:
        bus = MessageBus(bus_address=self._bus_address, bus_type=BusType.SYSTEM)
        try:
            await self._bounded(bus.connect(), f"{action}: connecting to the system bus")
        except BaseException:
            bus.disconnect()  # a half-open socket; there is no disconnect to wait for
            raise
        try:
            yield bus
        finally:
            bus.disconnect()
            # Only the outcome matters: the connection is being thrown away.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_wait_for_disconnect(bus), self._call_timeout)

    async def _call(self, bus: MessageBus, message: Message, action: str) -> Message:
        """The reply (an ERROR reply included), or ``LogindError`` when there is none."""
        return await self._bounded(bus.call(message), action)

    async def _bounded(self, awaitable: Awaitable[_T], action: str) -> _T:
        try:
            return await asyncio.wait_for(awaitable, self._call_timeout)
        except TimeoutError as err:
            raise LogindError(
                f"{action}: no answer within {self._call_timeout:g}s", kind="timeout"
            ) from err
        except (OSError, EOFError, ValueError, RuntimeError) as err:
            # OSError: no socket / refused / reset; EOFError: the bus went away mid-call;
            # ValueError: dbus-fast's AuthError; RuntimeError: dbus-fast's InternalError.
            raise LogindError(f"{action}: {type(err).__name__}: {err}", kind="unavailable") from err


def _manager_call(member: str, *, signature: str = "", body: list[object] | None = None) -> Message:
    return Message(
        destination=LOGIND_NAME,
        path=LOGIND_PATH,
        interface=LOGIND_INTERFACE,
        member=member,
        signature=signature,
        body=body or [],
    )


def _error_message(reply: Message) -> str:
    return reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""


def _error_text(reply: Message) -> str:
    return f"{reply.error_name}: {_error_message(reply)}"


def _kind_of(reply: Message) -> ErrorKind:
    name = reply.error_name or ""
    if name in _ACCESS_ERRORS:
        return "forbidden"
    if name in {"org.freedesktop.DBus.Error.Timeout", "org.freedesktop.DBus.Error.TimedOut"}:
        return "timeout"
    if name in _DELIVERY_ERRORS:
        return "unavailable"
    return "invalid"


async def _wait_for_disconnect(bus: MessageBus) -> None:
    """``bus.wait_for_disconnect()``: returns on a clean close, raises when the bus broke.

    Shielded: it awaits the bus's own future, which a cancelled waiter would cancel too,
    and every later wait for this bus's disconnection would then raise CancelledError.
    """
    await asyncio.shield(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
