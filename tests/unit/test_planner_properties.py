"""Property test: never more nodes in flight than allowed, whatever happens.

A small model of the cluster (Nodes and slot Leases with resource versions) plays the
agents, the kubelets, hook DaemonSets, admins and the clock at random, and runs the
planner the way the driver does, including the ways drivers go wrong: plans computed from
old snapshots (nodes and leases of different ages, as two informer caches can be),
plans applied only in part (a crash after any change), restarts (a plan from the cluster
alone, since the planner keeps no memory). Coordinator writes are compare-and-swap on the
resource version the change carries; a conflict stops the plan, as in the driver.

In flight: a slot Lease names the node, or it has reboot-ok=true, or reboot-in-progress=true,
or it is cordoned by cluo (unless an admin released it with release-slot=true, which takes
it out of the count). Cordoned by cluo: spec.unschedulable with the agent's
agent-made-unschedulable=true; never more such nodes than allowed either. A node whose
drain failed is never granted while it backs off or is out of the roll (rule 13), and
once an admin puts the nodes out of the roll back, every reboot gets done.

Groups and budgets (rule 15), under the same races: never more nodes of a group granted
(reboot-ok, in progress, cordoned by cluo) than its max-concurrent, each holding one of
the group's slots, nor more control-plane nodes than one; cluo's own nodes in flight
never more than max-unavailable allows; and a plan made from a current view takes a slot
only if the nodes unavailable (NotReady, cordoned, in flight) stay within max-unavailable,
no control-plane node's while another is unavailable, and no other group's while the
canary group is not done or soaking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cluo.protocol import FALSE, TRUE, Keys, NodeProtocolState
from cluo_coord.groups import CONTROL_PLANE_LABEL, CONTROL_PLANE_SLOTS, Budget, Groups
from cluo_coord.planner import (
    AcquireSlot,
    Change,
    EmitEvent,
    GrantRebootOk,
    LabelAfterReboot,
    LabelBeforeReboot,
    MarkStuck,
    NodeView,
    Plan,
    Policy,
    ReleaseSlot,
    ResetRebootOk,
    SlotLease,
    counts_every_node,
    drain_backoff_until,
    ignored_while_unslotted,
    plan,
    reboot_needed_since,
)
from cluo_coord.windows import parse_windows

KEYS = Keys()
BEFORE_HOOK = "hooks.example.com/before"
AFTER_HOOK = "hooks.example.com/after"
START = datetime(2024, 1, 1, tzinfo=UTC)
HISTORY = 8


class Conflict(Exception):
    """The object changed since the plan was computed (HTTP 409)."""


@dataclass
class FakeNode:
    name: str
    boot_id: str
    runs_coordinator: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    ready: bool = True
    ready_since: datetime | None = START
    up: bool = True
    unschedulable: bool = False
    resource_version: int = 0
    uid: str = ""

    def flag(self, key: str) -> bool:
        return self.annotations.get(key) == TRUE

    @property
    def state(self) -> NodeProtocolState:
        return NodeProtocolState.from_metadata(KEYS, self.annotations, self.labels)


@dataclass
class FakeLease:
    index: int
    resource_version: int
    holder: str | None = None
    acquired_at: datetime | None = None
    holder_boot_id: str = ""
    released_at: datetime | None = None
    stuck: bool = False
    holder_uid: str = ""
    group: str = ""


LeaseKey = tuple[str, int]  # (group, index); group "" for the global slots


class FakeCluster:
    """Nodes and Leases with etcd-like resource versions (one counter, bumped on change)."""

    def __init__(self, names: list[str], coordinator_on: str | None,
                 labels: dict[str, dict[str, str]] | None = None) -> None:
        self.revision = 0
        self.boots = 0
        self.coordinator_on = coordinator_on
        self.nodes: dict[str, FakeNode] = {}
        self.static_labels = labels or {}  # a node's group and role labels, kept when re-created
        for name in names:
            self.register(name)
        self.leases: dict[LeaseKey, FakeLease] = {}
        # Sees each slot a plan made from the current view is about to take (the node's
        # view and the slot's group); None for plans from old views.
        self.on_acquire: Callable[[FakeNode, str, str], None] | None = None
        self.events: list[EmitEvent] = []
        # (group, index) -> the version an AcquireSlot with grant_follows wrote, for the
        # grant that follows it in the plan (GrantRebootOk.after_acquire), as the driver
        self.taken: dict[LeaseKey, int] = {}
        # Sees each node a grant is about to be written to (its state before the grant),
        # and the time of the plan being applied.
        self.on_grant: Callable[[FakeNode], None] = lambda node: None
        self.planned_at = START

    def bump(self) -> int:
        self.revision += 1
        return self.revision

    def new_boot_id(self) -> str:
        self.boots += 1
        return f"boot-{self.boots}"

    def register(self, name: str, *, ready: bool = True) -> None:
        """A Node object is created (again): a new uid, no annotations."""
        boot_id = self.new_boot_id()
        self.nodes[name] = FakeNode(
            name, boot_id, runs_coordinator=name == self.coordinator_on, ready=ready,
            ready_since=START if ready else None, resource_version=self.bump(),
            uid=f"uid-{boot_id}", labels=dict(self.static_labels.get(name, {})),
        )

    # ------------------------------------------------------------------ reading

    def node_views(self) -> tuple[NodeView, ...]:
        views = []
        for node in self.nodes.values():
            state = node.state
            views.append(
                NodeView(
                    name=node.name,
                    state=state,
                    resource_version=str(node.resource_version),
                    uid=node.uid,
                    ready=node.ready,
                    ready_since=node.ready_since if node.ready else None,
                    boot_id=node.boot_id,
                    annotations=dict(node.annotations),
                    unschedulable=node.unschedulable,
                    runs_coordinator=node.runs_coordinator,
                    reboot_needed_since=reboot_needed_since(state),
                    labels=dict(node.labels),
                )
            )
        return tuple(views)

    def lease_views(self) -> tuple[SlotLease, ...]:
        return tuple(
            SlotLease(
                index=lease.index,
                holder=lease.holder,
                resource_version=str(lease.resource_version),
                acquired_at=lease.acquired_at,
                holder_boot_id=lease.holder_boot_id,
                released_at=lease.released_at,
                stuck=lease.stuck,
                holder_uid=lease.holder_uid,
                group=lease.group,
            )
            for lease in self.leases.values()
        )

    def in_flight(self) -> set[str]:
        """Named by a global slot, or flagged (a node holding only group slots is not)."""
        holders = self.holders()
        flagged = {
            node.name
            for node in self.nodes.values()
            if (node.flag(KEYS.reboot_ok) or node.flag(KEYS.reboot_in_progress))
            and not node.flag(KEYS.release_slot)
        }
        return holders | flagged

    def cordoned_by_cluo(self) -> set[str]:
        """Unschedulable because an agent cordoned them, and not released by an admin."""
        return {
            node.name
            for node in self.nodes.values()
            if node.unschedulable
            and node.flag(KEYS.agent_made_unschedulable)
            and not node.flag(KEYS.release_slot)
        }

    def holders(self, group: str = "") -> set[str]:
        """The nodes the global slots (or ``group``'s slots) name."""
        return {lease.holder for lease in self.leases.values()
                if lease.holder and lease.group == group}

    def granted(self) -> set[str]:
        """reboot-ok, reboot-in-progress or cordoned by cluo (an admin release aside)."""
        return {name for name, node in self.nodes.items()
                if (node.flag(KEYS.reboot_ok) or node.flag(KEYS.reboot_in_progress)
                    or (node.unschedulable and node.flag(KEYS.agent_made_unschedulable)))
                and not node.flag(KEYS.release_slot)}

    def unavailable(self) -> set[str]:
        """NotReady, cordoned (by anyone) or in flight."""
        return self.in_flight() | {name for name, node in self.nodes.items()
                                   if not node.ready or node.unschedulable}

    # ------------------------------------------------------------------ writing

    def write_node(
        self,
        name: str,
        annotations: dict[str, str | None] | None = None,
        labels: dict[str, str | None] | None = None,
        **status: object,
    ) -> None:
        """A write by someone who reads the object first (agent, kubelet, hook, admin)."""
        node = self.nodes[name]
        changed = _merge(node.annotations, annotations or {})
        changed |= _merge(node.labels, labels or {})
        for attribute, value in status.items():
            if getattr(node, attribute) != value:
                setattr(node, attribute, value)
                changed = True
        if changed:
            node.resource_version = self.bump()

    def apply(self, change: Change) -> None:
        """A coordinator write: compare-and-swap on the version the change carries."""
        match change:
            case EmitEvent():
                self.events.append(change)
            case AcquireSlot(slot=index, expected_resource_version=expected):
                key = (change.group, index)
                lease = self.leases.get(key)
                if expected is None:
                    if lease is not None:
                        raise Conflict(f"lease {key} exists")
                    lease = self.leases[key] = FakeLease(index, 0, group=change.group)
                elif lease is None or str(lease.resource_version) != expected:
                    raise Conflict(f"lease {key}")
                if change.handed_from and lease.holder != change.handed_from:
                    raise AssertionError(f"{change} hands over a slot {lease.holder} holds")
                if change.handed_from in self.granted():  # global and group slots alike
                    raise AssertionError(f"{change} hands over before its giver's reset")
                if self.on_acquire is not None and change.node in self.nodes:
                    self.on_acquire(self.nodes[change.node], change.group, change.handed_from)
                lease.holder = change.node
                lease.acquired_at = change.at
                lease.holder_boot_id = change.holder_boot_id
                lease.holder_uid = change.holder_uid
                lease.released_at = None
                lease.stuck = False
                lease.resource_version = self.bump()
                if change.grant_follows:
                    self.taken[key] = lease.resource_version
            case ReleaseSlot(slot=index) | MarkStuck(slot=index):
                lease = self.leases.get((change.group, index))
                if lease is None or str(lease.resource_version) != change.expected_resource_version:
                    raise Conflict(f"lease {index}")
                if isinstance(change, ReleaseSlot) and change.holder_gone and (
                        change.node in self.nodes):
                    raise Conflict(f"node {change.node} is not gone")  # the uncached read
                if isinstance(change, MarkStuck):
                    lease.stuck = True
                else:
                    lease.holder = None
                    lease.acquired_at = None
                    lease.holder_boot_id = ""
                    lease.holder_uid = ""
                    lease.released_at = change.at
                    lease.stuck = False
                lease.resource_version = self.bump()
            case LabelBeforeReboot() | GrantRebootOk() | LabelAfterReboot() | ResetRebootOk():
                node = self.nodes.get(change.node)
                if node is None or str(node.resource_version) != change.expected_resource_version:
                    raise Conflict(f"node {change.node}")
                if isinstance(change, GrantRebootOk):
                    for group, index, planned in (
                            ("", change.slot, change.expected_lease_resource_version),
                            *change.group_slots):
                        lease = self.leases.get((group, index))
                        expected = planned  # or, empty: as taken in this plan
                        if change.after_acquire and not planned:
                            expected = str(self.taken.pop((group, index), "none"))
                        if lease is None or str(lease.resource_version) != expected:
                            raise Conflict(f"lease {(group, index)} (grant precondition)")
                    self.on_grant(node)
                patch = change.patch(KEYS)
                uncordon = isinstance(change, ResetRebootOk) and change.uncordon
                self.write_node(change.node, dict(patch.annotations), dict(patch.labels),
                                **({"unschedulable": False} if uncordon else {}))
            case _:  # pragma: no cover - every Change is handled above
                raise AssertionError(f"unknown change {change!r}")

    def apply_plan(self, result: Plan, limit: int | None = None) -> int:
        """Apply in order, stopping at the first conflict or after ``limit`` changes."""
        applied = 0
        for change in result.changes[:limit]:
            try:
                self.apply(change)
            except Conflict:
                break
            applied += 1
        return applied


def _merge(target: dict[str, str], patch: dict[str, str | None]) -> bool:
    changed = False
    for key, value in patch.items():
        if value is None:
            changed |= target.pop(key, None) is not None
        elif target.get(key) != value:
            target[key] = value
            changed = True
    return changed


# ---------------------------------------------------------------------- behaviour of others


class Agents:
    """What well-behaved cluo agents, kubelets and hooks do, one node at a time."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def request_reboot(self, name: str, now: datetime) -> None:
        self.cluster.write_node(name, {
            KEYS.reboot_needed: TRUE,
            KEYS.last_checked_time: str(int(now.timestamp())),
        }, {KEYS.reboot_needed: TRUE})

    def withdraw_request(self, name: str) -> None:
        self.cluster.write_node(name, {KEYS.reboot_needed: FALSE}, {KEYS.reboot_needed: FALSE})

    def start(self, name: str) -> None:
        """The grant taken (the mark and the cordon unless an admin cordoned the node) and
        the drain's end (the boot id), as the agent does (the agent's W2 and W3; the mark
        and the cordon are one write there, two here as an older agent made them)."""
        node = self.cluster.nodes[name]
        mark = {} if node.unschedulable else {KEYS.agent_made_unschedulable: TRUE}
        self.cluster.write_node(name, {
            KEYS.reboot_in_progress: TRUE,
            KEYS.blocked_reason: None,
            **mark,
        })
        self.cluster.write_node(name, unschedulable=True)
        self.cluster.write_node(name, {KEYS.boot_id_before_reboot: node.boot_id})

    def uncordon(self, name: str) -> None:
        """The uncordon (only what the agent cordoned) and the mark cleared: the agent's W5,
        one write there, two here as an older agent made them."""
        node = self.cluster.nodes[name]
        if node.flag(KEYS.agent_made_unschedulable) and node.unschedulable:
            self.cluster.write_node(name, unschedulable=False)
        self.cluster.write_node(name, {
            KEYS.agent_made_unschedulable: None, KEYS.boot_id_before_reboot: None,
        })

    def abort(self, name: str) -> None:
        """The agent gives up before its reboot (a drain timeout, a withdrawn grant): no
        boot id stays recorded, as none is before the drain is done."""
        self.cluster.write_node(name, {
            KEYS.reboot_in_progress: FALSE,
            KEYS.blocked_reason: "PDB web allows 0 disruptions",
            KEYS.boot_id_before_reboot: None,
        })

    def go_down(self, name: str, *, not_ready: bool) -> None:
        self.cluster.write_node(name, up=False)
        if not_ready:
            self.cluster.write_node(name, ready=False)

    def come_back(self, name: str, now: datetime, *, ready_flaps: bool) -> None:
        node = self.cluster.nodes[name]
        ready_since = now if (ready_flaps or not node.ready) else node.ready_since
        self.cluster.write_node(
            name, up=True, boot_id=self.cluster.new_boot_id(), ready=True, ready_since=ready_since
        )

    def report_after_boot(self, name: str) -> None:
        self.cluster.write_node(
            name,
            {KEYS.reboot_needed: FALSE, KEYS.reboot_in_progress: FALSE,
             KEYS.blocked_reason: None},
            {KEYS.reboot_needed: FALSE},
        )

    def next_step(self, name: str, now: datetime) -> None:
        """Whatever this node's agent, hooks and host do next when all goes well."""
        node = self.cluster.nodes[name]
        if node.labels.get(KEYS.before_reboot) == TRUE:
            self.cluster.write_node(name, {BEFORE_HOOK: TRUE})
        if node.labels.get(KEYS.after_reboot) == TRUE:
            self.cluster.write_node(name, {AFTER_HOOK: TRUE})
        if self.may_start(name):
            self.start(name)
        elif self.draining(name):
            if node.flag(KEYS.reboot_ok):
                self.go_down(name, not_ready=False)
                self.come_back(name, now, ready_flaps=True)
            else:  # the grant was withdrawn (admin release): give up the drain
                self.abort(name)
        elif self.rebooted(name):
            self.report_after_boot(name)
        elif self.uncordon_due(name):
            self.uncordon(name)

    # --- conditions, read from the current object as a real agent would

    def may_start(self, name: str) -> bool:
        """A grant the agent has not handed back (its GrantReturned: a blocked-reason
        with reboot-ok=true) and has not started yet."""
        node = self.cluster.nodes[name]
        return (
            node.up
            and node.flag(KEYS.reboot_ok)
            and node.flag(KEYS.reboot_needed)
            and not node.flag(KEYS.reboot_in_progress)
            and not node.annotations.get(KEYS.blocked_reason)
        )

    def draining(self, name: str) -> bool:
        node = self.cluster.nodes[name]
        return (
            node.up
            and node.flag(KEYS.reboot_in_progress)
            and node.annotations.get(KEYS.boot_id_before_reboot) == node.boot_id
        )

    def uncordon_due(self, name: str) -> bool:
        """The agent's Uncordoning: the cycle is over (done, aborted or withdrawn)."""
        node = self.cluster.nodes[name]
        recorded = node.annotations.get(KEYS.boot_id_before_reboot, "")
        waiting_for_after_reboot = (
            bool(recorded) and recorded != node.boot_id and node.flag(KEYS.reboot_ok)
        )
        return (
            node.up
            and not node.flag(KEYS.reboot_in_progress)
            and not waiting_for_after_reboot
            and (bool(recorded) or node.flag(KEYS.agent_made_unschedulable))
        )

    def rebooted(self, name: str) -> bool:
        node = self.cluster.nodes[name]
        return (
            node.up
            and node.flag(KEYS.reboot_in_progress)
            and node.annotations.get(KEYS.boot_id_before_reboot) != node.boot_id
        )


# ---------------------------------------------------------------------- the state machine

node_index = st.integers(min_value=0, max_value=4)

# What can happen on a node, repeated to weigh the choice towards progress.
HAPPENINGS = (
    ["agent_requests_reboot"] * 3
    + ["everyone_on_the_node_does_their_next_step"] * 6
    + [
        "agent_withdraws_request_before_a_grant",
        "agent_aborts_drain",
        "agent_aborts_drain",
        "agent_reports_drain_blocked_but_keeps_trying",
        "host_reboots",
        "host_loses_power",
        "host_comes_back",
        "host_comes_back",
        "kubelet_reports_readiness",
        "stray_hook_annotations_appear",
        "admin_pauses_node",
        "admin_releases_slot",
        "admin_pauses_everything",
        "admin_cordons_node",
        "node_is_deleted_or_replaced",
    ]
)


# Rule 15's configuration, and each node's group and control-plane role.
Grouping = tuple[list[str], list[bool], int | None, str | None, str | None, str, int]
GROUPING = st.tuples(
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=5, max_size=5),
    st.lists(st.booleans(), min_size=5, max_size=5),  # control-plane nodes
    st.none() | st.integers(min_value=1, max_value=2),  # each group's max-concurrent
    st.none() | st.sampled_from(["1", "2", "50%"]),  # max-unavailable
    st.none() | st.sampled_from(["1", "34%"]),  # each group's max-unavailable
    st.sampled_from(["", "a"]),  # the canary group
    st.sampled_from([0, 1200]),  # its soak, seconds
)


class PlannerMachine(RuleBasedStateMachine):
    cluster: FakeCluster
    agents: Agents
    policy: Policy
    names: list[str]
    legacy: set[str]
    now: datetime
    history: list[tuple[tuple[NodeView, ...], tuple[SlotLease, ...]]]

    @initialize(
        count=st.integers(min_value=1, max_value=5),
        max_concurrent=st.integers(min_value=1, max_value=3),
        hooks=st.booleans(),
        min_ready=st.sampled_from([0, 30]),
        delay=st.sampled_from([0, 120]),
        windowed=st.booleans(),
        coordinator_on=st.integers(min_value=0, max_value=5),
        legacy=st.sampled_from([0, 0, 0, 1, 2]),
        drain_attempts=st.sampled_from([1, 2, 5]),
        grouping=st.none() | GROUPING,
    )
    def setup(
        self,
        count: int,
        max_concurrent: int,
        hooks: bool,
        min_ready: int,
        delay: int,
        windowed: bool,
        coordinator_on: int,
        legacy: int,
        drain_attempts: int,
        grouping: Grouping | None,
    ) -> None:
        self.names = [f"node-{i}" for i in range(count)]
        on = self.names[coordinator_on] if coordinator_on < count else None
        labels: dict[str, dict[str, str]] = {}
        groups, max_unavailable, soak = Groups(), None, 0
        if grouping is not None:
            member_of, control_plane, group_max, budget, group_budget, canary, soak = grouping
            for i, name in enumerate(self.names):
                labels[name] = {KEYS.group: member_of[i]}
                if control_plane[i]:
                    labels[name][CONTROL_PLANE_LABEL] = ""
            groups = Groups(max_concurrent=group_max, canary=canary,
                            max_unavailable=Budget.parse(group_budget) if group_budget else None)
            max_unavailable = Budget.parse(budget) if budget else None
            legacy = 0  # grants an older coordinator left know nothing of groups
        self.cluster = FakeCluster(self.names, on, labels)
        self.agents = Agents(self.cluster)
        # Grants an older coordinator (CLUO) left behind, within the limit: no slot names
        # these nodes, and the planner must count them and finish them.
        self.legacy = set(self.names[: min(legacy, max_concurrent, count)])
        for name in self.legacy:
            self.agents.request_reboot(name, START)
            self.cluster.write_node(name, {KEYS.reboot_ok: TRUE})
        self.policy = Policy(
            max_concurrent=max_concurrent,
            before_reboot_annotations=(BEFORE_HOOK,) if hooks else (),
            after_reboot_annotations=(AFTER_HOOK,) if hooks else (),
            reboot_timeout=timedelta(hours=1),
            min_ready=timedelta(seconds=min_ready),
            delay_between_reboots=timedelta(seconds=delay),
            windows=parse_windows("00:00 16h, 18:00 4h") if windowed else parse_windows(""),
            drain_backoff=timedelta(minutes=10),
            drain_backoff_max=timedelta(minutes=20),
            max_drain_attempts=drain_attempts,
            groups=groups,
            max_unavailable=max_unavailable,
            canary_soak=timedelta(seconds=soak),
        )
        self.now = START
        self.history = []
        self.cluster.on_grant = self.never_granted_while_its_drain_backs_off

    def group_of(self, name: str) -> str:
        node = self.cluster.nodes[name]
        return self.policy.groups.group_of(node.labels, KEYS.group)

    def group_cap(self, group: str) -> int | None:
        """The group's max-concurrent and max-unavailable as a count of nodes."""
        most, budget = self.policy.groups.limits(group)
        total = sum(1 for name in self.names  # the most the group ever had
                    if self.policy.groups.group_of(self.cluster.static_labels.get(name, {}),
                                                   KEYS.group) == group)
        counts = [c for c in (most, budget.of(total) if budget else None) if c is not None]
        return min(counts) if counts else None

    def takes_a_slot_only_within_the_limits(self, node: FakeNode, group: str,
                                            handed_from: str) -> None:
        """A plan from the current view: the budget, the control-plane rule, the canary.
        A hand-over's giver (reset, named only by the slot it hands over) leaves the
        unavailable nodes as the taker joins them, unless it is unavailable anyway."""
        cluster, policy = self.cluster, self.policy
        if group:
            return
        unavailable = cluster.unavailable() | {node.name}
        giver = cluster.nodes.get(handed_from)
        if giver is not None and giver.ready and not giver.unschedulable:
            unavailable.discard(handed_from)
        if policy.max_unavailable is not None:
            allowed = policy.max_unavailable.of(len(cluster.nodes))
            assert len(unavailable) <= allowed, (
                f"{node.name} takes a slot: {sorted(unavailable)} unavailable, max {allowed}")
        if CONTROL_PLANE_LABEL in node.labels:
            others = {name for name in unavailable - {node.name}
                      if CONTROL_PLANE_LABEL in cluster.nodes[name].labels}
            assert not others, f"{node.name} takes a slot while {sorted(others)} unavailable"
        canary = policy.groups.canary
        if canary and self.policy.groups.group_of(node.labels, KEYS.group) != canary:
            busy = [name for name, other in cluster.nodes.items()
                    if self.group_of(name) == canary
                    and (name in cluster.in_flight() or (
                        other.flag(KEYS.reboot_needed) and not other.flag(KEYS.reboot_paused)))]
            assert not busy, f"{node.name} takes a slot while canary {busy} is not done"
            released = [lease.released_at for lease in cluster.leases.values()
                        if lease.group == canary and lease.released_at is not None]
            if released:
                assert cluster.planned_at >= max(released) + policy.canary_soak

    def never_granted_while_its_drain_backs_off(self, node: FakeNode) -> None:
        now = self.cluster.planned_at
        waits, until = drain_backoff_until(node.state, self.policy, now)
        assert not waits, (f"{node.name} granted at {now} while its drain backs off "
                           f"(until {until or 'an admin clears it'})")

    def name(self, index: int) -> str:
        return self.names[index % len(self.names)]

    # ------------------------------------------------------------------ everyone else

    @rule(happenings=st.lists(st.tuples(st.sampled_from(HAPPENINGS), node_index, st.booleans()),
                              min_size=1, max_size=4))
    def things_happen_on_nodes(self, happenings: list[tuple[str, int, bool]]) -> None:
        for what, i, flag in happenings:
            name = self.name(i)
            if name not in self.cluster.nodes:
                if what == "agent_requests_reboot":  # stands for: it registers again
                    self.cluster.register(name, ready=flag)
                continue
            getattr(self, what)(name, flag)

    def node_is_deleted_or_replaced(self, name: str, replaced: bool) -> None:
        """An autoscaler or an instance group: the Node object goes, maybe a new one
        comes under the same name (NotReady at first)."""
        del self.cluster.nodes[name]
        self.cluster.bump()
        self.legacy.discard(name)
        if replaced:
            self.cluster.register(name, ready=False)

    def agent_requests_reboot(self, name: str, _: bool) -> None:
        if self.cluster.nodes[name].up:
            self.agents.request_reboot(name, self.now)

    def agent_withdraws_request_before_a_grant(self, name: str, _: bool) -> None:
        node = self.cluster.nodes[name]
        if node.up and not node.flag(KEYS.reboot_ok) and not node.flag(KEYS.reboot_in_progress):
            self.agents.withdraw_request(name)

    def everyone_on_the_node_does_their_next_step(self, name: str, _: bool) -> None:
        if self.cluster.nodes[name].up:
            self.agents.next_step(name, self.now)

    def agent_aborts_drain(self, name: str, _: bool) -> None:
        if self.agents.draining(name):
            self.agents.abort(name)

    def agent_reports_drain_blocked_but_keeps_trying(self, name: str, _: bool) -> None:
        if self.agents.draining(name):
            self.cluster.write_node(name, {KEYS.blocked_reason: "waiting for PDB web"})

    def host_reboots(self, name: str, not_ready: bool) -> None:
        if self.agents.draining(name):
            self.agents.go_down(name, not_ready=not_ready)

    def host_loses_power(self, name: str, _: bool) -> None:
        if self.cluster.nodes[name].up:
            self.agents.go_down(name, not_ready=True)

    def host_comes_back(self, name: str, ready_flaps: bool) -> None:
        if not self.cluster.nodes[name].up:
            self.agents.come_back(name, self.now, ready_flaps=ready_flaps)

    def kubelet_reports_readiness(self, name: str, ready: bool) -> None:
        node = self.cluster.nodes[name]
        if node.up and node.ready != ready:
            self.cluster.write_node(name, ready=ready, ready_since=self.now)

    def stray_hook_annotations_appear(self, name: str, _: bool) -> None:
        self.cluster.write_node(name, {BEFORE_HOOK: TRUE, AFTER_HOOK: TRUE})

    def admin_pauses_node(self, name: str, paused: bool) -> None:
        self.cluster.write_node(name, {KEYS.reboot_paused: TRUE if paused else None})

    def admin_releases_slot(self, name: str, _: bool) -> None:
        self.cluster.write_node(name, {KEYS.release_slot: TRUE})

    def admin_cordons_node(self, name: str, cordoned: bool) -> None:
        if not self.cluster.nodes[name].flag(KEYS.agent_made_unschedulable):
            self.cluster.write_node(name, unschedulable=cordoned)

    def admin_pauses_everything(self, _: str, paused: bool) -> None:
        self.policy = replace(self.policy, paused=paused)

    @rule(seconds=st.integers(min_value=1, max_value=3000))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # ------------------------------------------------------------------ the coordinator

    @rule(limit=st.none() | st.integers(min_value=0, max_value=6))
    def coordinator_reconciles(self, limit: int | None) -> None:
        """A fresh plan (after a restart too: the planner has no memory), maybe cut short."""
        result = plan(self.cluster.node_views(), self.cluster.lease_views(), self.now, self.policy)
        self.cluster.planned_at = self.now
        self.cluster.on_acquire = self.takes_a_slot_only_within_the_limits
        try:
            self.cluster.apply_plan(result, limit)
        finally:
            self.cluster.on_acquire = None

    @precondition(lambda self: len(self.history) > 1)
    @rule(
        node_age=st.integers(min_value=0, max_value=HISTORY - 1),
        lease_age=st.integers(min_value=0, max_value=HISTORY - 1),
        limit=st.none() | st.integers(min_value=0, max_value=6),
    )
    def coordinator_acts_on_stale_views(
        self, node_age: int, lease_age: int, limit: int | None
    ) -> None:
        nodes, _ = self.history[-1 - min(node_age, len(self.history) - 1)]
        _, leases = self.history[-1 - min(lease_age, len(self.history) - 1)]
        self.cluster.planned_at = self.now
        self.cluster.apply_plan(plan(nodes, leases, self.now, self.policy), limit)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def never_more_in_flight_than_allowed(self) -> None:
        in_flight = self.cluster.in_flight()
        assert len(in_flight) <= self.policy.max_concurrent, (
            f"{sorted(in_flight)} in flight, max {self.policy.max_concurrent}"
        )

    @invariant()
    def never_more_cordoned_by_cluo_than_allowed(self) -> None:
        cordoned = self.cluster.cordoned_by_cluo()
        assert len(cordoned) <= self.policy.max_concurrent, (
            f"{sorted(cordoned)} cordoned by cluo, max {self.policy.max_concurrent}"
        )

    @invariant()
    def never_more_of_a_group_granted_than_allowed(self) -> None:
        """Granted: reboot-ok, reboot-in-progress or cordoned by cluo (a node of a group
        may hold a global slot while it waits for its group's, but is not granted)."""
        granted = self.cluster.granted()
        for group in {self.group_of(name) for name in self.cluster.nodes}:
            cap = self.group_cap(group)
            members = {name for name in granted if self.group_of(name) == group}
            if cap is not None:
                assert len(members) <= cap, f"group {group}: {sorted(members)} granted, max {cap}"
                assert members <= self.cluster.holders(group), (
                    f"group {group}: {sorted(members)} granted, "
                    f"{sorted(self.cluster.holders(group))} hold its slots")
        control_plane = {name for name in granted
                         if CONTROL_PLANE_LABEL in self.cluster.nodes[name].labels}
        assert len(control_plane) <= 1, f"control-plane nodes {sorted(control_plane)} granted"
        assert control_plane <= self.cluster.holders(CONTROL_PLANE_SLOTS)

    @invariant()
    def own_nodes_in_flight_within_max_unavailable(self) -> None:
        budget = self.policy.max_unavailable
        if budget is not None:
            # The most nodes the budget allowed with the most nodes the cluster had.
            allowed = budget.of(len(self.names))
            assert len(self.cluster.in_flight()) <= allowed

    @invariant()
    def reboot_ok_only_while_a_slot_names_the_node(self) -> None:
        """Stronger than the limit: the planner never writes a grant no slot backs."""
        holders = self.cluster.holders()
        for node in self.cluster.nodes.values():
            if node.name in self.legacy:
                if node.flag(KEYS.reboot_ok) or node.flag(KEYS.reboot_in_progress):
                    continue  # the older coordinator's grant is still being finished
                self.legacy.discard(node.name)
            if node.flag(KEYS.reboot_ok):
                assert node.name in holders, f"{node.name} has reboot-ok=true and no slot"
            if node.flag(KEYS.reboot_in_progress) and not node.flag(KEYS.release_slot):
                assert node.name in holders, f"{node.name} is in progress and holds no slot"

    @invariant()
    def nodes_the_planner_ignores_change_no_plan(self) -> None:
        """The same plan without them: what lets the driver skip planning after such a
        node changed (to another state the planner ignores)."""
        if counts_every_node(self.policy):
            return  # a percentage counts every node: the driver plans again when one comes or goes
        nodes, leases = self.cluster.node_views(), self.cluster.lease_views()
        holders = {lease.holder for lease in leases if lease.holder}
        kept = tuple(view for view in nodes
                     if view.name in holders or not ignored_while_unslotted(view))
        assert plan(kept, leases, self.now, self.policy) == plan(
            nodes, leases, self.now, self.policy)

    @invariant()
    def remember_what_the_coordinator_could_have_seen(self) -> None:
        self.history.append((self.cluster.node_views(), self.cluster.lease_views()))
        del self.history[:-HISTORY]

    def teardown(self) -> None:
        """Liveness: once everyone cooperates, every requested reboot gets done."""
        if not hasattr(self, "cluster"):
            return
        settle(self.cluster, self.agents, replace(self.policy, paused=False), self.now)


def settle(cluster: FakeCluster, agents: Agents, policy: Policy, now: datetime) -> None:
    """Run cooperative agents and fresh plans until every reboot cycle is over."""
    for name, node in cluster.nodes.items():
        cluster.write_node(name, {KEYS.reboot_paused: None})
        if node.unschedulable and not node.flag(KEYS.agent_made_unschedulable) and (
                policy.max_unavailable or cluster.static_labels):
            # The admin's maintenance ends: a budget or another control-plane node would
            # wait for it forever otherwise.
            cluster.write_node(name, unschedulable=False)
    for _ in range(400):
        for name, node in cluster.nodes.items():  # the admin's cluo-coord retry
            if node.state.drain_failures >= policy.max_drain_attempts:
                cluster.write_node(name, {KEYS.drain_failures: None, KEYS.drain_retry_at: None})
        cluster.planned_at = now
        cluster.apply_plan(plan(cluster.node_views(), cluster.lease_views(), now, policy))
        for name, node in cluster.nodes.items():
            if not node.up:
                agents.come_back(name, now, ready_flaps=True)
            elif not node.ready:
                cluster.write_node(name, ready=True, ready_since=now)
            agents.next_step(name, now)
        assert len(cluster.in_flight()) <= policy.max_concurrent
        assert len(cluster.cordoned_by_cluo()) <= policy.max_concurrent
        if _settled(cluster):
            return
        now += timedelta(minutes=10)
    unsettled = {
        name: (node.annotations, node.labels) for name, node in cluster.nodes.items()
    }
    leases = {key: lease.holder for key, lease in cluster.leases.items()}
    raise AssertionError(f"the cluster did not settle: {unsettled} {leases}")


def _settled(cluster: FakeCluster) -> bool:
    return not cluster.holders() and all(
        not node.flag(KEYS.reboot_needed)
        and not node.flag(KEYS.reboot_ok)
        and not node.flag(KEYS.reboot_in_progress)
        and not node.flag(KEYS.release_slot)
        and not node.flag(KEYS.agent_made_unschedulable)
        and not node.labels.get(KEYS.before_reboot)
        and not node.labels.get(KEYS.after_reboot)
        and KEYS.drain_failures not in node.annotations
        and KEYS.drain_retry_at not in node.annotations
        for node in cluster.nodes.values()
    )


PlannerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_planner_never_exceeds_max_concurrent = PlannerMachine.TestCase


class GroupedPlannerMachine(PlannerMachine):
    """The same, with groups, budgets, control-plane nodes and a canary every time."""

    @initialize(
        count=st.integers(min_value=2, max_value=5),
        max_concurrent=st.integers(min_value=1, max_value=3),
        hooks=st.booleans(),
        delay=st.sampled_from([0, 120]),
        coordinator_on=st.integers(min_value=0, max_value=5),
        drain_attempts=st.sampled_from([2, 5]),
        grouping=GROUPING,
    )
    def setup_grouped(self, count: int, max_concurrent: int, hooks: bool, delay: int,
                      coordinator_on: int, drain_attempts: int, grouping: Grouping) -> None:
        self.setup(count, max_concurrent, hooks, 0, delay, False, coordinator_on, 0,
                   drain_attempts, grouping)

    def setup(self, *args: Any) -> None:  # no initialize rule here: setup_grouped calls it
        PlannerMachine.setup(self, *args)


GroupedPlannerMachine.TestCase.settings = PlannerMachine.TestCase.settings
test_planner_never_exceeds_group_limits = GroupedPlannerMachine.TestCase


# ---------------------------------------------------------------------- one walk, spelled out


def test_planner_walks_a_full_cycle_in_the_model() -> None:
    """The happy path through the model, phase by phase, with hooks."""
    cluster = FakeCluster(["a", "b"], coordinator_on=None)
    agents = Agents(cluster)
    policy = Policy(
        before_reboot_annotations=(BEFORE_HOOK,), after_reboot_annotations=(AFTER_HOOK,)
    )
    now = START

    def step() -> list[str]:
        result = plan(cluster.node_views(), cluster.lease_views(), now, policy)
        assert cluster.apply_plan(result) == len(result.changes)
        return [
            type(change).__name__
            for change in result.changes
            if not isinstance(change, EmitEvent)
        ]

    agents.request_reboot("a", now)
    agents.request_reboot("b", now + timedelta(seconds=1))
    assert step() == ["AcquireSlot", "LabelBeforeReboot"]
    assert step() == []  # waiting for the before-reboot hook
    cluster.write_node("a", {BEFORE_HOOK: TRUE})
    assert step() == ["GrantRebootOk"]
    assert cluster.nodes["a"].flag(KEYS.reboot_ok)
    agents.start("a")
    agents.go_down("a", not_ready=True)
    assert step() == []
    agents.come_back("a", now, ready_flaps=True)
    agents.report_after_boot("a")
    assert step() == ["LabelAfterReboot"]
    assert cluster.nodes["a"].unschedulable
    cluster.write_node("a", {AFTER_HOOK: TRUE})
    # The hand-over: a's reset uncordons the node its agent cordoned (rule 10), then one
    # compare-and-swap takes a's slot for b.
    assert step() == ["ResetRebootOk", "AcquireSlot", "LabelBeforeReboot"]
    assert not cluster.nodes["a"].flag(KEYS.reboot_ok)
    assert not cluster.nodes["a"].unschedulable
    assert KEYS.agent_made_unschedulable not in cluster.nodes["a"].annotations
    assert cluster.nodes["a"].labels == {KEYS.reboot_needed: FALSE}
    assert cluster.leases["", 0].holder == "b"
    agents.uncordon("a")  # the agent's end of the cycle: only its boot id is left to remove
    assert KEYS.boot_id_before_reboot not in cluster.nodes["a"].annotations
    assert not cluster.nodes["a"].unschedulable


def _kinds(result: Plan) -> list[str]:
    return [type(change).__name__ for change in result.changes if not isinstance(change, EmitEvent)]


def test_grant_planned_from_a_stale_lease_view_is_refused() -> None:
    """Rule 3: reboot-ok=true is written only while the slot Lease is unchanged."""
    cluster = FakeCluster(["m", "n"], coordinator_on=None)
    agents = Agents(cluster)
    policy = Policy(before_reboot_annotations=(BEFORE_HOOK,))
    now = START

    def fresh() -> Plan:
        result = plan(cluster.node_views(), cluster.lease_views(), now, policy)
        cluster.apply_plan(result)
        return result

    agents.request_reboot("n", now)
    fresh()  # slot 0 -> n
    leases_naming_n = cluster.lease_views()
    agents.withdraw_request("n")
    fresh()  # n no longer needs it: reset, slot 0 released
    agents.request_reboot("m", now)
    fresh()  # slot 0 -> m
    assert cluster.leases["", 0].holder == "m"

    # A coordinator whose Lease cache still says slot 0 is n's, with fresh Nodes.
    agents.request_reboot("n", now)
    cluster.apply_plan(plan(cluster.node_views(), leases_naming_n, now, policy))
    cluster.write_node("n", {BEFORE_HOOK: TRUE})
    stale = plan(cluster.node_views(), leases_naming_n, now, policy)
    assert _kinds(stale)[0] == "GrantRebootOk"
    cluster.apply_plan(stale)

    assert not cluster.nodes["n"].flag(KEYS.reboot_ok)
    assert cluster.in_flight() == {"m"}


def test_release_planned_from_a_stale_node_view_is_refused() -> None:
    """Rule 4: a slot is released only after a reset that checks the node's version."""
    cluster = FakeCluster(["n"], coordinator_on=None)
    agents = Agents(cluster)
    policy = Policy()
    now = START
    nodes_before_the_request = cluster.node_views()

    agents.request_reboot("n", now)
    for _ in range(2):  # slot, then the grant
        cluster.apply_plan(plan(cluster.node_views(), cluster.lease_views(), now, policy))
    assert cluster.nodes["n"].flag(KEYS.reboot_ok)

    # Node cache from before the request, Lease cache current: "n holds a slot it does not
    # need any more" -- the plan would cancel, but the reset's precondition fails first.
    stale = plan(nodes_before_the_request, cluster.lease_views(), now, policy)
    assert _kinds(stale) == ["ResetRebootOk", "ReleaseSlot"]
    cluster.apply_plan(stale)

    assert cluster.leases["", 0].holder == "n"
    assert cluster.nodes["n"].flag(KEYS.reboot_ok)
