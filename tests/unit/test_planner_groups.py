"""Rule 15: groups, unavailability budgets, control-plane nodes and the canary; and the
parsers of their flags (label selectors, budgets, ``--group``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from cluo.errors import ConfigError, KubeError
from cluo_coord.config import load_settings
from cluo_coord.groups import (
    CONTROL_PLANE_LABEL,
    CONTROL_PLANE_SLOTS,
    DEFAULT_GROUP,
    Budget,
    Groups,
    GroupSpec,
    LabelSelector,
    group_slot_lease_name,
)
from cluo_coord.leases import SLOT_GROUP, lease_name, slot_from_object
from cluo_coord.metrics import CoordMetrics
from cluo_coord.planner import (
    AcquireSlot,
    EmitEvent,
    GrantRebootOk,
    LabelBeforeReboot,
    NodeView,
    Plan,
    Policy,
    ReleaseSlot,
    ResetRebootOk,
    SlotLease,
    counts_every_node,
    ignored_while_unslotted,
    plan,
)
from cluo_coord.status import slot_json
from tests.unit.coord_fakes import CoordRig
from tests.unit.test_planner import KEYS, NOW, node, slot
from tests.unit.test_planner_properties import (
    AFTER_HOOK,
    BEFORE_HOOK,
    START,
    Agents,
    FakeCluster,
    FakeLease,
    settle,
)

# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("", {}, True),
    ("role=worker", {"role": "worker"}, True),
    ("role==worker", {"role": "db"}, False),
    ("role!=worker", {}, True),
    ("role!=worker", {"role": "worker"}, False),
    ("zone in (a, b)", {"zone": "b"}, True),
    ("zone in (a,b)", {}, False),
    ("zone notin (a,b)", {}, True),
    ("zone notin (a,b)", {"zone": "a"}, False),
    ("node-role.kubernetes.io/control-plane", {CONTROL_PLANE_LABEL: ""}, True),
    ("!node-role.kubernetes.io/control-plane", {CONTROL_PLANE_LABEL: ""}, False),
    ("role=worker,zone in (a,b)", {"role": "worker", "zone": "c"}, False),
    ("role=worker, zone in (a,b)", {"role": "worker", "zone": "a"}, True),
])
def test_label_selector_matches_as_kubernetes_does(
        selector: str, labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector.parse(selector).matches(labels) is matches


@pytest.mark.parametrize(("selector", "complaint"), [
    ("zone in (a,b", "unbalanced '('"),
    ("zone in a,b)", "unbalanced ')'"),
    ("role=worker,,x", "empty term"),
    ("ro le=x", "'ro le=x' in 'ro le=x' is not a label key"),
    ("role=a b", "not a label key"),
    ("role=-x", "'-x' in 'role=-x' is not a label value"),
    ("zone in (a,-)", "'-' in 'zone in (a,-)' is not a label value"),
])
def test_label_selector_errors_name_the_term(selector: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        LabelSelector.parse(selector)


@pytest.mark.parametrize(("text", "total", "allowed"), [
    ("0", 10, 0), ("2", 10, 2), ("25%", 10, 3), ("25%", 4, 1), ("10%", 5, 1),
    ("100%", 7, 7), ("0%", 7, 0),
])
def test_budget_is_a_count_or_a_percentage_rounded_up(text: str, total: int,
                                                       allowed: int) -> None:
    assert Budget.parse(text).of(total) == allowed


@pytest.mark.parametrize("text", ["", "x", "-1", "1.5", "101%", "%"])
def test_budget_refuses_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError, match="percentage"):
        Budget.parse(text)


def test_group_flag_parses_name_selector_and_limits() -> None:
    spec = GroupSpec.parse("workers:role=worker;max-concurrent=2;max-unavailable=25%")
    assert (spec.name, spec.selector.text, spec.max_concurrent, str(spec.max_unavailable)) == (
        "workers", "role=worker", 2, "25%")


@pytest.mark.parametrize(("argv", "complaint"), [
    (["--group", "Workers:role=x"], "--group: 'Workers:role=x': group name 'Workers'"),
    (["--group", "w:role=x;max-concurrent=0"], "max-concurrent='0': must be a whole number"),
    (["--group", "w:role=x;max-unavailable=abc"], "max-unavailable='abc': not a number"),
    (["--group", "w:role=x;speed=2"], "'speed=2' is not max-concurrent=N"),
    (["--group", "w:role=x;max-concurrent=1;max-concurrent=2"], "max-concurrent given twice"),
    (["--group", "w:zone in (a"], "group 'w': unbalanced '('"),
    (["--group", "w"], "not NAME:SELECTOR"),
    (["--group", "w:a=b", "--group", "w:c=d"], "group 'w' is defined twice"),
    (["--max-unavailable", "200%"], "--max-unavailable: '200%': a percentage is at most 100%"),
    (["--group-max-concurrent", "0"], "--group-max-concurrent: '0': must be a whole number"),
    (["--canary-soak", "1m"], "--canary-soak '1m': needs --canary-group"),
    (["--canary-group", "bad name"], "--canary-group: 'bad name': not a group name"),
])
def test_group_flags_refuse_bad_values_naming_them(argv: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(argv, {})
    assert complaint in str(raised.value)


def test_group_flags_default_to_no_limits() -> None:
    policy = load_settings([], {}).policy
    assert (policy.groups, policy.max_unavailable, policy.canary_soak) == (
        Groups(), None, timedelta(0))


def test_group_flags_have_environment_twins() -> None:
    policy = load_settings([], {"CLUO_COORD_GROUP": "a:x=1\nb:y=2;max-concurrent=3",
                                "CLUO_COORD_MAX_UNAVAILABLE": "2"}).policy
    assert [spec.name for spec in policy.groups.specs] == ["a", "b"]
    assert policy.max_unavailable == Budget(count=2)


def test_node_is_in_the_first_matching_group_then_its_label_then_default() -> None:
    groups = Groups(specs=(GroupSpec.parse("a:zone=x"), GroupSpec.parse("b:zone")))
    assert groups.group_of({"zone": "x"}, KEYS.group) == "a"
    assert groups.group_of({"zone": "y", KEYS.group: "beta"}, KEYS.group) == "b"
    assert groups.group_of({KEYS.group: "beta"}, KEYS.group) == "beta"
    assert groups.group_of({}, KEYS.group) == DEFAULT_GROUP


def test_group_slot_lease_names_are_valid_and_tell_groups_apart() -> None:
    names = {group_slot_lease_name(group, 0) for group in ("Beta", "beta", "a_b", "a.b")}
    assert len(names) == 4
    assert all(len(name) <= 63 and name == name.lower() for name in names)


def test_group_slot_lease_round_trips_through_its_object() -> None:
    name = lease_name(2, "beta")
    lease = slot_from_object({"metadata": {"name": name, "resourceVersion": "5",
                                           "annotations": {SLOT_GROUP: "beta"}},
                              "spec": {"holderIdentity": "n1"}})
    assert lease == SlotLease(2, "n1", resource_version="5", group="beta")
    assert slot_from_object({"metadata": {"name": "cluo-reboot-slot-1"}}) == SlotLease(1)


# --------------------------------------------------------------------------- planning


def member(name: str, group: str = "", *, cp: bool = False, **kwargs: object) -> NodeView:
    view = node(name, **kwargs)  # type: ignore[arg-type]
    labels = {KEYS.group: group} if group else {}
    if cp:
        labels[CONTROL_PLANE_LABEL] = ""
    return replace(view, labels=labels)


def acquired(result: Plan) -> list[tuple[str, str, int]]:
    """(node, group, index) of each AcquireSlot, global slots as group ''."""
    return [(c.node, c.group, c.slot) for c in result.changes if isinstance(c, AcquireSlot)]


def group_slot(group: str, index: int, holder: str | None = None, **kwargs: object
               ) -> SlotLease:
    return replace(slot(index, holder, **kwargs), group=group)  # type: ignore[arg-type]


GROUPED = Policy(max_concurrent=3, groups=Groups(max_concurrent=1))


def test_each_group_takes_its_own_slot_then_a_global_one() -> None:
    nodes = [member("a1", "a", needed=True), member("a2", "a", needed=True),
             member("b1", "b", needed=True)]
    result = plan(nodes, [], NOW, GROUPED)
    assert acquired(result) == [("a1", "a", 0), ("a1", "", 0), ("b1", "b", 0), ("b1", "", 1)]
    assert "max-concurrent: group a has 1 node(s) in flight, its max-concurrent 1" in (
        result.holds)


def test_group_limit_of_its_own_beats_the_default() -> None:
    policy = replace(GROUPED, groups=Groups(
        specs=(GroupSpec.parse("a:group=a;max-concurrent=2"),), max_concurrent=1))
    nodes = [member(f"a{i}", "a", needed=True) for i in range(3)]
    assert [n for n, g, _ in acquired(plan(nodes, [], NOW, policy)) if g] == ["a0", "a1"]


def test_no_groups_configured_takes_no_group_slots() -> None:
    nodes = [member("a1", "a", needed=True), member("a2", "a", needed=True)]
    result = plan(nodes, [], NOW, Policy(max_concurrent=2))
    assert acquired(result) == [("a1", "", 0), ("a2", "", 1)]


def test_group_in_flight_counts_nodes_a_stale_grant_left_in_flight() -> None:
    nodes = [member("a1", "a", ok=True, needed=True), member("a2", "a", needed=True)]
    result = plan(nodes, [], NOW, GROUPED)
    assert acquired(result) == []


def test_grant_carries_the_group_slot_it_needs() -> None:
    nodes = [member("a1", "a", needed=True, before_label=True)]
    leases = [slot(0, "a1"), group_slot("a", 0, "a1", rv="9")]
    grant = next(c for c in plan(nodes, leases, NOW, GROUPED).changes
                 if isinstance(c, GrantRebootOk))
    assert grant.group_slots == (("a", 0, "9"),)


def test_holder_without_its_group_slot_gets_one_before_its_grant() -> None:
    nodes = [member("a1", "a", needed=True, before_label=True)]
    result = plan(nodes, [slot(0, "a1")], NOW, GROUPED)
    assert not any(isinstance(c, GrantRebootOk) for c in result.changes)
    assert acquired(result) == [("a1", "a", 0)]


def test_holder_without_its_group_slot_waits_while_the_group_is_full() -> None:
    nodes = [member("a1", "a", needed=True, before_label=True),
             member("a2", "a", ok=True, needed=True)]
    leases = [slot(0, "a1"), slot(1, "a2"), group_slot("a", 0, "a2")]
    result = plan(nodes, leases, NOW, GROUPED)
    assert not any(isinstance(c, GrantRebootOk | AcquireSlot) for c in result.changes)


def test_node_holding_only_a_group_slot_takes_a_global_one_first() -> None:
    nodes = [member("a2", "a", needed=True, since=NOW - timedelta(hours=2)),
             member("a1", "a", needed=True)]
    result = plan(nodes, [group_slot("a", 0, "a1")], NOW, GROUPED)
    assert acquired(result) == [("a1", "", 0)]


def test_node_holding_only_a_group_slot_it_no_longer_needs_gives_it_back() -> None:
    nodes = [member("a1", "a", needed=False, rv="50")]
    result = plan(nodes, [group_slot("a", 0, "a1", rv="9")], NOW, GROUPED)
    assert result.changes[:2] == (
        ResetRebootOk("a1", "50", ()), ReleaseSlot(0, "a1", "9", NOW, group="a"))


def test_node_holding_only_a_group_slot_keeps_it_while_notready() -> None:
    """A holder of a global slot would go on from this Node version: giving the group
    slot back could let a plan from another view of the Leases grant it without one."""
    nodes = [member("a1", "a", needed=True, ready=False)]
    result = plan(nodes, [group_slot("a", 0, "a1")], NOW, GROUPED)
    assert not any(isinstance(c, ReleaseSlot | AcquireSlot) for c in result.changes)


def test_finished_cycle_releases_the_group_slot_too() -> None:
    nodes = [member("a1", "a", needed=False, boot="boot-2")]
    result = plan(nodes, [slot(0, "a1"), group_slot("a", 0, "a1")], NOW, GROUPED)
    released = [(c.group, c.slot) for c in result.changes if isinstance(c, ReleaseSlot)]
    assert released == [("", 0), ("a", 0)]


def test_gone_node_frees_its_group_slots() -> None:
    result = plan([], [group_slot("a", 0, "a1")], NOW, GROUPED)
    assert [c for c in result.changes if isinstance(c, ReleaseSlot)] == [
        ReleaseSlot(0, "a1", "7", NOW, holder_gone=True, group="a")]


def test_released_group_slot_rests_like_a_global_one() -> None:
    policy = replace(GROUPED, delay_between_reboots=timedelta(minutes=10))
    leases = [group_slot("a", 0, released_at=NOW - timedelta(minutes=4))]
    result = plan([member("a1", "a", needed=True)], leases, NOW, policy)
    assert acquired(result) == []
    assert result.recheck_after == timedelta(minutes=6)


# --- max-unavailable


def test_max_unavailable_counts_notready_cordoned_and_deleting_nodes() -> None:
    nodes = [member("a", needed=True), member("b", ready=False), member("c", cordoned=True),
             replace(member("d"), deleting=True), member("e")]
    result = plan(nodes, [], NOW, Policy(max_unavailable=Budget(count=3)))
    assert acquired(result) == []
    assert result.holds == (
        "max-unavailable: 3 of 5 nodes unavailable (b NotReady, c cordoned, d being "
        "deleted), max-unavailable 3",)
    assert acquired(plan(nodes, [], NOW, Policy(max_unavailable=Budget(count=4)))) == [
        ("a", "", 0)]


def test_max_unavailable_counts_nodes_in_flight_once() -> None:
    nodes = [member("a", needed=True), member("b", needed=True, ok=True, cordoned=True,
                                               marked=True), member("c")]
    result = plan(nodes, [slot(0, "b")], NOW,
                  Policy(max_concurrent=3, max_unavailable=Budget(count=2)))
    assert acquired(result) == [("a", "", 1)]


def test_max_unavailable_bounds_the_global_slots_taken() -> None:
    nodes = [member(n, needed=True) for n in "abcd"]
    result = plan(nodes, [], NOW, Policy(max_concurrent=3, max_unavailable=Budget(percent=50)))
    assert acquired(result) == [("a", "", 0), ("b", "", 1)]


def test_admin_cordoned_candidate_does_not_add_to_the_unavailable() -> None:
    nodes = [member("a", needed=True, cordoned=True), member("b", ready=False)]
    result = plan(nodes, [], NOW, Policy(max_unavailable=Budget(count=2)))
    assert acquired(result) == [("a", "", 0)]


def test_group_max_unavailable_holds_only_that_group() -> None:
    policy = Policy(max_concurrent=3, groups=Groups(
        specs=(GroupSpec.parse("a:group=a;max-unavailable=1"),)))
    nodes = [member("a1", "a", needed=True), member("a2", "a", ready=False),
             member("b1", "b", needed=True)]
    result = plan(nodes, [], NOW, policy)
    assert acquired(result) == [("b1", "", 0)]
    assert result.holds == ("max-unavailable: 1 of 2 nodes of group a unavailable (a2 "
                            "NotReady), its max-unavailable 1",)


def test_unavailable_nodes_are_never_ignored_by_the_driver() -> None:
    assert ignored_while_unslotted(member("a"))
    assert not ignored_while_unslotted(member("a", ready=False))
    assert not ignored_while_unslotted(member("a", cordoned=True))
    assert not ignored_while_unslotted(replace(member("a"), deleting=True))
    assert not counts_every_node(Policy(groups=Groups(max_concurrent=1)))
    assert counts_every_node(Policy(max_unavailable=Budget(count=1)))
    assert counts_every_node(Policy(groups=Groups(max_unavailable=Budget(percent=10))))


# --- control-plane nodes


def test_control_plane_nodes_go_one_at_a_time() -> None:
    nodes = [member("cp1", cp=True, needed=True), member("cp2", cp=True, needed=True)]
    result = plan(nodes, [], NOW, Policy(max_concurrent=2))
    assert acquired(result) == [("cp1", CONTROL_PLANE_SLOTS, 0), ("cp1", "", 0)]
    assert any(hold.startswith("control-plane: ") for hold in result.holds)


def test_no_control_plane_node_goes_while_another_is_unhealthy() -> None:
    nodes = [member("cp1", cp=True, needed=True), member("cp2", cp=True, ready=False),
             member("w1", needed=True)]
    result = plan(nodes, [], NOW, Policy(max_concurrent=2))
    assert acquired(result) == [("w1", "", 0)]
    assert result.holds == ("control-plane: one control-plane node at a time, and none "
                            "while another is unavailable (cp2 NotReady)",)


def test_control_plane_node_holding_its_slot_waits_for_the_global_one_too() -> None:
    # Its control-plane slot taken in a plan cut short; then cp2 went NotReady.
    nodes = [member("cp1", cp=True, needed=True), member("cp2", cp=True, ready=False)]
    result = plan(nodes, [group_slot(CONTROL_PLANE_SLOTS, 0, "cp1")], NOW,
                  Policy(max_concurrent=2))
    assert acquired(result) == []
    assert result.holds == ("control-plane: one control-plane node at a time, and none "
                            "while another is unavailable (cp2 NotReady)",)


# --- the canary


CANARY = Policy(max_concurrent=2, groups=Groups(canary="canary"),
                canary_soak=timedelta(minutes=30))


def test_canary_goes_first_and_the_others_wait() -> None:
    nodes = [member("c1", "canary", needed=True, since=NOW),
             member("w1", "workers", needed=True, since=NOW - timedelta(hours=1))]
    result = plan(nodes, [], NOW, CANARY)
    assert acquired(result) == [("c1", "canary", 0), ("c1", "", 0)]
    assert result.holds == ("canary: group canary goes first, then soaks 0:30:00; its "
                            "nodes not done yet: c1",)


def test_others_wait_out_the_soak_after_the_canary_release() -> None:
    nodes = [member("c1", "canary"), member("w1", "workers", needed=True)]
    leases = [group_slot("canary", 0, released_at=NOW - timedelta(minutes=10))]
    result = plan(nodes, leases, NOW, CANARY)
    assert acquired(result) == []
    assert result.recheck_after == timedelta(minutes=20)
    assert result.holds[0].startswith("canary: group canary soaks 0:30:00 after its last")
    later = plan(nodes, leases, NOW + timedelta(minutes=20), CANARY)
    assert acquired(later) == [("w1", "", 0)]


def test_others_go_when_no_canary_node_needs_a_reboot() -> None:
    nodes = [member("c1", "canary"), member("w1", "workers", needed=True)]
    assert acquired(plan(nodes, [], NOW, CANARY)) == [("w1", "", 0)]


def test_a_canary_node_in_flight_holds_the_others() -> None:
    nodes = [member("c1", "canary", ok=True, needed=True), member("w1", "workers",
                                                                  needed=True)]
    result = plan(nodes, [slot(0, "c1"), group_slot("canary", 0, "c1")], NOW, CANARY)
    assert acquired(result) == []


def test_holder_of_only_a_control_plane_slot_held_by_the_canary_gives_it_back() -> None:
    """node-2 holds the control-plane slot alone (a plan cut short) and waits behind the
    canary; node-3, of the canary group, needs that very slot: node-2 gives it back (after
    a reset, as rule 15 says) and takes it again when its turn comes, so the roll ends."""
    grouping = {"node-0": "b", "node-1": "b", "node-2": "c", "node-3": "a"}
    labels = {name: {KEYS.group: group} for name, group in grouping.items()}
    for name in ("node-2", "node-3"):
        labels[name][CONTROL_PLANE_LABEL] = ""
    cluster = FakeCluster(list(grouping), None, labels)
    agents = Agents(cluster)
    for name in grouping:
        agents.request_reboot(name, START)
    holder = cluster.nodes["node-2"]
    cluster.leases[CONTROL_PLANE_SLOTS, 0] = FakeLease(
        0, cluster.bump(), "node-2", START, holder.boot_id, holder_uid=holder.uid,
        group=CONTROL_PLANE_SLOTS)
    policy = Policy(max_concurrent=3, before_reboot_annotations=(BEFORE_HOOK,),
                    after_reboot_annotations=(AFTER_HOOK,), reboot_timeout=timedelta(hours=1),
                    groups=Groups(canary="a"))
    booted = {name: node.boot_id for name, node in cluster.nodes.items()}
    first = plan(cluster.node_views(), cluster.lease_views(), START, policy)
    assert [(c.node, c.group) for c in first.changes if isinstance(c, ReleaseSlot)] == [
        ("node-2", CONTROL_PLANE_SLOTS)]
    settle(cluster, agents, policy, START)  # fails when nothing moves
    assert all(node.boot_id != booted[name] for name, node in cluster.nodes.items())


def test_holder_of_only_a_group_slot_waiting_for_room_gives_it_back() -> None:
    # cp1's role came after it took the global slot; cp2's control-plane slot was taken
    # in a plan cut short. cp1 waits for that slot, cp2 for cp1's global one.
    nodes = [member("cp1", cp=True, needed=True, before_label=True, since=NOW),
             member("cp2", cp=True, needed=True, rv="7")]
    leases = [slot(0, "cp1"), group_slot(CONTROL_PLANE_SLOTS, 0, "cp2", rv="9")]
    result = plan(nodes, leases, NOW, Policy(max_concurrent=1))
    assert acquired(result) == []
    assert result.changes == (ResetRebootOk("cp2", "7", ()),
                              ReleaseSlot(0, "cp2", "9", NOW, group=CONTROL_PLANE_SLOTS))


def test_label_before_reboot_follows_the_global_slot() -> None:
    hooks = replace(GROUPED, before_reboot_annotations=("hook",))
    result = plan([member("a1", "a", needed=True)], [], NOW, hooks)
    kinds = [type(c).__name__ for c in result.changes if isinstance(
        c, AcquireSlot | LabelBeforeReboot | GrantRebootOk)]
    assert kinds == ["AcquireSlot", "AcquireSlot", "LabelBeforeReboot"]


def test_without_hooks_the_grant_follows_the_group_and_global_slots_in_one_plan() -> None:
    result = plan([member("a1", "a", needed=True, rv="50")],
                  [slot(0, rv="3"), group_slot("a", 0, rv="4")], NOW, GROUPED)
    assert [(type(c).__name__, getattr(c, "group", None)) for c in result.changes
            if not isinstance(c, EmitEvent)] == [
        ("AcquireSlot", "a"), ("AcquireSlot", ""), ("GrantRebootOk", None)]
    assert all(c.grant_follows for c in result.changes if isinstance(c, AcquireSlot))
    grant = next(c for c in result.changes if isinstance(c, GrantRebootOk))
    assert grant == GrantRebootOk("a1", 0, "50", "", (), group_slots=(("a", 0, ""),),
                                  after_acquire=True)


def test_a_group_slot_held_before_is_checked_at_its_version_in_a_folded_grant() -> None:
    # a1's group slot was taken in a plan cut short: the grant expects its version.
    result = plan([member("a1", "a", needed=True)], [group_slot("a", 0, "a1", rv="9")],
                  NOW, GROUPED)
    grant = next(c for c in result.changes if isinstance(c, GrantRebootOk))
    assert grant.after_acquire and grant.group_slots == (("a", 0, "9"),)


# --- the driver: rule 3 for the group slots


def lease_object(index: int, group: str, holder: str, version: str) -> dict[str, Any]:
    annotations = {SLOT_GROUP: group} if group else {}
    return {"metadata": {"name": lease_name(index, group), "resourceVersion": version,
                         "annotations": annotations},
            "spec": {"holderIdentity": holder}}


def test_a_grant_is_refused_when_its_group_slot_lease_changed_since_the_plan() -> None:
    leases = {lease_name(0): lease_object(0, "", "a1", "5"),
              lease_name(0, "a"): lease_object(0, "a", "a1", "8")}

    class UncachedReads:
        def read_lease(self, name: str) -> dict[str, Any] | None:
            return leases.get(name)

    rig = CoordRig()
    rig.coordinator._writer = UncachedReads()  # type: ignore[assignment]
    grant = GrantRebootOk("a1", 0, "1", "5", group_slots=(("a", 0, "8"),))
    rig.coordinator._check_slot_unchanged(grant)  # both Leases as planned: granted
    leases[lease_name(0, "a")] = lease_object(0, "a", "a2", "9")  # another node has it now
    with pytest.raises(KubeError) as refused:
        rig.coordinator._check_slot_unchanged(grant)
    assert refused.value.kind == "conflict"
    assert lease_name(0, "a") in str(refused.value)


def test_status_view_names_a_group_slot_by_its_lease() -> None:
    held = replace(slot(1, "a1"), group="a")
    assert slot_json(held, NOW)["slot"] == group_slot_lease_name("a", 1)
    assert slot_json(slot(1, "a1"), NOW)["slot"] == "cluo-reboot-slot-1"


def test_group_gauges_follow_the_plan_and_a_group_gone_reads_zero() -> None:
    metrics = CoordMetrics()
    result = plan([member("a1", "a", needed=True), member("a2", "a", needed=True),
                   member("b1", "b", ready=False)], [], NOW, GROUPED)
    metrics.observe_groups(result.groups, len(result.unavailable))
    text = metrics.exposition().decode()
    assert 'cluo_group_nodes_in_flight{group="a"} 0.0' in text  # granted in this plan
    assert 'cluo_group_nodes_queued{group="a"} 2.0' in text
    assert "cluo_nodes_unavailable 1.0" in text
    metrics.observe_groups((), 0)
    assert 'cluo_group_nodes_queued{group="a"} 0.0' in metrics.exposition().decode()


def test_a_folded_grant_checks_its_group_slots_by_the_acquisitions_compare_and_swaps() -> None:
    """Without hooks: the group and global slots taken, then the grant, in one plan; the
    group slot taken in this plan is not read again (its CAS was the check), one held
    before is; a grant for which this plan took no such slot is refused."""
    done: list[tuple[str, ...]] = []
    leases = {lease_name(1, "b"): lease_object(1, "b", "a1", "8")}

    class Slots:
        def acquire(self, change: AcquireSlot, workloads: str | None = None) -> SlotLease:
            done.append(("acquire", change.group, str(change.slot)))
            return SlotLease(change.slot, change.node, f"v{len(done)}", group=change.group)

    class Writer:
        def read_lease(self, name: str) -> dict[str, Any] | None:
            done.append(("read", name))
            return leases.get(name)

        def patch_node(self, name: str, patch: object, version: str, *,
                       unschedulable: bool | None = None) -> dict[str, Any]:
            done.append(("grant", name, version))
            return {}

    class Cache:
        def put_slot(self, slot: object) -> None: ...
        def put_node(self, obj: object) -> None: ...

    rig = CoordRig()
    coordinator = rig.coordinator
    coordinator._slots, coordinator._writer = Slots(), Writer()  # type: ignore[assignment]
    coordinator._cache = Cache()  # type: ignore[assignment]
    grant = GrantRebootOk("a1", 0, "50", "", group_slots=(("a", 0, ""), ("b", 1, "8")),
                          after_acquire=True)
    for change in (AcquireSlot(0, "a1", "4", "boot", NOW, group="a", grant_follows=True),
                   AcquireSlot(0, "a1", "3", "boot", NOW, grant_follows=True), grant):
        coordinator._apply(change, {})
    assert done == [("acquire", "a", "0"), ("acquire", "", "0"),
                    ("read", lease_name(1, "b")), ("grant", "a1", "50")]
    coordinator._apply(AcquireSlot(0, "a1", "3", "boot", NOW, grant_follows=True), {})
    with pytest.raises(KubeError) as refused:  # no group slot a taken for it this plan
        coordinator._apply(grant, {})
    assert refused.value.kind == "conflict" and lease_name(0, "a") in str(refused.value)
