"""Smoke mode of every built benchmark (issue 6), so none of them rots.

Benchmarks are not tests: nothing here asserts on a timing. Each built benchmark runs in
its quick mode against the real control plane and must produce well-formed results; the
report writer must render them, and the benchmarks not built yet must say why.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import api_cost, drain_vs_kubectl, report
from bench.context import BenchContext
from bench.records import BenchResult, Status
from bench.registry import BENCHMARKS
from tests.testbed.controlplane import ControlPlane

pytestmark = [pytest.mark.kube, pytest.mark.dbus]


def assert_well_formed(result: BenchResult, name: str) -> None:
    assert result.name == name
    assert result.status is Status.MEASURED, result.reason
    assert result.measurements and result.method
    for measurement in result.measurements:
        assert math.isfinite(measurement.value) and measurement.value >= 0, measurement
    assert any(m.target is not None for m in result.measurements), "a target to compare with"


def render(result: BenchResult) -> str:
    info = report.RunInfo(
        command="python -m bench --quick", started=datetime.now(UTC), finished=datetime.now(UTC),
        machine=report.Machine.describe("v0.0.0"), load_at_start=report.load_average(),
        load_at_end=report.load_average(), quick=True,
    )
    return report.render(info, [result, *(b.not_built_result() for b in BENCHMARKS
                                          if b.run is None)])


def test_drain_vs_kubectl_quick(control_plane: ControlPlane, tmp_path: Path) -> None:
    # A smaller node than the benchmark's 50 pods keeps make test quick; same code path.
    layout = drain_vs_kubectl.DrainLayout(pods=10, guarded=2)
    result = drain_vs_kubectl.run(BenchContext(control_plane, True, tmp_path), layout)
    assert_well_formed(result, drain_vs_kubectl.NAME)
    by_name = {m.name: m for m in result.measurements}
    assert len(by_name["kubectl drain, median"].samples) == 1
    assert len(by_name["cluo drain, median"].samples) == 1
    text = render(result)
    assert "ratio cluo / kubectl (medians)" in text
    assert "Not built yet: " in text


def test_api_cost_agent_quick(control_plane: ControlPlane, tmp_path: Path) -> None:
    # The session plane has no audit log: the benchmark starts an audited one of its own.
    result = api_cost.run(BenchContext(control_plane, True, tmp_path))
    assert_well_formed(result, api_cost.NAME)
    by_name = {m.name: m for m in result.measurements}
    assert by_name["requests per completed node reboot"].value > 0, "the cycle was counted"
    assert by_name["of them evictions"].value >= api_cost.CYCLE_PODS
    assert "cluo-agent/" in " ".join(result.notes), "requests attributed to the agent"
    assert "idle agent: requests per hour beyond the watch" in render(result)
