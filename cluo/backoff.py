"""How long to wait before trying again: an exponential backoff, capped, jitter optional.

One ``Backoff`` serves every retry in both programs: the agent's decisions and node reads,
update_engine's reconnects, the watches' "watch again after an error" and the
coordinator's reconcile errors. It is pure: the caller counts the failures in a row
(and starts again at zero after a success), asks ``delay(failures)`` and waits the way
it waits (an event, the event loop). Jitter, which keeps many processes that failed
together from retrying together, is a function the caller injects (``spread``), so the
delays stay reproducible in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "Jitter", "spread"]

Jitter = Callable[[float], float]  # a delay -> the delay to wait instead


def spread(fraction: float, uniform: Callable[[float, float], float]) -> Jitter:
    """Jitter that scales each delay by a factor drawn from ``uniform(1 - fraction,
    1 + fraction)`` (e.g. ``random.uniform``)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"a jitter fraction is in [0, 1), not {fraction!r}")
    return lambda delay: delay * uniform(1 - fraction, 1 + fraction)


@dataclass(frozen=True)
class Backoff:
    """Delays after 1, 2, 3, ... failures in a row: ``initial``, ``initial * factor``, ...
    capped at ``maximum``; then ``jitter``, if given, moves each one."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: Jitter | None = None

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("a backoff needs 0 < initial <= maximum")
        if self.factor < 1:
            raise ValueError("a backoff's factor is at least 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (fewer than 1 counts as 1)."""
        delay = self.initial
        for _ in range(failures - 1):
            if delay >= self.maximum or self.factor == 1:
                break
            delay *= self.factor
        delay = min(delay, self.maximum)
        return self.jitter(delay) if self.jitter is not None else delay
