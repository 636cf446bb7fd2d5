"""The planner's node index, kept by the cluster cache from the nodes that changed.

``NodeViewCache`` derives each snapshot's ``NodeIndex`` from the previous one and the
views that changed; it must be the index a from-scratch ``NodeIndex.of`` gives, and a plan
from it the plan from the same views in any order, whatever the nodes went through.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cluo.protocol import Keys, NodeProtocolState
from cluo_coord.cluster import NodeViewCache, _NodeStore
from cluo_coord.groups import CONTROL_PLANE_LABEL, Budget, Groups
from cluo_coord.planner import NodeIndex, NodeView, Policy, SlotLease, plan

KEYS = Keys()
NOW = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ("a", "b", "c", "d", "e", "f")
FLAGS = (KEYS.reboot_needed, KEYS.reboot_ok, KEYS.reboot_in_progress, KEYS.reboot_paused,
         KEYS.release_slot, KEYS.agent_made_unschedulable)
POLICIES = (
    Policy(max_concurrent=2),
    Policy(max_concurrent=3, max_unavailable=Budget.parse("50%"),
           groups=Groups(max_concurrent=1, canary="canary",
                         max_unavailable=Budget.parse("1"))),
)


def node(name: str, version: int, spec: dict[str, Any]) -> dict[str, Any]:
    annotations = {key: "true" for key in spec["flags"]}
    if spec["failures"]:
        annotations[KEYS.drain_failures] = str(spec["failures"])
    labels = {KEYS.group: spec["group"]} if spec["group"] else {}
    if spec["control_plane"]:
        labels[CONTROL_PLANE_LABEL] = ""
    metadata: dict[str, Any] = {"name": name, "resourceVersion": str(version),
                                "annotations": annotations, "labels": labels}
    if spec["deleting"]:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": metadata,
        "spec": {"unschedulable": spec["unschedulable"]},
        "status": {"conditions": [{"type": "Ready", "status": str(spec["ready"]),
                                   "lastTransitionTime": "2025-12-31T00:00:00Z"}],
                   "nodeInfo": {"bootID": f"boot-{name}-{spec['boot']}"}},
    }


SPECS = st.fixed_dictionaries({
    "flags": st.sets(st.sampled_from(FLAGS)),
    "failures": st.sampled_from([0, 0, 1]),
    "group": st.sampled_from(["", "canary", "web"]),
    "control_plane": st.booleans(),
    "deleting": st.sampled_from([False, False, True]),
    "unschedulable": st.booleans(),
    "ready": st.sampled_from([True, True, False]),
    "boot": st.integers(0, 1),
})
# One snapshot's worth of changes: a node written (a spec) or deleted (None).
BATCHES = st.lists(st.dictionaries(st.sampled_from(NAMES), st.none() | SPECS, max_size=4),
                   max_size=8)
SLOTS = st.lists(st.tuples(st.sampled_from(["", "web", "canary"]), st.integers(0, 2),
                           st.sampled_from([None, *NAMES, "gone"])),
                 max_size=4, unique_by=lambda slot: slot[:2])


def facts(index: NodeIndex) -> tuple[Any, ...]:
    return (tuple(index), dict(index.by_name), index.active, dict(index.unavailable),
            index.reboot_needed)


@settings(max_examples=150, deadline=None)
@given(first=st.dictionaries(st.sampled_from(NAMES), SPECS), batches=BATCHES, slots=SLOTS)
def test_the_index_kept_from_changes_is_the_index_from_scratch(
        first: dict[str, dict[str, Any]], batches: list[dict[str, dict[str, Any] | None]],
        slots: list[tuple[str, int, str | None]]) -> None:
    store, views = _NodeStore(), NodeViewCache(KEYS)
    version = 1
    store.replace([node(name, version, spec) for name, spec in first.items()], "1")
    leases = [SlotLease(index, holder=holder, resource_version="7", group=group)
              for group, index, holder in slots]
    for batch in [{}, *batches]:
        for name, spec in batch.items():
            version += 1
            if spec is None:
                store.delete({"metadata": {"name": name}})
            else:
                store.put(node(name, version, spec))
        complete, changed = store.take_changes()
        index = (views.rebuild(obj for obj in changed.values() if obj is not None)
                 if complete else views.update(changed))
        fresh = NodeIndex.of(reversed(list(index)))
        assert facts(index) == facts(fresh)
        for policy in POLICIES:
            assert plan(index, leases, NOW, policy) == plan(fresh, leases, NOW, policy)


def test_the_pass_over_nodes_leaves_out_those_in_no_cycle() -> None:
    """At scale, a plan looks only at the nodes in a cycle: the index names them."""
    idle = NodeView("idle", NodeProtocolState(), "1", ready=True)
    needing = NodeView("needing", NodeProtocolState(reboot_needed=True), "1", ready=True)
    cordoned = NodeView("cordoned", NodeProtocolState(), "1", ready=True, unschedulable=True)
    index = NodeIndex.of([needing, idle, cordoned])
    assert [view.name for view in index] == ["cordoned", "idle", "needing"]
    assert index.active == {"needing"}
    assert dict(index.unavailable) == {"cordoned": "cordoned"}
    assert index.reboot_needed == 1
