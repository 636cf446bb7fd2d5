"""What cluo-agent imports when: the start needs neither the decision core nor the drain;
the core loads once READY=1 is sent (cluo_host/agent.py ``_start_cycle``), the drain and
the Eviction API adapter with the first drain (cluo/cycle/node_actions.py); docs/agent.md,
Footprint."""

from __future__ import annotations

import json
import subprocess
import sys

# Loaded once READY=1 is sent, for the first decision.
DECISIONS = (
    "cluo.cycle.agent_core",
    "cluo.cycle.drain_plan",
    "cluo.cycle.node_actions",
    "cluo_host.cycle",
)
# Loaded when the first drain starts.
DRAIN = (
    "cluo.cycle.drainer",
    "cluo.cycle.eviction",
)
LIST_MODULES = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def modules_after(imports: str) -> set[str]:
    """The modules a fresh interpreter holds after ``import <imports>``."""
    result = subprocess.run([sys.executable, "-c", f"import {imports}; {LIST_MODULES}"],
                            capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_start_imports_neither_the_decision_core_nor_the_drain() -> None:
    loaded = modules_after("cluo_host.main")
    assert "cluo_host.agent" in loaded  # what starts the agent and sends READY=1 is there
    assert loaded.isdisjoint(DECISIONS + DRAIN), sorted(loaded & set(DECISIONS + DRAIN))


def test_the_decisions_do_not_import_the_drain() -> None:
    loaded = modules_after("cluo_host.main, cluo_host.cycle")
    assert set(DECISIONS) <= loaded
    assert loaded.isdisjoint(DRAIN), sorted(loaded & set(DRAIN))


def test_the_drain_brings_the_eviction_adapter() -> None:
    assert set(DRAIN) <= modules_after("cluo.cycle.drainer")
