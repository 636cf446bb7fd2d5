"""logind's inhibitors, typed: which of them hold up a reboot.

The logind adapter (cluo_host/logind.py) reads ``ListInhibitors()`` into ``Inhibitor``
records; the agent checks them right before it calls ``Reboot`` (``agent_core.Reboot``).

This module is pure: it imports no I/O library and reads no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Inhibitor:
    """One entry of logind's ListInhibitors() -> a(ssssuu)."""

    what: str  # colon-separated: shutdown:sleep:idle:...
    who: str
    why: str
    mode: str  # "block" or "delay"
    uid: int
    pid: int

    @property
    def blocks_reboot(self) -> bool:
        return self.mode == "block" and "shutdown" in self.what.split(":")

    def describe(self) -> str:
        return f"{self.who!r} (pid {self.pid}, uid {self.uid}): {self.why}"


def blocking_inhibitors(inhibitors: Iterable[Inhibitor]) -> tuple[Inhibitor, ...]:
    """The inhibitors that make logind refuse (systemd 257+) or delay a reboot.

    The driver checks them right before calling Reboot; if any, it records a
    ``RebootAttempt`` with outcome ``INHIBITED`` and ``describe_inhibitors`` as detail.
    """
    return tuple(inhibitor for inhibitor in inhibitors if inhibitor.blocks_reboot)


def describe_inhibitors(inhibitors: Iterable[Inhibitor]) -> str:
    return "; ".join(inhibitor.describe() for inhibitor in inhibitors)
