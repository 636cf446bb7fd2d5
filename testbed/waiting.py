"""Bounded waits for tests: poll until something holds, or prove it keeps holding.

Every wait in the test suite goes through here, so none can hang and every failure names
what it was waiting for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_INTERVAL = 0.05


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = DEFAULT_INTERVAL,
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Raises TimeoutError naming `what` (and the last value seen) after `timeout` seconds.
    Exceptions from `predicate` propagate: a broken check must not look like a slow one.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        time.sleep(min(interval, remaining))


def assert_stays(
    predicate: Callable[[], object],
    duration: float,
    what: str,
    *,
    interval: float = DEFAULT_INTERVAL,
) -> None:
    """Check that `predicate` stays truthy for `duration` seconds (for "X must not happen yet").

    Raises AssertionError naming `what` as soon as it stops holding.
    """
    deadline = time.monotonic() + duration
    while True:
        value = predicate()
        if not value:
            raise AssertionError(f"expected {what} to hold for {duration:g}s (got {value!r})")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(interval, remaining))
