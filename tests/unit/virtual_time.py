"""An asyncio event loop on fake time, for driving async code deterministically.

``VirtualTimeLoop.time()`` is a fake clock. When nothing is ready to run, the loop does
not sleep until its next timer: the clock jumps there. Blocking calls handed to the
default executor (``asyncio.to_thread``, ``run_in_executor(None, ...)``) run inline, in
the loop's thread, so nothing the code under test does happens outside the loop's view
and the order of events depends on fake time alone. A test of a 10-minute drain timeout
runs in milliseconds, and the same way every time.

Code that waits for something only another thread can deliver would hang such a loop:
when nothing is scheduled at all, ``select`` raises instead. So does a loop that keeps
running without ever letting fake time pass (a busy loop in the code under test).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
START = 1000.0  # the fake clock at the start
# Loop iterations at one fake instant past which the code under test is taken to spin.
SPIN_LIMIT = 100_000


class NothingScheduled(RuntimeError):
    """The loop has nothing to run and no timer: on fake time it would wait forever."""


class Spinning(RuntimeError):
    """The loop keeps running callbacks without fake time ever moving on."""


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each call at once, in the caller's thread (the loop's)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; a wait with a timeout moves the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop
        self._turns = 0  # iterations since fake time last moved

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0:
            self._turns += 1
            if self._turns > SPIN_LIMIT:
                raise Spinning(f"at t={self._loop.time() - START:g}s the loop ran "
                               f"{SPIN_LIMIT} times without letting fake time pass")
            return events
        if timeout is None:
            raise NothingScheduled(
                f"at t={self._loop.time() - START:g}s nothing is ready and no timer is set")
        self._loop.advance(timeout)
        self._turns = 0
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = START
        super().__init__(selector=_JumpingSelector(self))
        self.set_default_executor(InlineExecutor())

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh ``VirtualTimeLoop``; cancel what it left."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()


def elapsed() -> float:
    """Fake seconds since the start, in the running loop."""
    return asyncio.get_running_loop().time() - START
