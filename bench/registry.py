"""The benchmarks, in the order docs/benchmarks.md reports them. A benchmark that cannot be
built yet has no ``run`` and says why; the report lists it as "not built yet". ``check``
says whether a quick-mode result is well formed (it raises MalformedResult if not)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench import (
    agent_footprint,
    api_cost,
    coord_api_cost,
    coord_scale,
    drain_vs_kubectl,
    roll,
)
from bench.context import BenchContext
from bench.records import BenchResult, Status


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    run: Callable[[BenchContext], BenchResult] | None = None
    check: Callable[[BenchResult], None] | None = None
    not_built: str = ""

    def not_built_result(self) -> BenchResult:
        return BenchResult(self.name, self.title, Status.NOT_BUILT, reason=self.not_built)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(roll.HANDOFF_NAME, roll.HANDOFF_TITLE, roll.run_handoff, roll.check_handoff),
    Benchmark(roll.OVERHEAD_NAME, roll.OVERHEAD_TITLE, roll.run_overhead, roll.check_overhead),
    Benchmark(api_cost.NAME, api_cost.TITLE, api_cost.run, api_cost.check),
    Benchmark(coord_api_cost.NAME, coord_api_cost.TITLE, coord_api_cost.run,
              coord_api_cost.check),
    Benchmark(coord_scale.NAME, coord_scale.TITLE, coord_scale.run, coord_scale.check),
    Benchmark(agent_footprint.NAME, agent_footprint.TITLE, agent_footprint.run,
              agent_footprint.check),
    Benchmark(drain_vs_kubectl.NAME, drain_vs_kubectl.TITLE, drain_vs_kubectl.run,
              drain_vs_kubectl.check),
)

NAMES = tuple(b.name for b in BENCHMARKS)
