"""Smoke mode of every built benchmark, so none of them rots.

Benchmarks are not tests: nothing here asserts on a timing. The real command runs once, in
a subprocess (tests and bench do not import each other): `python -m bench --quick` starts
its audited control plane and runs every benchmark in its quick mode, where each checks
that its own result is well formed and fails the run if not (bench/records.py and each
benchmark's `check`). Each test below then reads one benchmark's result from the JSON the
run wrote beside its report, and its section of the report.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 1500.0  # seconds, the whole quick run (all benchmarks, one control plane)
STOP_TIMEOUT = 60.0  # seconds for an interrupted run to stop its control plane

pytestmark = [pytest.mark.kube, pytest.mark.dbus,
              # The first test pays for the run (the module's fixture): the run's timeout.
              pytest.mark.timeout(RUN_TIMEOUT + STOP_TIMEOUT + 60)]

Result = dict[str, Any]


@dataclass(frozen=True)
class QuickRun:
    returncode: int
    log: str  # the end of the bench's output
    report: str  # the Markdown report
    results: dict[str, Result]  # from the JSON, by benchmark name

    def result(self, name: str) -> Result:
        """The benchmark's result, measured and well formed."""
        assert name in self.results, f"no result for {name}:\n{self.log}"
        result = self.results[name]
        assert result["name"] == name
        assert result["status"] == "measured", result["reason"]
        assert result["measurements"] and result["method"]
        for m in result["measurements"]:
            assert m["value"] is not None and math.isfinite(m["value"]) and m["value"] >= 0, m
        assert any(m["target"] is not None for m in result["measurements"]), \
            "a target to compare with"
        return result

    def section(self, result: Result) -> str:
        """The benchmark's section of the report, from its heading to the next one."""
        heading = f"\n## {result['title']}\n"
        assert heading in self.report, f"no section {result['title']!r} in the report"
        return self.report.split(heading, 1)[1].split("\n## ", 1)[0]


def measurement(result: Result, name: str) -> dict[str, Any]:
    found = [m for m in result["measurements"] if m["name"] == name]
    assert found, f"{result['name']}: no measurement {name!r}"
    return found[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    out = tmp_path_factory.mktemp("bench")
    log_path = out / "bench.log"
    with log_path.open("wb") as log:
        bench = subprocess.Popen(
            [sys.executable, "-m", "bench", "--quick", "--output", str(out / "benchmarks.md"),
             "--json", str(out / "benchmarks.json")],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        returncode = bench.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: the bench then stops its control plane on the way out.
        bench.send_signal(signal.SIGINT)
        try:
            bench.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            bench.kill()
            bench.wait()
        tail = log_path.read_text(errors="replace")[-5000:]
        pytest.fail(f"python -m bench --quick still running after {RUN_TIMEOUT:.0f} s:\n{tail}")
    tail = log_path.read_text(errors="replace")[-5000:]
    assert (out / "benchmarks.json").is_file(), f"the run wrote no JSON:\n{tail}"
    document = json.loads((out / "benchmarks.json").read_text())
    return QuickRun(
        returncode=returncode,
        log=tail,
        report=(out / "benchmarks.md").read_text(),
        results={r["name"]: r for r in document["results"]},
    )


def test_quick_run_succeeds_and_reports_every_benchmark(quick_run: QuickRun) -> None:
    failed = {name: r["reason"] for name, r in quick_run.results.items()
              if r["status"] != "measured"}
    assert not failed, failed
    assert quick_run.returncode == 0, quick_run.log
    summary = quick_run.report.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    for result in quick_run.results.values():
        assert f"| {result['title']} | measured |" in summary


def test_drain_vs_kubectl_quick(quick_run: QuickRun) -> None:
    result = quick_run.result("drain-vs-kubectl")
    assert len(measurement(result, "kubectl drain, median")["samples"]) == 1
    assert len(measurement(result, "cluo drain, median")["samples"]) == 1
    assert "ratio cluo / kubectl (medians)" in quick_run.section(result)


def test_api_cost_agent_quick(quick_run: QuickRun) -> None:
    result = quick_run.result("api-cost-agent")
    assert measurement(result, "requests per completed node reboot")["value"] > 0, \
        "the cycle was counted"
    pods = int(result["setup"]["pods on the node"])
    assert measurement(result, "of them evictions")["value"] >= pods
    assert "cluo-agent/" in " ".join(result["notes"]), "requests attributed to the agent"
    assert "idle agent: requests per hour beyond the watch" in quick_run.section(result)


def test_handoff_and_roll_overhead_quick(quick_run: QuickRun) -> None:
    handoff = quick_run.result("handoff-latency")
    overhead = quick_run.result("roll-overhead")
    nodes = int(handoff["setup"]["nodes"])
    assert f"{nodes - 1} handoffs" in handoff["measurements"][0]["detail"], \
        "one per pair of nodes"
    drain_reboot = float(overhead["setup"]["simulated drain + reboot"].removesuffix(" s"))
    assert measurement(overhead, f"N={nodes}: makespan")["value"] > nodes * drain_reboot, \
        "the roll took at least the simulated drains and reboots"
    assert "handoff p50" in quick_run.section(handoff)


def test_api_cost_coordinator_quick(quick_run: QuickRun) -> None:
    result = quick_run.result("api-cost-coordinator")
    assert "cluo-coord/" in " ".join(result["notes"]), "requests attributed to the coordinator"
    assert "as deployed (one replica, leader election off)" in quick_run.section(result)
    election = next(n for n in result["notes"] if n.startswith("leader election on, requests"))
    assert "update leases" in election, "the leader renewed its Lease in the window"
    assert "get leases" not in election, "a renewal is one PUT, no GET first"


def test_coordinator_scale_quick(quick_run: QuickRun) -> None:
    result = quick_run.result("coordinator-scale")
    decisions = [m for m in result["measurements"] if "grant decision" in m["name"]]
    assert [len(m["samples"]) for m in decisions] == [int(result["setup"]["decisions per size"])]
    assert "RSS after sync" in quick_run.section(result)
    assert any("each decision split" in note for note in result["notes"]), \
        "the decision time is split between the coordinator's requests and the rest"


def test_agent_footprint_quick(quick_run: QuickRun) -> None:
    result = quick_run.result("agent-footprint")
    assert measurement(result, "idle RSS")["value"] > 0, "the artifact's process was measured"
    assert "READY=1" in quick_run.section(result)
