"""Typed results of a benchmark run: what was measured, against which target, and whether
it was met. The report writer renders these; nothing else makes numbers up."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Comparison(enum.Enum):
    AT_MOST = "<="
    AT_LEAST = ">="


@dataclass(frozen=True)
class Target:
    """The issue's target for one measurement, e.g. ``<= 1.0``."""

    comparison: Comparison
    limit: float

    def met_by(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.comparison is Comparison.AT_MOST:
            return value <= self.limit
        return value >= self.limit

    def describe(self, unit: str) -> str:
        return f"{self.comparison.value} {_number(self.limit)}{_unit_suffix(unit)}"


@dataclass(frozen=True)
class Measurement:
    """One number from one benchmark; ``samples`` are the individual runs behind it."""

    name: str
    value: float
    unit: str
    target: Target | None = None
    samples: tuple[float, ...] = ()
    detail: str = ""

    @property
    def met(self) -> bool | None:
        """None when the issue sets no target for this number."""
        return None if self.target is None else self.target.met_by(self.value)

    def target_text(self) -> str:
        return "" if self.target is None else self.target.describe(self.unit)

    def formatted(self) -> str:
        return f"{_number(self.value)}{_unit_suffix(self.unit)}"


class Status(enum.Enum):
    MEASURED = "measured"
    NOT_BUILT = "not built yet"
    FAILED = "failed"


@dataclass(frozen=True)
class BenchResult:
    """What one benchmark produced in one run."""

    name: str
    title: str
    status: Status
    measurements: tuple[Measurement, ...] = ()
    method: str = ""  # how it was measured, one paragraph
    notes: tuple[str, ...] = ()  # observations, causes of missed targets
    reason: str = ""  # why NOT_BUILT or FAILED
    seconds: float = 0.0  # wall time the benchmark took
    setup: dict[str, str] = field(default_factory=dict)  # parameters of the run

    @property
    def missed(self) -> tuple[Measurement, ...]:
        return tuple(m for m in self.measurements if m.met is False)

    def measurement(self, name: str) -> Measurement:
        """The measurement called ``name``; MalformedResult if there is none."""
        for m in self.measurements:
            if m.name == name:
                return m
        raise MalformedResult(f"{self.name}: no measurement {name!r}")


class MalformedResult(Exception):
    """A benchmark's quick-mode result lacks what it must show (see ``check_well_formed``)."""


def expect(condition: bool, problem: str) -> None:
    """MalformedResult(problem) unless ``condition``: one line per fact a check asserts."""
    if not condition:
        raise MalformedResult(problem)


def check_well_formed(result: BenchResult, name: str) -> None:
    """What every benchmark's result must show in quick mode, the smoke mode of make test:
    its own name, measured, a method, at least one measurement and one with a target, and
    only finite, non-negative numbers. (A full run may report n/a: only quick runs are
    checked.)"""
    expect(result.name == name, f"{name}: the result is named {result.name!r}")
    expect(result.status is Status.MEASURED,
           f"{name}: {result.status.value}, {result.reason}".rstrip(", "))
    expect(bool(result.measurements), f"{name}: no measurements")
    expect(bool(result.method), f"{name}: no method")
    for m in result.measurements:
        expect(math.isfinite(m.value) and m.value >= 0,
               f"{name}: {m.name!r} is {m.value}, not a finite number >= 0")
    expect(any(m.target is not None for m in result.measurements),
           f"{name}: no measurement has a target to compare with")


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _unit_suffix(unit: str) -> str:
    if not unit:
        return ""
    if unit in ("%",):
        return unit
    return f" {unit}"
