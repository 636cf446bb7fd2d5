"""The health gate and the blockers: the record at the grant, the verdict at the release,
what a blocker's answer means, and what the planner does with them."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from cluo_coord.health import (
    BudgetBaseline,
    BudgetFacts,
    BudgetScope,
    ControllerHealth,
    ControllerRef,
    Health,
    PodFacts,
    WorkloadRecord,
    firing_alerts,
    gate_verdict,
    hold_changes,
    hold_kind,
    query_result_fires,
    record_workloads,
    selector_matches,
)
from cluo_coord.planner import (
    EmitEvent,
    MarkStuck,
    NodeView,
    Plan,
    Policy,
    ReleaseSlot,
    ResetRebootOk,
    SlotLease,
    plan,
)
from tests.unit.test_planner import NOW, node, of, slot

RS_WEB = ControllerRef("ReplicaSet", "shop", "web-5d9")
PDB_WEB = BudgetBaseline("shop", "web", 1)


def pod(namespace: str = "shop", *, kind: str | None = "ReplicaSet", name: str = "web-5d9",
        labels: dict[str, str] | None = None, **obj: Any) -> PodFacts:
    return PodFacts(namespace, labels if labels is not None else {"app": "web"},
                    (kind, name) if kind else None, **obj)


def budget(name: str = "web", selector: dict[str, Any] | None = None,
           allowed: int = 1, namespace: str = "shop") -> BudgetFacts:
    return BudgetFacts(namespace, name,
                       selector if selector is not None else {"matchLabels": {"app": "web"}},
                       allowed)


# --------------------------------------------------------------------------- the record


def test_record_names_the_controllers_and_budgets_of_the_pods_a_drain_evicts() -> None:
    pods = [
        pod(),
        pod(kind="StatefulSet", name="db", labels={"app": "db"}),
        pod(kind="ReplicationController", name="legacy", labels={}),
        pod(kind="DaemonSet", name="agent", labels={"app": "web"}),
        pod(kind=None),  # bare: not evicted
        pod(mirror=True, kind="Node", name="n1"),
        pod(finished=True, kind="ReplicaSet", name="old"),
        pod(kind="Job", name="backup", labels={"app": "backup"}),
    ]
    budgets = [budget(), budget("db", {"matchLabels": {"app": "db"}}, 0),
               budget("other", {"matchLabels": {"app": "other"}}),
               budget("web", namespace="elsewhere")]
    record = record_workloads("n1", pods, budgets)
    assert record.controllers == (RS_WEB,
                                  ControllerRef("ReplicationController", "shop", "legacy"),
                                  ControllerRef("StatefulSet", "shop", "db"))
    assert record.budgets == (BudgetBaseline("shop", "db", 0), PDB_WEB)


def test_a_budget_covering_only_a_daemonset_pod_is_not_recorded() -> None:
    record = record_workloads("n1", [pod(kind="DaemonSet", name="agent")], [budget()])
    assert record.empty


def test_record_survives_its_json_form() -> None:
    record = WorkloadRecord("n1", (RS_WEB,), (PDB_WEB,))
    text = record.to_json()
    assert len(text) < 120 and " " not in text
    assert WorkloadRecord.from_json(text) == record


@pytest.mark.parametrize("text", [
    "", "[]", '{"controllers": []}', '{"node": "n1", "controllers": ["Deployment/a/b"]}',
    '{"node": "n1", "controllers": ["ReplicaSet/nons"]}', '{"node": "n1", "pdbs": {"a": 1}}',
    '{"node": "n1", "pdbs": {"a/b": "many"}}',
])
def test_an_unreadable_record_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="not a workload record"):
        WorkloadRecord.from_json(text)


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    (None, {"app": "web"}, False),
    ({}, {"app": "web"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "web", "tier": "1"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]},
     {"app": "db"}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]},
     {"app": "web"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {}, False),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]}, {"app": "2"},
     False),
])
def test_selector_matches_as_the_api_does(selector: dict[str, Any] | None,
                                          labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(selector, labels) is matches


@pytest.mark.parametrize(("value", "selector"), [
    ("all", ""), ("ALL", ""), ("none", None), ("gate=true", "gate=true"),
])
def test_budget_scope_is_all_none_or_a_selector(value: str, selector: str | None) -> None:
    assert BudgetScope.parse(value).selector == selector


def test_budget_scope_refuses_an_empty_value() -> None:
    with pytest.raises(ValueError, match="'all', 'none' or a label selector"):
        BudgetScope.parse(" ")


# --------------------------------------------------------------------------- the verdict


def test_gate_is_open_once_every_replica_is_available_and_the_budget_recovered() -> None:
    record = WorkloadRecord("n1", (RS_WEB,), (PDB_WEB,))
    assert gate_verdict(record, {RS_WEB: ControllerHealth(3, 3)}, {("shop", "web"): 1}) is None
    assert gate_verdict(record, {RS_WEB: ControllerHealth(3, 4)}, {("shop", "web"): 2}) is None


def test_gate_stays_closed_while_replicas_are_missing_naming_them() -> None:
    record = WorkloadRecord("n1", (RS_WEB,), (PDB_WEB,))
    why = gate_verdict(record, {RS_WEB: ControllerHealth(3, 1)}, {("shop", "web"): 1})
    assert why == "ReplicaSet shop/web-5d9 has 1 of 3 replicas available"


def test_gate_stays_closed_while_a_budget_allows_fewer_disruptions_than_before() -> None:
    record = WorkloadRecord("n1", (RS_WEB,), (PDB_WEB,))
    why = gate_verdict(record, {RS_WEB: ControllerHealth(3, 3)}, {("shop", "web"): 0})
    assert why == ("PodDisruptionBudget shop/web allows 0 disruptions, 1 before the drain")


def test_a_gone_or_scaled_down_controller_and_a_gone_budget_count_as_recovered() -> None:
    record = WorkloadRecord("n1", (RS_WEB,), (PDB_WEB,))
    assert gate_verdict(record, {RS_WEB: None}, {("shop", "web"): None}) is None
    assert gate_verdict(record, {RS_WEB: ControllerHealth(0, 0)}, {("shop", "web"): 1}) is None


def test_what_was_not_read_keeps_the_gate_closed() -> None:
    record = WorkloadRecord("n1", (RS_WEB,), (PDB_WEB,))
    assert gate_verdict(record, {}, {}) == (
        "ReplicaSet shop/web-5d9 not read; PodDisruptionBudget shop/web not read")


def test_controller_health_reads_spec_replicas_and_available_replicas() -> None:
    assert ControllerHealth.from_object({"spec": {"replicas": 2},
                                         "status": {"availableReplicas": 1}}) == \
        ControllerHealth(2, 1)
    assert ControllerHealth.from_object({"spec": {}, "status": {}}) == ControllerHealth(1, 0)


# --------------------------------------------------------------------------- blockers


def vector(*series: dict[str, str]) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [1700000000, "1"]} for labels in series]}}


def test_a_query_fires_on_a_non_empty_result_only() -> None:
    assert query_result_fires(vector()) is None
    assert query_result_fires(vector({"job": "etcd"}, {"job": "api"})) == \
        "2 series (first: job=etcd)"
    assert query_result_fires({"status": "success", "data": {
        "resultType": "scalar", "result": [1700000000, "0"]}}) == "a scalar result (0)"


@pytest.mark.parametrize("body", [
    {"status": "error", "errorType": "bad_data", "error": "parse error"},
    {"status": "success", "data": {}},
])
def test_a_query_answer_that_is_no_result_cannot_be_read(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        query_result_fires(body)


def alerts(*named: tuple[str, str]) -> dict[str, Any]:
    return {"status": "success", "data": {"alerts": [
        {"labels": {"alertname": name}, "state": state} for name, state in named]}}


def test_firing_alerts_are_those_firing_less_those_the_filter_ignores() -> None:
    body = alerts(("Watchdog", "firing"), ("EtcdNoLeader", "firing"),
                  ("KubeNodeNotReady", "pending"), ("EtcdNoLeader", "firing"))
    assert firing_alerts(body, None) == ("EtcdNoLeader", "Watchdog")
    assert firing_alerts(body, re.compile("^Watchdog$")) == ("EtcdNoLeader",)
    assert firing_alerts(alerts(), None) == ()
    with pytest.raises(ValueError):
        firing_alerts({"status": "success", "data": {}}, None)


def test_holds_are_named_by_kind_and_their_starts_and_ends_are_told_apart() -> None:
    assert hold_kind("blocker: pods matching app=backup exist") == "blocker"
    assert hold_kind("paused: the roll is paused") == "paused"
    assert hold_kind("something") == "other"
    assert hold_changes(("window: closed", "blocker: a"), ("blocker: a", "blocker: b")) == (
        ("blocker: b",), ("window: closed",))


# --------------------------------------------------------------------------- the planner


def test_a_blocker_holds_every_new_slot_and_says_so() -> None:
    nodes = [node("a", needed=True), node("b", needed=True)]
    result = _plan(nodes, blockers=(
        "pods matching app=backup exist", "prometheus query 'up == 0' has a result"))
    assert result.changes == ()
    assert result.holds == ("blocker: pods matching app=backup exist",
                            "blocker: prometheus query 'up == 0' has a result")
    assert _plan(nodes).holds == ()


def test_a_holder_finishes_its_cycle_while_a_blocker_fires() -> None:
    done = node("a", rv="101", boot="boot-2")  # rebooted, reboot-needed=false
    result = _plan([done, node("b", needed=True)], [slot(0, "a")], blockers=("x",))
    assert [c.slot for c in of(result, ReleaseSlot)] == [0]
    assert result.holds == ("blocker: x",)


def test_a_closed_gate_keeps_the_slot_of_a_finished_cycle_until_it_opens() -> None:
    done = node("a", rv="101", boot="boot-2")
    closed = _plan([done, node("b", needed=True)], [slot(0, "a")],
                   gates={"a": "ReplicaSet shop/web has 1 of 2 replicas available"})
    assert of(closed, ReleaseSlot) == [] and of(closed, ResetRebootOk) == []
    opened = _plan([done], [slot(0, "a")])
    assert [c.slot for c in of(opened, ReleaseSlot)] == [0]


def test_the_gate_waits_after_the_after_reboot_hooks_too() -> None:
    back = node("a", ok=True, after_label=True, boot="boot-2")
    closed = _plan([back], [slot(0, "a")], gates={"a": "why"})
    assert closed.changes == ()
    assert of(_plan([back], [slot(0, "a")]), ReleaseSlot)


def test_a_gate_closed_past_the_reboot_timeout_marks_the_holder_stuck_saying_why() -> None:
    done = node("a", rv="101", boot="boot-2")
    late = slot(0, "a", acquired=NOW - timedelta(hours=2))
    result = _plan([done], [late], gates={"a": "ReplicaSet shop/web has 1 of 2"})
    assert of(result, MarkStuck) == [MarkStuck(0, "a", "7")]
    [event] = of(result, EmitEvent)
    assert "waiting for the workloads to recover: ReplicaSet shop/web has 1 of 2" in \
        event.message


def test_a_gate_is_not_consulted_for_a_cycle_cancelled_before_its_reboot() -> None:
    cancelled = node("a", rv="101")  # same boot: it never rebooted
    result = _plan([cancelled], [slot(0, "a")], gates={"a": "why"})
    assert [c.slot for c in of(result, ReleaseSlot)] == [0]


def _plan(nodes: list[NodeView], leases: list[SlotLease] | None = None, *,
          blockers: tuple[str, ...] = (), gates: dict[str, str] | None = None) -> Plan:
    return plan(nodes, leases or [], NOW, Policy(), health=Health(blockers, gates or {}))
