"""The cycle's settings: the decision core's (``AgentConfig``) and the drain's
(``DrainTuning``).

In a module of their own so that reading the settings does not load the core and the
drain: cluo-agent reads its settings before ``READY=1`` and imports the rest after it
(docs/agent.md, Footprint).

This module is pure: it imports no I/O library and reads no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DrainTimeoutPolicy(enum.Enum):
    ABORT = "abort"  # uncordon if we cordoned, hand the grant back, retry later
    FORCE = "force"  # delete the remaining pods ignoring PodDisruptionBudgets


@dataclass(frozen=True)
class AgentConfig:
    drain_timeout: float = 600.0  # seconds for the whole drain
    drain_timeout_policy: DrainTimeoutPolicy = DrainTimeoutPolicy.ABORT
    drain_pods_without_controller: bool = False
    reboot_retry_base: float = 10.0  # seconds before the 2nd attempt, doubling after
    reboot_retry_max: float = 600.0
    # After logind accepted Reboot(false), how long the host may stay up before the
    # attempt counts as failed.
    reboot_timeout: float = 300.0

    def __post_init__(self) -> None:
        for name in ("drain_timeout", "reboot_retry_base", "reboot_retry_max", "reboot_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.reboot_retry_max < self.reboot_retry_base:
            raise ValueError("reboot_retry_max must not be below reboot_retry_base")

    def reboot_backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1, 2, ...)."""
        exponent = min(max(failures - 1, 0), 30)
        return float(min(self.reboot_retry_base * 2**exponent, self.reboot_retry_max))


@dataclass(frozen=True)
class DrainTuning:
    concurrency: int = 8  # evictions in flight at once
    poll_interval: float = 0.25  # seconds between rounds while pods terminate (no watch)
    departure_wait: float = 2.0  # longest wait for terminating pods to go, when watching
    budget_retry_base: float = 1.0  # first retry of a 429, doubling per refusal
    budget_retry_max: float = 10.0
    error_retry: float = 2.0  # after a failed list or eviction (API unavailable, ...)
    idle_relist: float = 5.0  # re-list while only pods that block for good are left
