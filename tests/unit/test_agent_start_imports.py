"""What cluo-agent imports before READY=1: the start needs neither the decision core nor
the drain, which load with the first decision (cluo_host/agent.py ``_start_cycle``;
docs/agent.md, Footprint)."""

from __future__ import annotations

import json
import subprocess
import sys

# Loaded only once the first decision is made.
AFTER_READY = (
    "cluo.cycle.agent_core",
    "cluo.cycle.drain_plan",
    "cluo.cycle.drainer",
    "cluo.cycle.eviction",
    "cluo.cycle.node_actions",
    "cluo_host.cycle",
)
PROBE = "import json, sys, cluo_host.main; print(json.dumps(sorted(sys.modules)))"


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_decision_core_and_the_drain_are_not_imported_to_start() -> None:
    loaded = modules_after(PROBE)
    assert "cluo_host.agent" in loaded  # what starts the agent and sends READY=1 is there
    assert loaded.isdisjoint(AFTER_READY), sorted(loaded & set(AFTER_READY))


def test_the_cycle_driver_brings_them_in() -> None:
    loaded = modules_after("import cluo_host.cycle, json, sys; "
                           "print(json.dumps(sorted(sys.modules)))")
    assert set(AFTER_READY) <= loaded
