"""sd_notify: tell systemd we are ready, what we are doing, that we are alive, that we stop.

cluo-agent is a ``Type=notify`` service with ``WatchdogSec=``. systemd passes the socket in
``NOTIFY_SOCKET`` (a path, or an abstract socket written with a leading ``@``) and the
watchdog in ``WATCHDOG_USEC`` / ``WATCHDOG_PID``. Each notification is one ``AF_UNIX``
datagram of newline-separated ``KEY=value`` assignments.

A few lines of socket code rather than the ``sdnotify`` library: it reads ``os.environ``
itself (we read an injected mapping, once, at construction) and swallows every error.
Sending never blocks the event loop (``MSG_DONTWAIT``); a failed send is logged, not raised:
a missing notification must not take the agent down (systemd's timeouts catch that).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from typing import Protocol

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"
STATUS_PREFIX = "STATUS="
EXTEND_TIMEOUT_PREFIX = "EXTEND_TIMEOUT_USEC="

log = logging.getLogger(__name__)


class ServiceNotifier(Protocol):
    """What the agent driver needs from the service manager."""

    def ready(self, status: str | None = None) -> None: ...

    def status(self, text: str) -> None: ...

    def watchdog(self) -> None: ...

    def stopping(self, status: str | None = None) -> None: ...

    def extend_timeout(self, seconds: float) -> None: ...


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``; does nothing when it is unset.

    ``env`` defaults to ``os.environ``; it is read here, once.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self._address = _socket_address(environ.get(NOTIFY_SOCKET_ENV, ""))
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def ready(self, status: str | None = None) -> None:
        """Start-up succeeded (only then: systemd starts dependent units on it)."""
        self.notify(READY, *_status_assignment(status))

    def status(self, text: str) -> None:
        """One line for ``systemctl status``; newlines are folded into spaces."""
        self.notify(*_status_assignment(text))

    def watchdog(self) -> None:
        self.notify(WATCHDOG)

    def stopping(self, status: str | None = None) -> None:
        self.notify(STOPPING, *_status_assignment(status))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the current start/stop times out."""
        self.notify(f"{EXTEND_TIMEOUT_PREFIX}{max(0, round(seconds * 1_000_000))}")

    def notify(self, *assignments: str) -> None:
        """Send ``assignments`` (``KEY=value`` each) in one datagram."""
        if self._socket is None or self._address is None or not assignments:
            return
        payload = "\n".join(assignments).encode()
        try:
            self._socket.sendto(payload, socket.MSG_DONTWAIT, self._address)
        except OSError as err:
            log.warning(
                "sd_notify message not sent",
                extra={
                    "NOTIFY_KEYS": ",".join(a.partition("=")[0] for a in assignments),
                    "ERROR": f"{type(err).__name__}: {err}",
                },
            )

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None for no watchdog.

    None when ``WATCHDOG_USEC`` is unset or invalid, or when ``WATCHDOG_PID`` names another
    process (``pid`` defaults to ours).
    """
    environ = os.environ if env is None else env
    usec_text = environ.get(WATCHDOG_USEC_ENV, "")
    if not usec_text:
        return None
    pid_text = environ.get(WATCHDOG_PID_ENV, "")
    try:
        usec = int(usec_text)
        watched_pid = int(pid_text) if pid_text else None
    except ValueError:
        log.warning(
            "watchdog environment is invalid; not pinging",
            extra={"WATCHDOG_USEC": usec_text, "WATCHDOG_PID": pid_text},
        )
        return None
    if usec <= 0:
        return None
    if watched_pid is not None and watched_pid != (os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000


class Heartbeat:
    """The agent loop's proof of progress, which ``watchdog_loop`` pings on.

    Before each await the loop beats with how long that await may take at most
    (``beat(now, within)``): an idle wait bounded by the watchdog interval, an action
    bounded by its own timeouts. The heartbeat holds until then plus one ``interval`` of
    grace; past that the loop is overdue, wedged in an await that did not end when it
    should, and the watchdog is no longer fed. Times are the caller's monotonic clock.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._due: float | None = None  # None: no beat yet

    def beat(self, now: float, within: float) -> None:
        self._due = now + within + self.interval

    def overdue(self, now: float) -> float | None:
        """Seconds past the promised return (0 before the first beat: nothing is proven
        yet), or None while the promise holds."""
        if self._due is None:
            return 0.0
        return None if now <= self._due else now - self._due

    def bounded(self, seconds: float | None) -> float:
        """``seconds`` (None: no limit) cut to one interval: the longest idle wait between
        two beats."""
        return self.interval if seconds is None else min(seconds, self.interval)


async def watchdog_loop(notifier: ServiceNotifier, heartbeat: Heartbeat) -> None:
    """Every ``heartbeat.interval`` seconds, ping the watchdog if the heartbeat holds.

    Only the loop's own beats feed it: a loop stuck in an await stops beating, and a
    blocked event loop runs no pinger either; both stop the pings and systemd restarts
    the service, which is the point. The stop is logged once, while the log still works.
    """
    loop = asyncio.get_running_loop()
    stalled = False
    while True:
        overdue = heartbeat.overdue(loop.time())
        if overdue is None:
            notifier.watchdog()
            stalled = False
        elif not stalled:
            stalled = True
            log.error("the agent's loop is overdue; not feeding the watchdog",
                      extra={"OVERDUE_SECONDS": round(overdue, 3)})
        await asyncio.sleep(heartbeat.interval)


def _socket_address(value: str) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value; None when unset or unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # e.g. "vsock:CID:PORT" (systemd 253+), which the agent on a host never gets.
    log.warning("NOTIFY_SOCKET is not a unix socket; not notifying", extra={"NOTIFY_SOCKET": value})
    return None


def _status_assignment(text: str | None) -> list[str]:
    if text is None:
        return []
    return [STATUS_PREFIX + " ".join(text.split())]
