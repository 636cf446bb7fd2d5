"""The health gate's record read ahead (``WorkloadGates.prefetch`` and ``grant_record``):
the queue's head is read while a holder is back from its reboot, and the grant that
follows the next acquisition uses that reading only while it is fresh.

``WorkloadGates`` on a fake clock, with a fake ``KubeWorkloads`` that counts its reads.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import cast

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo_coord.health import BudgetScope, ControllerRef, WorkloadRecord
from cluo_coord.leases import KubeSlots
from cluo_coord.workloads import RECORD_MAX_AGE, RECORD_REFRESH, KubeWorkloads, WorkloadGates
from testbed.waiting import wait_for
from tests.unit.test_planner import node, slot

WEB = ControllerRef("ReplicaSet", "shop", "web-5d9")


class FakeWorkloads:
    """``record`` answers from ``running`` (node -> its controllers), counting reads."""

    def __init__(self) -> None:
        self.running: dict[str, tuple[ControllerRef, ...]] = {}
        self.reads: list[str] = []
        self.failing = False
        self.done = threading.Event()

    def record(self, name: str) -> WorkloadRecord:
        self.reads.append(name)
        try:
            if self.failing:
                raise KubeError(f"listing the pods of node {name!r}", "timed out",
                                kind="unavailable")
            return WorkloadRecord(name, self.running.get(name, ()))
        finally:
            self.done.set()


class NoRecords:
    def __init__(self) -> None:
        self.asked: list[tuple[int, str | None]] = []

    def workloads(self, index: int, resource_version: str | None = None) -> str | None:
        self.asked.append((index, resource_version))
        return None  # every finished holder's gate is open


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def gates() -> tuple[WorkloadGates, FakeWorkloads, Clock]:
    workloads, clock = FakeWorkloads(), Clock()
    return WorkloadGates(cast(KubeWorkloads, workloads), cast(KubeSlots, NoRecords()),
                         monotonic=clock), workloads, clock


def finishing(gate: WorkloadGates, *holders: str) -> None:
    """A plan's ``closed``: each of ``holders`` holds a slot and is back from its reboot."""
    gate.closed([node(name) for name in holders],
                [slot(index, name) for index, name in enumerate(holders)])


def read_ahead(workloads: FakeWorkloads, count: int) -> None:
    wait_for(lambda: len(workloads.reads) >= count and workloads.done.is_set(), 5,
             f"{count} reading(s) ahead")


def test_the_head_of_the_queue_is_read_ahead_and_its_grant_reads_nothing_more() -> None:
    gate, workloads, clock = gates()
    workloads.running["b"] = (WEB,)
    finishing(gate, "a")
    gate.prefetch(("b", "c"))
    read_ahead(workloads, 1)
    clock.t += RECORD_MAX_AGE
    record = WorkloadRecord.from_json(gate.grant_record("b"))
    assert record.controllers == (WEB,)
    assert workloads.reads == ["b"], "only the head, and only once"


def test_the_reading_outlives_the_plan_that_takes_the_slot() -> None:
    gate, workloads, _ = gates()
    finishing(gate, "a")
    gate.prefetch(("b",))
    read_ahead(workloads, 1)
    gate.closed([node("a"), node("b", needed=True)], [])  # a released, b about to take it
    gate.prefetch(("b",))
    gate.grant_record("b")
    assert workloads.reads == ["b"]


def test_a_reading_older_than_the_bound_is_read_again_at_the_grant() -> None:
    gate, workloads, clock = gates()
    finishing(gate, "a")
    gate.prefetch(("b",))
    read_ahead(workloads, 1)
    workloads.running["b"] = (WEB,)  # a pod bound since
    clock.t += RECORD_MAX_AGE + 0.1
    assert WorkloadRecord.from_json(gate.grant_record("b")).controllers == (WEB,)
    assert workloads.reads == ["b", "b"]


def test_a_reading_is_asked_for_again_once_it_is_due_for_a_refresh() -> None:
    gate, workloads, clock = gates()
    finishing(gate, "a")
    gate.prefetch(("b",))
    read_ahead(workloads, 1)
    workloads.done.clear()
    gate.prefetch(("b",))
    clock.t += RECORD_REFRESH
    gate.prefetch(("b",))
    read_ahead(workloads, 2)
    assert workloads.reads == ["b", "b"]


def test_nothing_is_read_ahead_while_no_holder_is_back() -> None:
    gate, workloads, _ = gates()
    gate.closed([node("a", needed=True, ok=True, in_progress=True)], [slot(0, "a")])
    gate.prefetch(("b",))
    gate.grant_record("b")
    assert workloads.reads == ["b"], "read at the grant only"


def test_a_failed_reading_ahead_is_done_again_at_the_grant() -> None:
    gate, workloads, _ = gates()
    workloads.failing = True
    finishing(gate, "a")
    gate.prefetch(("b",))
    read_ahead(workloads, 1)
    workloads.failing = False
    assert WorkloadRecord.from_json(gate.grant_record("b")).node == "b"
    assert workloads.reads == ["b", "b"]


class RecordingApi:
    """A KubeClient stand-in: answers each GET with one pod of ReplicaSet web-5d9 (or no
    budget), recording the path and query of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def call(self, action: str, method: str, path: str, *, query: dict[str, str] | None = None,
             body: object = None) -> dict[str, object]:
        self.calls.append((path, dict(query or {})))
        if path.endswith("/pods"):
            return {"items": [{"metadata": {
                "name": "web-5d9-x", "namespace": "shop",
                "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d9",
                                     "controller": True}]}}]}
        return {"items": []}


def test_the_record_is_read_from_the_api_servers_cache_not_as_a_consistent_read() -> None:
    """A consistent list waits for the watch cache to be proven fresh (about 90 ms on the
    test bed after writes to other resources), on the grant's path; the record is a
    baseline, so it takes the cache as it stands: resourceVersion=0 on both lists."""
    api = RecordingApi()
    record = KubeWorkloads(cast(KubeClient, api), BudgetScope("app=web")).record("n1")
    assert record.controllers == (WEB,)
    assert [path.rsplit("/", 1)[-1] for path, _ in api.calls] == ["pods", "poddisruptionbudgets"]
    pods, budgets = (query for _, query in api.calls)
    assert pods == {"fieldSelector": "spec.nodeName=n1", "resourceVersion": "0"}
    assert budgets == {"labelSelector": "app=web", "resourceVersion": "0"}


def test_a_finished_holders_record_is_asked_for_at_the_slot_version_the_plan_sees() -> None:
    records = NoRecords()
    gate = WorkloadGates(cast(KubeWorkloads, FakeWorkloads()), cast(KubeSlots, records),
                         monotonic=Clock())
    gate.closed([node("a"), node("b")],
                [slot(3, "a", rv="41"), dataclasses.replace(slot(0, "b", rv="42"), group="g")])
    # The global slot's version lets KubeSlots answer from its own write. A group slot
    # carries no record (the grant writes it on the global slot Lease): nothing is read
    # for it, least of all the global Lease that has the group slot's number.
    assert records.asked == [(3, "41")]
