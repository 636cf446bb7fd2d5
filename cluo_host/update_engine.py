"""update_engine on the system bus: the agent's source of "an update is installed, reboot".

``UpdateEngine.connect()`` subscribes to ``StatusUpdate`` (and to owner changes of
``com.coreos.update1``), then asks ``GetStatus`` as the barrier: the AddMatch calls have been
answered, so every change after that answer reaches us as a signal and nothing falls between
the initial status and the first signal. (dbus-fast's own proxy subscription sends AddMatch
without waiting for it, which is why a signal can be lost there.) Each accepted signal then
goes to the ``on_event`` callback as ``StatusUpdated`` with a typed ``UpdateEngineStatus``.
Delivery is in order and at least once: a signal sent just before the barrier's answer is
delivered after it, so a status may repeat one already seen; the latest is the truth.

When the system bus goes away it tells the callback (``BusDisconnected``), reconnects with
exponential backoff, subscribes again, asks again, and tells it again (``BusReconnected``
with the status of that moment: signals sent in between are lost).

Security: any local user may emit a signal on the system bus, and CLUO/locksmith accept
``StatusUpdate`` from anyone, so an unprivileged user could trigger a drain and a reboot.
We accept it only

- from the current unique-name owner of ``com.coreos.update1`` (followed through
  ``NameOwnerChanged``, so an update_engine restart is followed), or
- from a connection whose unix user is root (``GetConnectionUnixUser`` == 0) that is
  still connected when asked: a root process with a bus connection of its own.

Anything else is ignored, logged with its SENDER and UID, and told to the callback
(``StatusIgnored``) so the agent can show it on the node. That includes a root sender
that disconnects right after emitting (``busctl emit``, ``locksmithctl
send-need-reboot``): the bus daemon can say nothing about a connection that is gone, so
its uid cannot be checked, and a signal whose sender is unknown is never accepted.

The check runs on the raw messages (``add_message_handler``), because dbus-fast's proxy
signal handlers do not expose the sender. Messages are checked and delivered one at a
time, in arrival order, so a status is never overtaken by an older one and owner changes
apply to the signals after them.

Calls are plain ``Message`` objects rather than proxy-object calls, so there is no
introspection at all (neither live nor embedded XML): proxy methods (``call_get_status``)
are generated at run time and invisible to the type checker, and the raw ``GetStatus``
reply names the unique name that owns ``com.coreos.update1``. Every call is bounded by
``call_timeout`` (dbus-fast has no default timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from cluo.backoff import Backoff
from cluo.cycle.update_status import STATUS_SIGNATURE, UpdateEngineStatus, UpdateStatusError
from cluo.errors import CluoError, ErrorKind

UPDATE_ENGINE_NAME = "com.coreos.update1"
UPDATE_ENGINE_PATH = "/com/coreos/update1"
UPDATE_ENGINE_INTERFACE = "com.coreos.update1.Manager"
STATUS_UPDATE_SIGNAL = "StatusUpdate"
GET_STATUS_METHOD = "GetStatus"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_INTERFACE = "org.freedesktop.DBus"
NAME_OWNER_CHANGED_SIGNAL = "NameOwnerChanged"

ROOT_UID = 0

# No sender in the rule: root connections other than update_engine must reach us too.
STATUS_UPDATE_MATCH = (
    f"type='signal',path='{UPDATE_ENGINE_PATH}',"
    f"interface='{UPDATE_ENGINE_INTERFACE}',member='{STATUS_UPDATE_SIGNAL}'"
)
OWNER_CHANGED_MATCH = (
    f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_INTERFACE}',"
    f"member='{NAME_OWNER_CHANGED_SIGNAL}',arg0='{UPDATE_ENGINE_NAME}'"
)

DEFAULT_CALL_TIMEOUT = 10.0
RECONNECT_BACKOFF = Backoff(initial=0.5, maximum=30.0)  # between reconnect attempts
# Unique names are never reused while a bus daemon runs, so a cached uid stays right;
# the bound only keeps a flood of spoofing connections from growing the cache.
UID_CACHE_SIZE = 256

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class UpdateEngineError(CluoError):
    """Talking to update_engine (or to the system bus on its behalf) failed."""


@dataclass(frozen=True)
class StatusUpdated:
    """An accepted ``StatusUpdate`` signal.

    ``from_owner`` is False when the sender was another root connection rather than
    update_engine itself.
    """

    status: UpdateEngineStatus
    sender: str
    from_owner: bool


@dataclass(frozen=True)
class StatusIgnored:
    """A ``StatusUpdate`` that was not accepted; ``reason`` says why, for an operator."""

    sender: str
    reason: str


@dataclass(frozen=True)
class BusDisconnected:
    """The system bus connection is gone; reconnecting has started. Report it."""

    reason: str


@dataclass(frozen=True)
class BusReconnected:
    """Connected, subscribed and asked again. ``status`` is current: signals sent while we
    were away are lost, so treat it as a fresh observation."""

    status: UpdateEngineStatus


UpdateEngineEvent = StatusUpdated | StatusIgnored | BusDisconnected | BusReconnected
# Why a signal was ignored (StatusIgnored.reason), in words an operator can act on.
UNIDENTIFIED_SENDER = ("its sender disconnected before it could be identified as root "
                       "(a one-shot sender such as busctl emit or locksmithctl "
                       "send-need-reboot)")
NOT_ROOT_SENDER = "its sender is neither update_engine nor root"
MALFORMED_STATUS = "it is malformed"
EventCallback = Callable[[UpdateEngineEvent], None]
Sleep = Callable[[float], Awaitable[None]]


class UpdateStatusSource(Protocol):
    """What the agent driver needs from update_engine. Events go to the callback the
    implementation was built with, in order; a status may repeat one already seen."""

    async def connect(self, bus_address: str | None = None) -> UpdateEngineStatus: ...

    async def get_status(self) -> UpdateEngineStatus: ...

    async def close(self) -> None: ...


@dataclass
class _Session:
    """One connection to the bus: its queue of relevant messages and what we know."""

    bus: MessageBus
    queue: asyncio.Queue[Message]
    connected: bool = False  # bus.connect() succeeded
    owner: str | None = None  # unique name owning com.coreos.update1
    uids: OrderedDict[str, int] = field(default_factory=OrderedDict)
    worker: asyncio.Task[None] | None = None


class UpdateEngine:
    """update_engine's status and status changes, from the system bus.

    ``on_event`` is called from the event loop with ``StatusUpdated``, ``BusDisconnected``
    and ``BusReconnected``; it must not block. ``sleep`` is used between reconnect attempts.
    """

    def __init__(
        self,
        on_event: EventCallback,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        backoff: Backoff = RECONNECT_BACKOFF,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._on_event = on_event
        self._call_timeout = call_timeout
        self._backoff = backoff
        self._sleep = sleep
        self._bus_address: str | None = None
        self._session: _Session | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def connect(self, bus_address: str | None = None) -> UpdateEngineStatus:
        """Connect (to the system bus unless ``bus_address`` is given), subscribe, and return
        update_engine's current status. From then on events go to ``on_event``, and a lost
        bus is reconnected until ``close()``.

        Raises ``UpdateEngineError`` if the bus or update_engine cannot be reached.
        """
        if self._supervisor is not None:
            raise RuntimeError("UpdateEngine.connect() called twice")
        self._bus_address = bus_address
        session, status = await self._open()
        self._session = session
        self._supervisor = asyncio.create_task(self._supervise(session))
        return status

    async def get_status(self) -> UpdateEngineStatus:
        """update_engine's current status. Raises ``UpdateEngineError``."""
        session = self._session
        if session is None:
            raise UpdateEngineError(
                "asking update_engine for its status: not connected to the system bus",
                kind="unavailable",
            )
        status, _owner = await self._get_status(session.bus)
        return status

    async def close(self) -> None:
        """Stop reconnecting and disconnect. Idempotent."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        session, self._session = self._session, None
        if session is not None:
            await self._end(session)

    # -- one connection --------------------------------------------------------------------

    async def _open(self) -> tuple[_Session, UpdateEngineStatus]:
        bus = MessageBus(bus_address=self._bus_address, bus_type=BusType.SYSTEM)
        session = _Session(bus=bus, queue=asyncio.Queue())
        try:
            await self._bounded(bus.connect(), "connecting to the system bus")
            session.connected = True
            bus.add_message_handler(_enqueue_relevant(session.queue))
            await self._call_bus_daemon(bus, "AddMatch", STATUS_UPDATE_MATCH)
            await self._call_bus_daemon(bus, "AddMatch", OWNER_CHANGED_MATCH)
            # The barrier: both rules are in place, so no change after this answer is lost.
            status, session.owner = await self._get_status(bus)
        except BaseException:
            await self._end(session)
            raise
        session.worker = asyncio.create_task(self._deliver(session))
        log.info(
            "subscribed to update_engine",
            extra={"OWNER": session.owner, "OPERATION": status.current_operation},
        )
        return session, status

    async def _end(self, session: _Session) -> None:
        if session.worker is not None:
            session.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.worker
        session.bus.disconnect()
        if not session.connected:
            return  # a half-open socket; there is no disconnect to wait for
        # Only the outcome matters here: the connection is being thrown away.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_wait_for_disconnect(session.bus), self._call_timeout)

    async def _get_status(self, bus: MessageBus) -> tuple[UpdateEngineStatus, str | None]:
        """(status, unique name of the connection that answered, i.e. the owner)."""
        action = "asking update_engine for its status"
        reply = await self._call(
            bus,
            Message(
                destination=UPDATE_ENGINE_NAME,
                path=UPDATE_ENGINE_PATH,
                interface=UPDATE_ENGINE_INTERFACE,
                member=GET_STATUS_METHOD,
            ),
            action,
        )
        if reply.signature != STATUS_SIGNATURE:
            raise UpdateEngineError(
                f"{action}: answer has signature {reply.signature!r}, "
                f"expected {STATUS_SIGNATURE!r}",
                kind="invalid",
            )
        try:
            status = UpdateEngineStatus.from_dbus(reply.body)
        except UpdateStatusError as err:
            raise UpdateEngineError(f"{action}: {err}", kind="invalid") from err
        return status, reply.sender or None

    # -- delivery --------------------------------------------------------------------------

    async def _deliver(self, session: _Session) -> None:
        """Check and deliver queued messages one at a time, in arrival order."""
        while True:
            message = await session.queue.get()
            if message.member == NAME_OWNER_CHANGED_SIGNAL:
                _name, old_owner, new_owner = message.body
                session.owner = new_owner or None
                log.info(
                    "update_engine owner changed",
                    extra={"OLD_OWNER": old_owner or None, "OWNER": session.owner},
                )
                continue
            from_owner = await self._accepts(session, message)
            if from_owner is None:
                continue
            try:
                status = UpdateEngineStatus.from_dbus(message.body)
            except UpdateStatusError as err:
                log.warning(
                    "malformed status update ignored",
                    extra={"SENDER": message.sender, "ERROR": str(err)},
                )
                self._emit(StatusIgnored(message.sender or "", f"{MALFORMED_STATUS}: {err}"))
                continue
            self._emit(StatusUpdated(status, message.sender or "", from_owner))

    async def _accepts(self, session: _Session, message: Message) -> bool | None:
        """True if the owner sent it, False if another root connection did, None to ignore."""
        sender = message.sender or ""
        if sender and sender == session.owner:
            return True
        uid = await self._unix_user(session, sender)
        if uid is None:
            self._emit(StatusIgnored(sender, UNIDENTIFIED_SENDER))
            return None
        if uid != ROOT_UID:
            log.warning(
                "status update ignored: sender is neither update_engine nor root",
                extra={"SENDER": sender, "UID": uid, "OWNER": session.owner},
            )
            self._emit(StatusIgnored(sender, f"{NOT_ROOT_SENDER} (uid {uid})"))
            return None
        log.info(
            "status update accepted from a root connection that is not update_engine",
            extra={"SENDER": sender, "UID": uid, "OWNER": session.owner},
        )
        return False

    async def _unix_user(self, session: _Session, sender: str) -> int | None:
        """The sender's uid (cached per unique name), or None when it cannot be known."""
        if sender in session.uids:
            session.uids.move_to_end(sender)
            return session.uids[sender]
        try:
            body = await self._call_bus_daemon(session.bus, "GetConnectionUnixUser", sender)
        except UpdateEngineError as err:
            # Typically the sender has already disconnected: we cannot tell who it was.
            log.warning(
                "status update ignored: sender could not be identified",
                extra={"SENDER": sender, "ERROR": str(err)},
            )
            return None
        uid = body[0]
        if isinstance(uid, bool) or not isinstance(uid, int):
            log.warning(
                "status update ignored: sender could not be identified",
                extra={"SENDER": sender, "ERROR": f"unexpected uid {uid!r}"},
            )
            return None
        session.uids[sender] = uid
        if len(session.uids) > UID_CACHE_SIZE:
            session.uids.popitem(last=False)
        return uid

    def _emit(self, event: UpdateEngineEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("update_engine event handler failed")

    # -- reconnecting ----------------------------------------------------------------------

    async def _supervise(self, session: _Session) -> None:
        while True:
            reason = await _disconnect_reason(session.bus)
            self._session = None
            await self._end(session)
            log.warning("system bus connection lost", extra={"REASON": reason})
            self._emit(BusDisconnected(reason))
            session, status = await self._reopen()
            self._session = session
            log.info("reconnected to update_engine", extra={"OWNER": session.owner})
            self._emit(BusReconnected(status))

    async def _reopen(self) -> tuple[_Session, UpdateEngineStatus]:
        """Connect again, waiting ``backoff.delay(attempt)`` before each attempt."""
        for attempt in itertools.count(1):
            await self._sleep(self._backoff.delay(attempt))
            try:
                return await self._open()
            except UpdateEngineError as err:
                log.warning(
                    "reconnecting to update_engine failed",
                    extra={"ATTEMPT": attempt, "ERROR": str(err), "ERROR_KIND": err.kind},
                )
        raise AssertionError("itertools.count() is endless")  # pragma: no cover

    # -- calls -----------------------------------------------------------------------------

    async def _call_bus_daemon(self, bus: MessageBus, member: str, arg: str) -> list[object]:
        message = Message(
            destination=DBUS_NAME,
            path=DBUS_PATH,
            interface=DBUS_INTERFACE,
            member=member,
            signature="s",
            body=[arg],
        )
        reply = await self._call(bus, message, f"calling {DBUS_INTERFACE}.{member}")
        return list(reply.body)

    async def _call(self, bus: MessageBus, message: Message, action: str) -> Message:
        """Send a method call; its reply, or ``UpdateEngineError`` saying what failed."""
        reply = await self._bounded(bus.call(message), action)
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise UpdateEngineError(
                f"{action}: {reply.error_name}: {text}", kind=_kind_of(reply.error_name or "")
            )
        return reply

    async def _bounded(self, awaitable: Awaitable[_T], action: str) -> _T:
        try:
            return await asyncio.wait_for(awaitable, self._call_timeout)
        except TimeoutError as err:
            raise UpdateEngineError(
                f"{action}: no answer within {self._call_timeout:g}s", kind="timeout"
            ) from err
        except (OSError, EOFError, ValueError, RuntimeError) as err:
            # OSError: no socket / refused / reset; EOFError: the bus went away mid-call;
            # ValueError: dbus-fast's AuthError; RuntimeError: dbus-fast's InternalError.
            raise UpdateEngineError(
                f"{action}: {type(err).__name__}: {err}", kind="unavailable"
            ) from err


def _enqueue_relevant(queue: asyncio.Queue[Message]) -> Callable[[Message], None]:
    """A raw message handler that queues StatusUpdate signals and owner changes."""

    def handler(message: Message) -> None:
        if _is_status_update(message) or _is_owner_change(message):
            queue.put_nowait(message)

    return handler


def _is_status_update(message: Message) -> bool:
    return (
        message.message_type == MessageType.SIGNAL
        and message.path == UPDATE_ENGINE_PATH
        and message.interface == UPDATE_ENGINE_INTERFACE
        and message.member == STATUS_UPDATE_SIGNAL
    )


def _is_owner_change(message: Message) -> bool:
    return (
        message.message_type == MessageType.SIGNAL
        # Only the bus daemon can send as org.freedesktop.DBus.
        and message.sender == DBUS_NAME
        and message.path == DBUS_PATH
        and message.interface == DBUS_INTERFACE
        and message.member == NAME_OWNER_CHANGED_SIGNAL
        and message.signature == "sss"
        and message.body[0] == UPDATE_ENGINE_NAME
    )


async def _wait_for_disconnect(bus: MessageBus) -> None:
    """``bus.wait_for_disconnect()``: returns on a clean close, raises when the bus broke.

    Shielded: it awaits the bus's own future, which a cancelled waiter would cancel too,
    and every later wait for this bus's disconnection would then raise CancelledError.
    """
    await asyncio.shield(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]


async def _disconnect_reason(bus: MessageBus) -> str:
    """Wait until ``bus`` disconnects (for as long as it lives) and say why."""
    try:
        await _wait_for_disconnect(bus)
    except Exception as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return "connection closed"


_ACCESS_ERRORS = frozenset(
    {"org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.AuthFailed"}
)
_GONE_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.Spawn.ChildExited",
    }
)


def _kind_of(error_name: str) -> ErrorKind:
    if error_name in _ACCESS_ERRORS:
        return "forbidden"
    if error_name in _GONE_ERRORS:
        return "unavailable"
    if error_name in {"org.freedesktop.DBus.Error.Timeout", "org.freedesktop.DBus.Error.TimedOut"}:
        return "timeout"
    return "invalid"
