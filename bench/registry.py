"""The six benchmarks of issue 6, in the issue's order. A benchmark that cannot be built
yet has no ``run`` and says why; the report lists it as "not built yet"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench import api_cost, drain_vs_kubectl
from bench.context import BenchContext
from bench.records import BenchResult, Status

NO_COORDINATOR = (
    "it needs the coordinator's driver (the cluo-coord process that watches nodes and grants "
    "reboot slots), which does not exist yet: only its pure planner and the Lease adapter "
    "are written. Nothing can be measured without inventing the numbers."
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    run: Callable[[BenchContext], BenchResult] | None = None
    not_built: str = ""

    def not_built_result(self) -> BenchResult:
        return BenchResult(self.name, self.title, Status.NOT_BUILT, reason=self.not_built)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("handoff-latency", "1. Handoff latency", not_built=NO_COORDINATOR),
    Benchmark("roll-overhead", "2. Roll overhead", not_built=NO_COORDINATOR),
    Benchmark(api_cost.NAME, api_cost.TITLE, api_cost.run),
    Benchmark("api-cost-coordinator", "3. API cost: the idle coordinator with 100 nodes",
              not_built=NO_COORDINATOR),
    Benchmark("coordinator-scale", "4. Coordinator scale", not_built=NO_COORDINATOR),
    Benchmark(
        "agent-footprint", "5. Agent footprint",
        not_built=(
            "the target is about the real agent artifact (the PyInstaller build shipped to "
            "Flatcar), which is being built in parallel and is not in the tree yet. The venv "
            "console script is a different program (a CPython interpreter with site-packages "
            "on disk), so its RSS and start-up time would not answer the question."
        ),
    ),
    Benchmark(drain_vs_kubectl.NAME, drain_vs_kubectl.TITLE, drain_vs_kubectl.run),
)

NAMES = tuple(b.name for b in BENCHMARKS)
