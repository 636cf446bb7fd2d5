"""Smoke mode of every built benchmark (issue 6), so none of them rots.

Benchmarks are not tests: nothing here asserts on a timing. Each built benchmark runs in
its quick mode against the real control plane and must produce well-formed results, and
the report writer must render them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import (
    agent_footprint,
    api_cost,
    coord_api_cost,
    coord_scale,
    drain_vs_kubectl,
    report,
    roll,
)
from bench.context import BenchContext
from bench.records import BenchResult, Status
from bench.registry import BENCHMARKS
from bench.testbed import running_audited_plane
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


def test_api_cost_agent_quick(control_plane: ControlPlane, tmp_path: Path) -> None:
    # The session plane has no audit log: the benchmark starts an audited one of its own.
    result = api_cost.run(BenchContext(control_plane, True, tmp_path))
    assert_well_formed(result, api_cost.NAME)
    by_name = {m.name: m for m in result.measurements}
    assert by_name["requests per completed node reboot"].value > 0, "the cycle was counted"
    assert by_name["of them evictions"].value >= api_cost.CYCLE_PODS
    assert "cluo-agent/" in " ".join(result.notes), "requests attributed to the agent"
    assert "idle agent: requests per hour beyond the watch" in render(result)


# -- the coordinator's benchmarks and the agent artifact's ------------------------------
# They count and time at the API server from its audit log: one audited plane for them.


@pytest.fixture(scope="module")
def audited_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchContext]:
    with running_audited_plane() as plane:
        yield BenchContext(plane, True, tmp_path_factory.mktemp("bench"))


def test_handoff_and_roll_overhead_quick(audited_context: BenchContext) -> None:
    handoff = roll.run_handoff(audited_context)
    overhead = roll.run_overhead(audited_context)
    assert_well_formed(handoff, roll.HANDOFF_NAME)
    assert_well_formed(overhead, roll.OVERHEAD_NAME)
    nodes = roll.HANDOFF_NODES[True]
    assert f"{nodes - 1} handoffs" in handoff.measurements[0].detail, "one per pair of nodes"
    by_name = {m.name: m for m in overhead.measurements}
    assert by_name[f"N={nodes}: makespan"].value > nodes * roll.DRAIN_REBOOT, \
        "the roll took at least the simulated drains and reboots"
    assert "handoff p50" in render(handoff)


def test_api_cost_coordinator_quick(audited_context: BenchContext) -> None:
    result = coord_api_cost.run(audited_context)
    assert_well_formed(result, coord_api_cost.NAME)
    assert "cluo-coord/" in " ".join(result.notes), "requests attributed to the coordinator"
    assert "as deployed (one replica, leader election off)" in render(result)
    election = next(n for n in result.notes if n.startswith("leader election on, requests"))
    assert "update leases" in election, "the leader renewed its Lease in the window"
    assert "get leases" not in election, "a renewal is one PUT, no GET first"


def test_coordinator_scale_quick(audited_context: BenchContext) -> None:
    result = coord_scale.run(audited_context)
    assert_well_formed(result, coord_scale.NAME)
    decisions = [m for m in result.measurements if "grant decision" in m.name]
    assert [len(m.samples) for m in decisions] == [coord_scale.DECISIONS[True]]
    assert "RSS after sync" in render(result)
    assert any("each decision split" in note for note in result.notes), \
        "the decision time is split between the coordinator's requests and the rest"


def test_agent_footprint_quick(control_plane: ControlPlane, tmp_path: Path) -> None:
    result = agent_footprint.run(BenchContext(control_plane, True, tmp_path))
    assert_well_formed(result, agent_footprint.NAME)
    by_name = {m.name: m for m in result.measurements}
    assert by_name["idle RSS"].value > 0, "the artifact's process was measured"
    assert "READY=1" in render(result)
