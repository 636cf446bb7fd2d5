"""Which pods a drain evicts, skips, waits for, or cannot move."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluo.cycle.drain_plan import (
    BlockReason,
    DrainOptions,
    OwnerRef,
    PodBlocker,
    PodSummary,
    SkipReason,
    describe_blockers,
    plan_drain,
)

REPLICA_SET = (OwnerRef("ReplicaSet", "web-5d9f", controller=True),)
DAEMON_SET = (OwnerRef("DaemonSet", "node-exporter", controller=True),)
STATEFUL_SET = (OwnerRef("StatefulSet", "db", controller=True),)
# An owner that is not the controller (e.g. a garbage-collection owner) does not count.
NON_CONTROLLER_OWNER = (OwnerRef("ConfigMap", "cfg", controller=False),)


def pod(name: str, **fields: object) -> PodSummary:
    return PodSummary(namespace="default", name=name, uid=f"uid-{name}", **fields)  # type: ignore[arg-type]


def where(pod_summary: PodSummary, options: DrainOptions) -> str:
    plan = plan_drain([pod_summary], options)
    if plan.evict:
        return "evict"
    if plan.wait_for:
        return "wait"
    if plan.skipped:
        return f"skip:{plan.skipped[0].reason.name}"
    return f"block:{plan.blocking[0].reason.name}"


@pytest.mark.parametrize(
    ("case", "summary", "options", "expected"),
    [
        ("replicaset pod is evicted", pod("a", owners=REPLICA_SET), DrainOptions(), "evict"),
        ("statefulset pod is evicted", pod("a", owners=STATEFUL_SET), DrainOptions(), "evict"),
        ("daemonset pod is skipped", pod("a", owners=DAEMON_SET), DrainOptions(),
         "skip:DAEMON_SET"),
        ("mirror pod is skipped", pod("a", mirror=True), DrainOptions(), "skip:MIRROR"),
        ("mirror pod with owner is skipped",
         pod("a", mirror=True, owners=(OwnerRef("Node", "n1", controller=True),)),
         DrainOptions(), "skip:MIRROR"),
        ("succeeded pod is skipped", pod("a", phase="Succeeded"), DrainOptions(), "skip:FINISHED"),
        ("failed pod is skipped", pod("a", phase="Failed", owners=REPLICA_SET), DrainOptions(),
         "skip:FINISHED"),
        ("terminating pod is waited for", pod("a", owners=REPLICA_SET, deleting=True),
         DrainOptions(), "wait"),
        ("terminating pod without controller is waited for, not blocking",
         pod("a", deleting=True), DrainOptions(), "wait"),
        ("pod without controller blocks by default", pod("a"), DrainOptions(),
         "block:NO_CONTROLLER"),
        ("pod with only a non-controller owner blocks", pod("a", owners=NON_CONTROLLER_OWNER),
         DrainOptions(), "block:NO_CONTROLLER"),
        ("pod without controller is evicted when allowed", pod("a"),
         DrainOptions(evict_pods_without_controller=True), "evict"),
        ("pending pod is evicted", pod("a", owners=REPLICA_SET, phase="Pending"), DrainOptions(),
         "evict"),
        ("daemonset owner that is not the controller does not skip",
         pod("a", owners=(OwnerRef("DaemonSet", "ds", controller=False),)),
         DrainOptions(evict_pods_without_controller=True), "evict"),
    ],
)
def test_classifies_pod(
    case: str, summary: PodSummary, options: DrainOptions, expected: str
) -> None:
    assert where(summary, options) == expected, case


def test_plan_is_sorted_and_done_only_when_nothing_must_leave() -> None:
    pods = [
        PodSummary("b", "web", "1", owners=REPLICA_SET),
        PodSummary("a", "web", "2", owners=REPLICA_SET),
        PodSummary("a", "exporter", "3", owners=DAEMON_SET),
        PodSummary("kube-system", "apiserver", "4", mirror=True),
        PodSummary("a", "debug", "5"),
    ]

    plan = plan_drain(pods, DrainOptions())

    assert [p.ref for p in plan.evict] == ["a/web", "b/web"]
    assert [(s.pod.ref, s.reason) for s in plan.skipped] == [
        ("a/exporter", SkipReason.DAEMON_SET),
        ("kube-system/apiserver", SkipReason.MIRROR),
    ]
    assert plan.blocking == (PodBlocker("a", "debug", BlockReason.NO_CONTROLLER),)
    assert not plan.done


def test_pods_with_the_longest_grace_period_are_evicted_first() -> None:
    pods = [
        pod("web-a", owners=REPLICA_SET),
        pod("db", owners=STATEFUL_SET, grace_seconds=300),
        pod("web-b", owners=REPLICA_SET, grace_seconds=0),
        pod("queue", owners=STATEFUL_SET, grace_seconds=300),
        pod("cache", owners=REPLICA_SET, grace_seconds=60),
    ]

    plan = plan_drain(pods, DrainOptions())

    assert [p.name for p in plan.evict] == ["db", "queue", "cache", "web-a", "web-b"]


_PODS = st.lists(
    st.builds(
        PodSummary,
        namespace=st.sampled_from(["a", "b"]),
        name=st.sampled_from(["p1", "p2", "p3", "p4"]),
        uid=st.uuids().map(str),
        owners=st.sampled_from([(), REPLICA_SET, DAEMON_SET, NON_CONTROLLER_OWNER]),
        mirror=st.booleans(),
        phase=st.sampled_from(["Running", "Pending", "Succeeded"]),
        deleting=st.booleans(),
        grace_seconds=st.sampled_from([0, 1, 30, 300]),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(pods=_PODS, evict_orphans=st.booleans())
def test_the_grace_period_orders_the_evictions_and_changes_nothing_else(
    pods: list[PodSummary], evict_orphans: bool
) -> None:
    options = DrainOptions(evict_pods_without_controller=evict_orphans)
    plan = plan_drain(pods, options)
    same_grace = plan_drain([replace(p, grace_seconds=30) for p in pods], options)

    def without_grace(summaries: tuple[PodSummary, ...]) -> list[PodSummary]:
        return sorted((replace(p, grace_seconds=30) for p in summaries),
                      key=lambda p: (p.namespace, p.name, p.uid))

    assert without_grace(plan.evict) == without_grace(same_grace.evict)
    assert [(p.namespace, p.name) for p in same_grace.evict] == sorted(
        (p.namespace, p.name) for p in same_grace.evict)
    assert [replace(p, grace_seconds=30) for p in plan.wait_for] == list(same_grace.wait_for)
    assert plan.blocking == same_grace.blocking
    assert [(s.pod.uid, s.reason) for s in plan.skipped] == [
        (s.pod.uid, s.reason) for s in same_grace.skipped]
    order = [(-p.grace_seconds, p.namespace, p.name) for p in plan.evict]
    assert order == sorted(order)


def test_node_with_only_daemonset_mirror_and_finished_pods_is_drained() -> None:
    pods = [
        pod("exporter", owners=DAEMON_SET),
        pod("static", mirror=True),
        pod("job-1", phase="Succeeded"),
    ]

    plan = plan_drain(pods, DrainOptions())

    assert plan.done
    assert len(plan.skipped) == 3


def test_empty_node_is_drained() -> None:
    assert plan_drain([], DrainOptions()).done


def test_blocking_pod_message_says_how_to_unblock_it() -> None:
    plan = plan_drain([pod("debug")], DrainOptions())

    text = describe_blockers(plan.blocking)

    assert "default/debug" in text
    assert "no controller" in text
    assert "allow draining pods without a controller" in text


def test_only_no_controller_blocks_for_good() -> None:
    assert BlockReason.NO_CONTROLLER.permanent
    assert not BlockReason.DISRUPTION_BUDGET.permanent
    assert not BlockReason.TERMINATING.permanent
    assert not BlockReason.EVICTION_ERROR.permanent


def test_blocker_description_is_stable_deduplicated_and_bounded() -> None:
    blockers = [
        PodBlocker("ns", f"p{i:02}", BlockReason.DISRUPTION_BUDGET, "pdb 'web' allows 0")
        for i in range(15)
    ]

    text = describe_blockers(reversed(blockers + blockers[:3]), limit=10)

    assert text == describe_blockers(blockers, limit=10)
    assert text.startswith("ns/p00 (eviction refused by a PodDisruptionBudget: pdb 'web' allows 0)")
    assert "ns/p09" in text
    assert "ns/p10" not in text
    assert text.endswith("; and 5 more")
