"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluo_host.notify import Heartbeat, Notifier, watchdog_interval, watchdog_loop
from tests.unit.virtual_time import elapsed, run

# Upper bound for any single wait for a datagram.
RECEIVE_TIMEOUT = 5.0


class NotifySocket:
    """A bound datagram socket, as systemd listens on NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(RECEIVE_TIMEOUT)

    def receive(self) -> list[str]:
        """The next datagram, as its assignments."""
        return self.sock.recv(4096).decode().split("\n")

    def assert_nothing_pending(self) -> None:
        readable, _writable, _errored = select.select([self.sock], [], [], 0)
        assert readable == [], f"unexpected datagram: {self.sock.recv(4096)!r}"


class Recorder(threading.Thread):
    """Records (monotonic arrival time, datagram) in a thread of its own, so arrival times
    stay true while the event loop under test is blocked."""

    def __init__(self, receiver: NotifySocket) -> None:
        super().__init__(daemon=True)
        self.receiver = receiver
        self.receiver.sock.settimeout(0.05)
        self.arrivals: list[tuple[float, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data = self.receiver.sock.recv(4096)
            except TimeoutError:
                continue
            self.arrivals.append((time.monotonic(), data.decode()))

    def stop(self) -> None:
        self.stopped.set()
        self.join(RECEIVE_TIMEOUT)
        assert not self.is_alive()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify"))
    yield receiver
    receiver.sock.close()


@pytest.fixture
def notifier(notify_socket: NotifySocket, tmp_path: Path) -> Iterator[Notifier]:
    sender = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    yield sender
    sender.close()


def test_ready_status_and_stopping_reach_the_socket(notify_socket, notifier):
    notifier.ready("watching update_engine")
    notifier.status("draining node n1\n(3 pods left)")
    notifier.extend_timeout(90)
    notifier.stopping()

    assert notify_socket.receive() == ["READY=1", "STATUS=watching update_engine"]
    assert notify_socket.receive() == ["STATUS=draining node n1 (3 pods left)"]
    assert notify_socket.receive() == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert notify_socket.receive() == ["STOPPING=1"]
    notify_socket.assert_nothing_pending()


def test_abstract_socket_written_with_an_at_sign_is_used():
    name = f"cluo-test-{uuid.uuid4().hex}"
    receiver = NotifySocket("\0" + name)
    sender = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        sender.ready()
        assert receiver.receive() == ["READY=1"]
    finally:
        sender.close()
        receiver.sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    sender = Notifier({})

    sender.ready("ready")
    sender.watchdog()
    sender.stopping()

    assert not sender.enabled


def test_environment_is_read_once_at_construction(notify_socket, tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    sender = Notifier(env)
    env.clear()
    try:
        sender.ready()
        assert notify_socket.receive() == ["READY=1"]
    finally:
        sender.close()


def test_a_vanished_socket_is_logged_not_raised(tmp_path, caplog):
    sender = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    try:
        sender.ready()
    finally:
        sender.close()

    (record,) = [r for r in caplog.records if r.name == "cluo_host.notify"]
    assert record.getMessage() == "sd_notify message not sent"
    assert record.NOTIFY_KEYS == "READY"
    assert "FileNotFoundError" in record.ERROR


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
    ids=["usec", "our-pid", "other-pid", "no-usec", "unset", "zero", "garbage"],
)
def test_watchdog_interval_is_half_of_watchdog_usec_when_the_watchdog_is_ours(env, interval):
    assert watchdog_interval(env) == interval


def test_watchdog_interval_compares_watchdog_pid_with_the_given_pid():
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}

    assert watchdog_interval(env, pid=4242) == 1.0
    assert watchdog_interval(env, pid=4243) is None


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(notify_socket, notifier):
    interval = 0.05
    blocked_for = 0.6
    recorder = Recorder(notify_socket)
    recorder.start()
    heartbeat = Heartbeat(interval)

    async def beating() -> None:  # a healthy agent loop: back within each wait
        loop = asyncio.get_running_loop()
        while True:
            heartbeat.beat(loop.time(), interval)
            await asyncio.sleep(interval)

    async def run_then_block_then_run() -> tuple[float, float]:
        tasks = [asyncio.create_task(beating()),
                 asyncio.create_task(watchdog_loop(notifier, heartbeat))]
        await asyncio.sleep(0.4)  # the loop runs: pings flow
        blocked_at = time.monotonic()
        # A wedged coroutine: the loop cannot run the pinger. Blocking is the point here.
        time.sleep(blocked_for)  # noqa: ASYNC251
        unblocked_at = time.monotonic()
        await asyncio.sleep(0.4)  # the loop runs again
        for task in tasks:
            task.cancel()
        return blocked_at, unblocked_at

    try:
        blocked_at, unblocked_at = asyncio.run(run_then_block_then_run())
    finally:
        recorder.stop()

    assert {data for _at, data in recorder.arrivals} == {"WATCHDOG=1"}
    arrivals = [at for at, _data in recorder.arrivals]
    # A ping sent just before blocking may be read a moment later by the recorder thread.
    grace = 0.1
    before = [at for at in arrivals if at < blocked_at]
    during = [at for at in arrivals if blocked_at + grace <= at < unblocked_at]
    after = [at for at in arrivals if at >= unblocked_at]
    assert len(before) >= 4, arrivals
    assert during == [], (blocked_at, unblocked_at, arrivals)
    assert len(after) >= 4, arrivals
    assert after[0] - unblocked_at < 0.1  # the overdue ping goes out as soon as it can


class PingTimes:
    """A notifier that records the fake time of each WATCHDOG=1."""

    def __init__(self) -> None:
        self.pings: list[float] = []

    def ready(self, status: str | None = None) -> None: ...

    def status(self, text: str) -> None: ...

    def watchdog(self) -> None:
        self.pings.append(elapsed())

    def stopping(self, status: str | None = None) -> None: ...

    def extend_timeout(self, seconds: float) -> None: ...


def test_the_watchdog_is_fed_only_while_the_loop_keeps_its_promise(caplog):
    """The loop beats "back within 5 s" every 5 s for a minute, then hangs in an await that
    promised 20 s: pings go on for that promise and one interval of grace, then stop for
    good, with one error line, although the event loop itself still runs."""
    interval = 10.0
    heartbeat = Heartbeat(interval)
    notifier = PingTimes()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pinger = asyncio.create_task(watchdog_loop(notifier, heartbeat))
        for _ in range(12):
            heartbeat.beat(loop.time(), 5.0)
            await asyncio.sleep(5.0)
        heartbeat.beat(loop.time(), 20.0)  # at t=60: an action bounded by 20 s...
        await asyncio.sleep(600)  # ...that never returns (the loop is not wedged)
        pinger.cancel()

    run(main())

    assert notifier.pings == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # 60 + 20 + 10
    [overdue] = [r for r in caplog.records if r.name == "cluo_host.notify"]
    assert overdue.getMessage() == "the agent's loop is overdue; not feeding the watchdog"
    assert overdue.OVERDUE_SECONDS == 10.0


def test_no_ping_before_the_loop_first_beats():
    heartbeat = Heartbeat(1.0)

    assert heartbeat.overdue(0.0) is not None
    heartbeat.beat(0.0, 3.0)
    assert heartbeat.overdue(4.0) is None
    assert heartbeat.overdue(4.5) == 0.5


@pytest.mark.parametrize(("seconds", "bounded"), [(None, 15.0), (600.0, 15.0), (2.0, 2.0)])
def test_an_idle_wait_lasts_one_interval_at_most(seconds, bounded):
    assert Heartbeat(15.0).bounded(seconds) == bounded
