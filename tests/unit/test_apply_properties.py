"""Property test: the planner's limits hold when a plan's changes are applied side by side.

The planner model of tests/unit/test_planner_properties.py (agents, kubelets, admins,
stale views, restarts, crashes), with one difference: a plan is applied as the pooled
runner (cluo_coord.apply) may apply it, not in the planner's order. Any change whose
predecessors in ``schedule`` were applied may go next, picked at random; a conflict
stops that change's followers but not the other chains; and the plan may be cut short
anywhere. That is more than the runner does (it stops every chain after an error), so
every limit checked there must hold here too: never more nodes in flight or granted
than allowed, reboot-ok only under a slot, and every reboot done in the end.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from cluo_coord.apply import schedule
from cluo_coord.planner import Plan
from tests.unit.test_planner_properties import (
    HISTORY,
    Conflict,
    FakeCluster,
    GroupedPlannerMachine,
    PlannerMachine,
)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
LIMITS = st.integers(min_value=0, max_value=3) | st.none()  # cut short often: what reorders


def apply_side_by_side(cluster: FakeCluster, chooser: random.Random, result: Plan,
                       limit: int | None = None) -> int:
    """Apply ``result`` in an order the schedule allows, chosen by ``chooser``; at most
    ``limit`` changes tried. Returns how many were applied."""
    steps = schedule(result.changes)
    applied: set[int] = set()
    tried: set[int] = set()
    budget = len(steps) if limit is None else limit
    while budget > 0:
        ready = [step for step in steps if step.index not in tried
                 and all(before in applied for before in step.after)]
        if not ready:
            break
        step = chooser.choice(ready)
        tried.add(step.index)
        budget -= 1
        try:
            cluster.apply(step.change)
        except Conflict:
            continue  # its followers never become ready; the other chains go on
        applied.add(step.index)
    return len(applied)


@contextlib.contextmanager
def side_by_side(cluster: FakeCluster, seed: int) -> Iterator[None]:
    """While the block runs, the cluster's ``apply_plan`` applies side by side."""
    chooser = random.Random(seed)
    cluster.apply_plan = (  # type: ignore[method-assign]
        lambda result, limit=None: apply_side_by_side(cluster, chooser, result, limit))
    try:
        yield
    finally:
        del cluster.apply_plan


class SideBySide(PlannerMachine):
    @rule(limit=LIMITS, seed=SEEDS)
    def coordinator_reconciles(self, limit: int | None, seed: int) -> None:
        with side_by_side(self.cluster, seed):
            PlannerMachine.coordinator_reconciles(self, limit)

    @rule(node_age=st.integers(min_value=0, max_value=HISTORY - 1),
          lease_age=st.integers(min_value=0, max_value=HISTORY - 1),
          limit=LIMITS, seed=SEEDS)
    def coordinator_acts_on_stale_views(
            self, node_age: int, lease_age: int, limit: int | None, seed: int) -> None:
        if len(self.history) < 2:
            return
        with side_by_side(self.cluster, seed):
            PlannerMachine.coordinator_acts_on_stale_views(self, node_age, lease_age, limit)


class GroupedSideBySide(SideBySide, GroupedPlannerMachine):
    """The same, with groups, budgets, control-plane nodes and a canary every time."""


# Fewer examples than the planner's own test: the model and its rules are the same.
SideBySide.TestCase.settings = settings(PlannerMachine.TestCase.settings, max_examples=100)
GroupedSideBySide.TestCase.settings = SideBySide.TestCase.settings
test_planner_limits_hold_when_chains_run_side_by_side = SideBySide.TestCase
test_group_limits_hold_when_chains_run_side_by_side = GroupedSideBySide.TestCase
