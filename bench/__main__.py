"""Run the benchmarks and write docs/benchmarks.md.

    python -m bench [--quick] [--only NAME ...] [--output docs/benchmarks.md] [--json FILE]

One audited control plane (bench/testbed.py) is started for the whole run and shared by
the benchmarks. A benchmark that fails is reported as failed (with its error) and the
others still run; the exit status is 1 if any failed. A missed target is a result, not a
failure. In quick mode, the smoke mode, each benchmark also checks that its result is well
formed (its ``check``: the numbers it must show are there and make sense); a malformed
result is a failure too. tests/kube/test_bench_smoke.py runs the quick mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.context import BenchContext
from bench.records import BenchResult, MalformedResult, Status
from bench.registry import BENCHMARKS, NAMES, Benchmark
from bench.testbed import running_audited_plane

log = logging.getLogger("bench")

DEFAULT_OUTPUT = Path("docs/benchmarks.md")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: one repeat, short windows (what make test runs)")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the report (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the run and its results as JSON to FILE")
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    for noisy in ("cluo_host", "testbed", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    started = datetime.now(UTC)
    load_at_start = report.load_average()
    others = report.busy_processes()
    results: list[BenchResult] = []
    with tempfile.TemporaryDirectory(prefix="cluo-bench-") as scratch, \
            running_audited_plane() as plane:
        version = json.loads(plane.kubectl("version", "-o", "json").stdout)
        kubernetes_version = str(version["serverVersion"]["gitVersion"])
        context = BenchContext(plane=plane, quick=args.quick, workdir=Path(scratch))
        for benchmark in selected:
            if benchmark.run is None:
                results.append(benchmark.not_built_result())
                continue
            log.info("benchmark starting: %s", benchmark.name)
            began = time.monotonic()
            try:
                result = benchmark.run(context)
            except Exception as err:
                log.exception("benchmark failed: %s", benchmark.name)
                result = BenchResult(
                    benchmark.name, benchmark.title, Status.FAILED,
                    reason=f"{type(err).__name__}: {err}".strip()[:2000]
                    + "\n\n```\n" + traceback.format_exc()[-3000:] + "```",
                    seconds=time.monotonic() - began,
                )
            else:
                if args.quick:
                    result = _checked(benchmark, result)
            results.append(result)
            log.info("benchmark done: %s (%s, %.0f s)", benchmark.name, result.status.value,
                     result.seconds)
    info = report.RunInfo(
        command=_command(args_list),
        started=started,
        finished=datetime.now(UTC),
        machine=report.Machine.describe(kubernetes_version),
        load_at_start=load_at_start,
        load_at_end=report.load_average(),
        quick=args.quick,
        others_running=others,
    )
    report.write(args.output, info, results)
    log.info("report written to %s", args.output)
    if args.json:
        report.write_json(args.json, info, results)
    return 1 if any(r.status is Status.FAILED for r in results) else 0


def _checked(benchmark: Benchmark, result: BenchResult) -> BenchResult:
    """The result, failed if its benchmark finds it malformed (its measurements kept)."""
    if benchmark.check is None:
        return result
    try:
        benchmark.check(result)
    except MalformedResult as err:
        log.error("benchmark result malformed: %s", err)
        return dataclasses.replace(result, status=Status.FAILED,
                                   reason=f"malformed result (quick mode's check): {err}")
    return result


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    command = shlex.join([str(python), "-m", "bench", *argv])
    return f"make bench, which ran {command}" if "MAKELEVEL" in os.environ else command


if __name__ == "__main__":
    sys.exit(main())
