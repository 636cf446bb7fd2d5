"""The agent's state machine: every path of the reboot cycle, and every crash point.

The tests drive ``decide`` against a small simulated world: a Node (annotations, labels,
spec.unschedulable) written through the real wire keys, a host (boot id, update_engine,
logind), the agent process's memory (its drain and reboot attempts, lost on a crash) and
optionally a coordinator that grants and takes back reboot-ok like cluo-coord.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluo.cycle.agent_core import (
    TRANSITIONS,
    AbortDrain,
    Action,
    AgentConfig,
    ClearRebootAttempts,
    Cordoning,
    Decision,
    Draining,
    DrainStatus,
    DrainTimeoutPolicy,
    EmitEvent,
    EventReason,
    EventType,
    ForceDrain,
    Granted,
    GrantReturned,
    GrantWithdrawn,
    Idle,
    IllegalTransition,
    Observation,
    PatchNode,
    Reboot,
    RebootAttempt,
    Rebooted,
    Rebooting,
    RebootNeeded,
    RebootOutcome,
    StartDrain,
    State,
    Uncordoning,
    WaitingForAfterReboot,
    WaitingForGrant,
    check_transition,
    decide,
    derive_state,
)
from cluo.cycle.drain_plan import BlockReason, DrainOptions, PodBlocker
from cluo.cycle.inhibitors import Inhibitor, blocking_inhibitors
from cluo.cycle.update_status import UpdateEngineStatus, UpdateOperation
from cluo.protocol import FLUO_PREFIX, Keys, NodePatch, NodeProtocolState

KEYS = Keys()
T0 = 1000.0
COORDINATOR_DELAY = 5.0

IDLE = UpdateEngineStatus(1700000000, 0.0, UpdateOperation.IDLE.value, "0.0.0", 0)
NEED_REBOOT = UpdateEngineStatus(
    1700000100, 0.0, UpdateOperation.UPDATED_NEED_REBOOT.value, "4152.2.0", 1234
)
PDB_BLOCKER = PodBlocker("shop", "web-0", BlockReason.DISRUPTION_BUDGET, "pdb 'web' allows 0")
NO_CONTROLLER = PodBlocker("default", "debug", BlockReason.NO_CONTROLLER)


# --- the simulated world ----------------------------------------------------------------


@dataclass
class World:
    """A node, its host, the agent process's memory and (optionally) the coordinator."""

    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    unschedulable: bool = False
    boot_id: str = "boot-0"
    engine: UpdateEngineStatus | None = NEED_REBOOT
    config: AgentConfig = field(default_factory=AgentConfig)
    now: float = T0
    coordinator: bool = True
    coordinator_since: float | None = None
    # The agent process's memory: lost on a crash or a reboot.
    drain: DrainStatus | None = None
    attempts: tuple[RebootAttempt, ...] = ()
    # The drain: pods that do not leave by themselves.
    drain_blockers: tuple[PodBlocker, ...] = ()
    force_deletes: bool = True  # ForceDrain removes the pods a PDB kept
    # logind: outcomes for the next Reboot calls; then it reboots.
    reboot_outcomes: list[RebootOutcome] = field(default_factory=list)
    # What happened.
    reboots: int = 0
    actions: list[Action] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    def observe(self) -> Observation:
        return Observation(
            node=NodeProtocolState.from_metadata(KEYS, self.annotations, self.labels),
            unschedulable=self.unschedulable,
            reboot_needed_label=self.labels.get(KEYS.reboot_needed) == "true",
            boot_id=self.boot_id,
            engine=self.engine,
            drain=self.drain,
            reboot_attempts=self.attempts,
            config=self.config,
        )

    @property
    def node(self) -> NodeProtocolState:
        return self.observe().node

    def state(self) -> State:
        return derive_state(self.observe())

    def decide(self) -> Decision:
        decision = decide(self.observe(), self.now)
        if not self.phases or self.phases[-1] != decision.phase:
            self.phases.append(decision.phase)
        return decision

    def set_annotation(self, name: str, value: str) -> None:
        self.annotations[KEYS.key(name)] = value

    def apply(self, action: Action) -> bool:
        """Do one action's effect on the world. False: the agent process is gone."""
        self.actions.append(action)
        node = self.node
        match action:
            case PatchNode(patch=patch, unschedulable=unschedulable):
                if unschedulable is False:
                    assert node.agent_made_unschedulable, \
                        "uncordoned a node the agent did not cordon"
                written = patch.to_metadata(KEYS)
                annotations, labels = written.annotations, written.labels
                _merge(self.annotations, annotations)
                _merge(self.labels, labels)
                if unschedulable is not None:
                    self.unschedulable = unschedulable
                if unschedulable is True:
                    assert self.node.agent_made_unschedulable, "cordoned without the mark"
            case StartDrain():
                assert self.unschedulable, "drain started on a schedulable node"
                self.drain = DrainStatus(started_at=self.now, blockers=self.drain_blockers)
            case ForceDrain():
                assert self.drain is not None
                if self.force_deletes:
                    self.drain_blockers = tuple(
                        b for b in self.drain_blockers if b.reason.permanent
                    )
                self.drain = replace(self.drain, forced_at=self.now, blockers=self.drain_blockers)
            case AbortDrain():
                self.drain = None
            case ClearRebootAttempts():
                self.attempts = ()
            case Reboot():
                assert node.reboot_ok and node.reboot_in_progress, "reboot without the grant"
                assert self.unschedulable, "reboot of a node that is not cordoned"
                assert node.boot_id_before_reboot == self.boot_id, "reboot without the boot id"
                outcome = self.reboot_outcomes.pop(0) if self.reboot_outcomes else None
                if outcome is None:  # logind accepted: the driver posts the Event, then down
                    self.actions.append(EmitEvent(EventReason.REBOOTING, action.accepted_message))
                    self.reboot_host()
                    return False
                self.attempts = (*self.attempts, RebootAttempt(self.now, outcome, "inhibited"))
            case EmitEvent():
                pass
        return True

    def reboot_host(self) -> None:
        self.reboots += 1
        self.boot_id = f"boot-{self.reboots}"
        self.engine = IDLE  # NEED_REBOOT does not survive a reboot
        self.crash()

    def crash(self) -> None:
        self.drain = None
        self.attempts = ()

    def tick(self, decision: Decision) -> None:
        """Time passes until the driver decides again; the drain makes progress.

        The driver decides again right after acting (its own writes and the results of
        its actions are events), else after recheck_after, or when a watch fires
        (modelled as at most 30 s).
        """
        if decision.actions:
            self.now += 0.01
        elif decision.recheck_after is None:
            self.now += 5.0
        else:
            self.now += min(decision.recheck_after.total_seconds(), 30.0)
        if self.drain is not None and not self.drain_blockers:
            self.drain = replace(self.drain, complete=True, blockers=())
        if self.coordinator:
            self.coordinate()

    def coordinate(self) -> None:
        """cluo-coord, reduced to the grant and its return.

        It flips reboot-ok once the condition for it has held for COORDINATOR_DELAY
        (before/after-reboot hooks running), so the agent sees the states in between.
        """
        node = self.node
        if node.reboot_ok:
            after_reboot = not node.reboot_needed and not node.reboot_in_progress
            returned = not node.reboot_in_progress and bool(node.blocked_reason)
            wanted = "false" if after_reboot or returned else None
        else:
            grantable = (node.reboot_needed and not node.reboot_in_progress
                         and not node.blocked_reason and not node.boot_id_before_reboot)
            wanted = "true" if grantable else None
        if wanted is None:
            self.coordinator_since = None
        elif self.coordinator_since is None:
            self.coordinator_since = self.now
        elif self.now - self.coordinator_since >= COORDINATOR_DELAY:
            self.set_annotation("reboot-ok", wanted)
            self.coordinator_since = None

    def step(self, crash_after: int | None = None) -> Decision:
        """One decision; its actions in order, or until a crash after ``crash_after`` of them.

        ``crash_after=0`` crashes before the first action (losing the process's memory).
        """
        decision = self.decide()
        if crash_after == 0:
            self.crash()
            self.tick(decision)
            return decision
        for done, action in enumerate(decision.actions, start=1):
            if not self.apply(action):
                break
            if crash_after is not None and done == crash_after:
                self.crash()
                break
        self.tick(decision)
        return decision

    def cycle_over(self) -> bool:
        return self.reboots > 0 and isinstance(self.state(), Idle) and not self.node.reboot_ok

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if self.cycle_over():
                return
            self.step()
        raise AssertionError(f"cycle did not end; phases: {self.phases}")

    def run_until(self, state_type: type[State], max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if isinstance(self.state(), state_type):
                return
            self.step()
        raise AssertionError(f"never reached {state_type.__name__}; phases: {self.phases}")

    def actions_of(self, action_type: type[Action]) -> list[Action]:
        return [a for a in self.actions if isinstance(a, action_type)]

    def events(self) -> list[EmitEvent]:
        return [a for a in self.actions if isinstance(a, EmitEvent)]


def _merge(target: dict[str, str], changes: dict[str, str | None]) -> None:
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value


def obs(**node_fields: object) -> Observation:
    """An observation with the given NodeProtocolState fields; overrides via replace()."""
    return Observation(
        node=NodeProtocolState(**node_fields),  # type: ignore[arg-type]
        unschedulable=False,
        reboot_needed_label=bool(node_fields.get("reboot_needed", False)),
        boot_id="boot-0",
    )


def writes(decision: Decision) -> list[NodePatch]:
    return [a.patch for a in decision.actions if isinstance(a, PatchNode)]


def cordon_writes(actions: list[Action] | tuple[Action, ...], value: bool) -> list[PatchNode]:
    """The writes that cordon (True) or uncordon (False) the node."""
    return [a for a in actions if isinstance(a, PatchNode) and a.unschedulable is value]


def granted_world(**fields: object) -> World:
    """A world where the coordinator (or the test, if there is none) just granted."""
    world = World(**fields)  # type: ignore[arg-type]
    if not world.coordinator:
        world.run_until(WaitingForGrant)
        world.set_annotation("reboot-ok", "true")
    world.run_until(Granted)
    return world


# --- deriving the state -----------------------------------------------------------------

RECORDED = {"reboot_in_progress": True, "reboot_ok": True, "reboot_needed": True}


@pytest.mark.parametrize(
    ("case", "observation", "expected"),
    [
        ("nothing to do", obs(), Idle),
        ("update_engine needs a reboot", replace(obs(), engine=NEED_REBOOT), RebootNeeded),
        ("admin set the annotation, label missing",
         replace(obs(reboot_needed=True), reboot_needed_label=False), RebootNeeded),
        ("announced, no grant", obs(reboot_needed=True), WaitingForGrant),
        ("announced and granted", obs(reboot_needed=True, reboot_ok=True), Granted),
        ("granted, in progress, not cordoned", obs(**RECORDED, agent_made_unschedulable=True),
         Cordoning),
        ("in progress and cordoned", replace(obs(**RECORDED), unschedulable=True), Draining),
        ("boot id recorded, same boot",
         replace(obs(**RECORDED, boot_id_before_reboot="boot-0"), unschedulable=True), Rebooting),
        ("boot id recorded, new boot",
         replace(obs(**RECORDED, boot_id_before_reboot="boot-0"), boot_id="boot-1"), Rebooted),
        ("reported, hooks running", replace(
            obs(reboot_ok=True, boot_id_before_reboot="boot-0"), boot_id="boot-1"),
         WaitingForAfterReboot),
        ("hooks done", replace(obs(boot_id_before_reboot="boot-0"), boot_id="boot-1"),
         Uncordoning),
        ("grant withdrawn mid-drain", replace(
            obs(reboot_in_progress=True, reboot_needed=True), unschedulable=True), GrantWithdrawn),
        ("aborted, our cordon still on", replace(
            obs(reboot_needed=True, reboot_ok=True, agent_made_unschedulable=True,
                blocked_reason="drain timed out"), unschedulable=True), Uncordoning),
        ("aborted, grant still on", obs(reboot_needed=True, reboot_ok=True,
                                        blocked_reason="drain timed out"), GrantReturned),
        ("grant taken back, stale reason", obs(reboot_needed=True, blocked_reason="x"),
         WaitingForGrant),
    ],
)
def test_state_is_derived_from_cluster_and_host(
    case: str, observation: Observation, expected: type[State]
) -> None:
    assert type(derive_state(observation)) is expected, case


# --- announcing and mirroring -----------------------------------------------------------


def test_need_reboot_from_update_engine_sets_annotation_and_label() -> None:
    world = World(coordinator=False)

    world.step()

    assert world.annotations[KEYS.reboot_needed] == "true"
    assert world.labels[KEYS.reboot_needed] == "true"
    assert isinstance(world.state(), WaitingForGrant)
    [event] = world.events()
    assert event.reason is EventReason.REBOOT_NEEDED
    assert "4152.2.0" in event.message


def test_admin_set_reboot_needed_annotation_gets_its_label_and_a_cycle() -> None:
    world = World(engine=IDLE)
    world.set_annotation("reboot-needed", "true")

    world.run()

    assert world.reboots == 1
    first_event = world.events()[0]
    assert first_event.reason is EventReason.REBOOT_NEEDED
    assert "reboot-needed annotation" in first_event.message
    assert PatchNode(NodePatch(reboot_needed=True,
                               reboot_reason="reboot-needed=true set on the node")) in world.actions


def test_update_engine_status_is_mirrored_only_when_it_changed() -> None:
    world = World(engine=IDLE, coordinator=False)

    first = world.step()
    second = world.step()

    assert writes(first) == [NodePatch(status="UPDATE_STATUS_IDLE", new_version="0.0.0",
                                       last_checked_time="1700000000")]
    assert writes(second) == []
    world.engine = replace(IDLE, last_checked_time=1700000500)
    assert writes(world.step()) == [], "a check that found nothing is not news"
    world.engine = replace(IDLE, last_checked_time=1700003600)
    assert writes(world.step()) == [NodePatch(last_checked_time="1700003600")]


@pytest.mark.parametrize(
    ("recorded", "engine", "written"),
    [
        # A check that found nothing: last-checked-time once the recorded one is an hour old.
        ("1700000000", replace(IDLE, last_checked_time=1700003599), []),
        ("1700000000", replace(IDLE, last_checked_time=1700003600),
         [NodePatch(last_checked_time="1700003600")]),
        # The check itself is not shown: it lasts seconds, what it finds is shown next.
        ("1700000000", replace(IDLE, last_checked_time=1700003600,
                               current_operation="UPDATE_STATUS_CHECKING_FOR_UPDATE"),
         [NodePatch(last_checked_time="1700003600")]),
        ("1700000000", replace(IDLE, current_operation="UPDATE_STATUS_CHECKING_FOR_UPDATE"),
         []),
        # What a check found carries its time along.
        ("1700000000", replace(NEED_REBOOT, last_checked_time=1700000300),
         [NodePatch(status="UPDATE_STATUS_UPDATED_NEED_REBOOT", new_version="4152.2.0",
                    last_checked_time="1700000300")]),
        ("1700000000", replace(IDLE, last_checked_time=1700000300,
                               current_operation="UPDATE_STATUS_DOWNLOADING"),
         [NodePatch(status="UPDATE_STATUS_DOWNLOADING", last_checked_time="1700000300")]),
        # A recorded time that cannot be right gives way at once.
        ("", replace(IDLE, last_checked_time=1700000300),
         [NodePatch(last_checked_time="1700000300")]),
        ("soon", replace(IDLE, last_checked_time=1700000300),
         [NodePatch(last_checked_time="1700000300")]),
        ("1800000000", replace(IDLE, last_checked_time=1700000300),
         [NodePatch(last_checked_time="1700000300")]),
    ],
    ids=["check-59-min", "check-60-min", "checking-60-min", "checking", "found-update",
         "downloading", "none-recorded", "unreadable", "ahead"],
)
def test_update_engine_checks_write_only_what_changed_and_the_check_time_hourly(
    recorded: str, engine: UpdateEngineStatus, written: list[NodePatch]
) -> None:
    world = World(engine=IDLE, coordinator=False)
    world.run_until(Idle)
    world.step()
    world.annotations[KEYS.last_checked_time] = recorded
    world.engine = engine

    decision = world.step()

    assert [p for p in writes(decision) if p.reboot_needed is None] == written


REQUIRED = "/run/reboot-required (packages: containerd, kubernetes)"
# The two triggers on the host: what the observation says, the state it reads as, the
# reason recorded on the node and the start of the RebootNeeded Event.
HOST_TRIGGERS = {
    "sigusr1": ({"requested_on_host": True}, RebootNeeded(on_host=True),
                "requested on the host (SIGUSR1)", "reboot requested on the host (SIGUSR1"),
    "reboot-required": ({"reboot_required": REQUIRED}, RebootNeeded(required_file=REQUIRED),
                        REQUIRED, f"{REQUIRED} asks for a reboot"),
}


@pytest.mark.parametrize("trigger", sorted(HOST_TRIGGERS))
@pytest.mark.parametrize(
    ("node_fields", "state"),
    [
        ({}, None),  # idle: the trigger's own RebootNeeded
        ({"reboot_needed": True}, WaitingForGrant()),  # already needed: nothing new
        (RECORDED, Draining(started_at=None, deadline=None)),  # a cycle is on
    ],
    ids=["idle", "already-needed", "in-progress"],
)
def test_a_reboot_asked_for_on_the_host_is_announced_only_when_none_is_needed(
    trigger: str, node_fields: dict[str, bool], state: State | None
) -> None:
    observed, needed, reason, message = HOST_TRIGGERS[trigger]
    observation = replace(obs(**node_fields), unschedulable=bool(node_fields),
                          **observed)  # type: ignore[arg-type]

    decision = decide(observation, T0)

    assert decision.state == (state or needed)
    announcement = NodePatch(reboot_needed=True, reboot_reason=reason)
    assert (announcement in writes(decision)) is (state is None)
    if state is None:
        [event] = [a for a in decision.actions if isinstance(a, EmitEvent)]
        assert event.reason is EventReason.REBOOT_NEEDED
        assert event.message.startswith(message)


def test_unknown_update_engine_operation_is_mirrored_raw_and_starts_nothing() -> None:
    world = World(engine=replace(IDLE, current_operation="UPDATE_STATUS_SOMETHING_NEW"),
                  coordinator=False)

    decision = world.step()

    assert isinstance(decision.state, Idle)
    assert world.annotations[KEYS.status] == "UPDATE_STATUS_SOMETHING_NEW"
    assert KEYS.reboot_needed not in world.annotations


def test_waits_for_the_grant_without_writing() -> None:
    world = World(coordinator=False)
    world.step()

    decision = world.step()

    assert isinstance(decision.state, WaitingForGrant)
    assert decision.actions == ()
    assert decision.recheck_after is None


# --- the grant, cordon and drain --------------------------------------------------------


def test_grant_marks_and_cordons_the_node_in_one_write() -> None:
    world = granted_world()

    decision = world.step()

    assert [a for a in decision.actions if isinstance(a, PatchNode)] == [PatchNode(
        NodePatch(reboot_in_progress=True, agent_made_unschedulable=True, blocked_reason=""),
        unschedulable=True,
    )]
    assert world.unschedulable
    assert isinstance(decision.next_state, Draining)
    assert isinstance(world.state(), Draining)


def test_grant_on_a_node_an_admin_cordoned_does_not_mark_or_cordon_it() -> None:
    world = granted_world(unschedulable=True)

    decision = world.step()

    assert [a for a in decision.actions if isinstance(a, PatchNode)] == [
        PatchNode(NodePatch(reboot_in_progress=True, blocked_reason=""))]
    assert isinstance(world.state(), Draining)
    assert not world.node.agent_made_unschedulable


@pytest.mark.parametrize(
    ("cordoned_by_admin", "ends_cordoned"),
    [(False, False), (True, True)],
    ids=["agent-cordoned-is-uncordoned", "admin-cordoned-stays-cordoned"],
)
def test_uncordons_only_when_agent_cordoned(cordoned_by_admin: bool, ends_cordoned: bool) -> None:
    world = World(unschedulable=cordoned_by_admin)

    world.run()

    assert world.unschedulable is ends_cordoned
    assert bool(cordon_writes(world.actions, False)) is not cordoned_by_admin
    assert world.annotations[KEYS.agent_made_unschedulable] == "false"


def test_after_the_reboot_uncordons_and_clears_the_marks_in_one_write() -> None:
    world = World(coordinator=False)
    world.set_annotation("reboot-ok", "true")
    world.run_until(WaitingForAfterReboot)
    world.set_annotation("reboot-ok", "false")

    decision = world.step()

    assert isinstance(decision.state, Uncordoning)
    assert [a for a in decision.actions if isinstance(a, PatchNode)] == [PatchNode(
        NodePatch(agent_made_unschedulable=False, boot_id_before_reboot=""),
        unschedulable=False,
    )]
    assert isinstance(decision.next_state, Idle)
    assert isinstance(world.state(), Idle)
    assert not world.unschedulable


def test_after_the_coordinators_finishing_reset_the_agent_writes_nothing() -> None:
    # cluo-coord's reset of a proven reboot uncordons the node and removes the mark and the
    # boot id in its own write: the cycle is over for the agent without a write of its own.
    world = World(coordinator=False)
    world.set_annotation("reboot-ok", "true")
    world.run_until(WaitingForAfterReboot)
    world.set_annotation("reboot-ok", "false")
    del world.annotations[KEYS.agent_made_unschedulable]
    del world.annotations[KEYS.boot_id_before_reboot]
    world.unschedulable = False

    decision = world.step()

    assert isinstance(decision.state, Idle)
    assert [a for a in decision.actions if isinstance(a, (PatchNode, EmitEvent))] == []
    assert not world.unschedulable


def test_after_an_older_coordinators_uncordoning_reset_only_the_boot_id_is_removed() -> None:
    # A coordinator of the last release uncordons the node and removes the mark in its
    # reset but leaves the boot id: the agent's last write removes it.
    world = World(coordinator=False)
    world.set_annotation("reboot-ok", "true")
    world.run_until(WaitingForAfterReboot)
    assert world.unschedulable
    world.set_annotation("reboot-ok", "false")
    del world.annotations[KEYS.agent_made_unschedulable]
    world.unschedulable = False

    decision = world.step()

    assert isinstance(decision.state, Uncordoning)
    assert [a for a in decision.actions if isinstance(a, PatchNode)] == [
        PatchNode(NodePatch(agent_made_unschedulable=False, boot_id_before_reboot=""))]
    assert not [a for a in decision.actions if isinstance(a, EmitEvent)]
    assert isinstance(world.state(), Idle)
    assert not world.unschedulable
    assert KEYS.boot_id_before_reboot not in world.annotations


def test_a_cycle_writes_the_node_once_per_step() -> None:
    world = World(engine=None, labels={}, annotations={})
    world.set_annotation("reboot-needed", "true")

    world.run()

    cycle = [a for a in world.actions_of(PatchNode)
             if isinstance(a, PatchNode) and a.patch.status is None]  # not the mirror's
    reason = "reboot-needed=true set on the node"
    assert cycle == [
        PatchNode(NodePatch(reboot_needed=True, reboot_reason=reason)),
        PatchNode(NodePatch(reboot_in_progress=True, agent_made_unschedulable=True,
                            blocked_reason=""), unschedulable=True),
        PatchNode(NodePatch(boot_id_before_reboot="boot-0", blocked_reason="")),
        PatchNode(NodePatch(reboot_needed=False, reboot_in_progress=False, blocked_reason="",
                            reboot_reason="")),
        PatchNode(NodePatch(agent_made_unschedulable=False, boot_id_before_reboot=""),
                  unschedulable=False),
    ]


@pytest.mark.parametrize(
    ("case", "node_fields", "cordoned", "expected"),
    [
        ("marked, not cordoned, in progress",
         {**RECORDED, "agent_made_unschedulable": True}, False,
         PatchNode(NodePatch(), unschedulable=True)),
        ("marked, not cordoned, drained before",
         {**RECORDED, "agent_made_unschedulable": True, "boot_id_before_reboot": "boot-0"},
         False,
         PatchNode(NodePatch(agent_made_unschedulable=True, boot_id_before_reboot=""),
                   unschedulable=True)),
        ("rebooted, uncordoned, mark still set",
         {"agent_made_unschedulable": True, "boot_id_before_reboot": "boot-before"}, False,
         PatchNode(NodePatch(agent_made_unschedulable=False, boot_id_before_reboot=""))),
        ("aborted, uncordoned, mark still set",
         {"reboot_needed": True, "reboot_ok": True, "agent_made_unschedulable": True,
          "blocked_reason": "drain timed out"}, False,
         PatchNode(NodePatch(agent_made_unschedulable=False, boot_id_before_reboot=""))),
        ("aborted, our cordon still on",
         {"reboot_needed": True, "reboot_ok": True, "agent_made_unschedulable": True,
          "blocked_reason": "drain timed out"}, True,
         PatchNode(NodePatch(agent_made_unschedulable=False, boot_id_before_reboot=""),
                   unschedulable=False)),
    ],
)
def test_states_an_agent_that_wrote_mark_and_cordon_apart_left_end_in_one_write(
    case: str, node_fields: dict[str, object], cordoned: bool, expected: PatchNode
) -> None:
    observation = replace(obs(**node_fields), unschedulable=cordoned)

    decision = decide(observation, T0)

    assert [a for a in decision.actions if isinstance(a, PatchNode)] == [expected], case
    assert not isinstance(decision.next_state, Cordoning | Uncordoning), case


def test_happy_path_walks_every_phase_in_order_and_cleans_up() -> None:
    world = World()

    world.run()

    assert world.phases == [
        "RebootNeeded", "WaitingForGrant", "Granted", "Draining", "Rebooting", "Rebooted",
        "WaitingForAfterReboot", "Uncordoning",
    ]
    assert isinstance(world.state(), Idle)
    assert world.reboots == 1
    assert not world.unschedulable
    node = world.node
    assert (node.reboot_needed, node.reboot_in_progress, node.reboot_ok) == (False,) * 3
    assert world.labels[KEYS.reboot_needed] == "false"
    assert node.boot_id_before_reboot == ""
    assert node.blocked_reason == ""
    assert [e.reason for e in world.events()] == [
        EventReason.REBOOT_NEEDED, EventReason.REBOOT_GRANTED, EventReason.REBOOTING,
        EventReason.REBOOTED, EventReason.UNCORDONED,
    ]


def test_boot_id_is_recorded_only_after_the_drain_completed() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,))
    world.run_until(Draining)
    for _ in range(5):
        world.step()
    assert world.node.boot_id_before_reboot == ""

    world.drain_blockers = ()
    world.run_until(Rebooting)

    assert world.node.boot_id_before_reboot == "boot-0"


def test_works_with_the_fluo_prefix() -> None:
    keys = Keys(FLUO_PREFIX)

    written = NodePatch(reboot_needed=True, boot_id_before_reboot="").to_metadata(keys)
    annotations, labels = written.annotations, written.labels

    assert annotations == {
        FLUO_PREFIX + "reboot-needed": "true",
        FLUO_PREFIX + "boot-id-before-reboot": None,
    }
    assert labels == {FLUO_PREFIX + "reboot-needed": "true"}


# --- restarts ---------------------------------------------------------------------------


def test_restart_mid_drain_resumes_drain_not_new_cycle() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,))
    world.run_until(Draining)
    world.step()
    assert world.drain is not None
    writes_before = len(world.actions_of(PatchNode))

    world.crash()
    decision = world.step()

    assert isinstance(decision.state, Draining)
    assert decision.actions == (StartDrain(DrainOptions()),)
    assert len(world.actions_of(PatchNode)) == writes_before
    assert world.node.reboot_in_progress


def test_restart_after_boot_id_recorded_reboots_without_draining_again() -> None:
    world = granted_world()
    world.run_until(Rebooting)
    drains = len(world.actions_of(StartDrain))

    world.crash()
    world.run()

    assert world.reboots == 1
    assert len(world.actions_of(StartDrain)) == drains


def test_restart_with_same_boot_id_and_reboot_in_progress_is_not_taken_as_rebooted() -> None:
    observation = replace(
        obs(**RECORDED, boot_id_before_reboot="boot-0", agent_made_unschedulable=True),
        unschedulable=True,
    )

    decision = decide(observation, T0)

    assert isinstance(decision.state, Rebooting)
    assert [a.attempt for a in decision.actions if isinstance(a, Reboot)] == [1]
    assert all(p.reboot_needed is None for p in writes(decision))


def test_new_boot_id_proves_the_reboot_and_reports_it() -> None:
    observation = replace(
        obs(**RECORDED, boot_id_before_reboot="boot-0", agent_made_unschedulable=True),
        unschedulable=True, boot_id="boot-1",
    )

    decision = decide(observation, T0)

    assert isinstance(decision.state, Rebooted)
    assert writes(decision) == [NodePatch(reboot_needed=False, reboot_in_progress=False,
                                          blocked_reason="", reboot_reason="")]
    assert isinstance(decision.next_state, WaitingForAfterReboot)


def test_waits_for_reboot_ok_false_before_uncordoning() -> None:
    world = World(coordinator=False)
    world.set_annotation("reboot-ok", "true")
    world.run_until(WaitingForAfterReboot)

    for _ in range(3):
        decision = world.step()
        assert decision.actions == ()
        assert world.unschedulable

    world.set_annotation("reboot-ok", "false")
    world.run_until(Idle)
    assert not world.unschedulable


def test_admin_uncordoning_mid_drain_makes_the_agent_cordon_and_drain_again() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,))
    world.run_until(Draining)
    world.step()
    world.unschedulable = False  # kubectl uncordon

    decision = world.step()

    assert isinstance(decision.state, Cordoning)
    assert decision.actions == (AbortDrain(), PatchNode(NodePatch(), unschedulable=True))


def test_uncordoned_after_boot_id_recorded_clears_it_and_drains_again() -> None:
    world = granted_world()
    world.run_until(Rebooting)
    world.crash()
    world.unschedulable = False

    decision = world.step()

    assert isinstance(decision.state, Cordoning)
    assert decision.actions == (PatchNode(
        NodePatch(agent_made_unschedulable=True, boot_id_before_reboot=""), unschedulable=True),)
    world.run()
    assert world.reboots == 1
    assert len(world.actions_of(StartDrain)) == 2


# --- abort paths ------------------------------------------------------------------------


def test_drain_timeout_aborts_and_keeps_reboot_needed() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,), coordinator=False)
    world.run_until(Draining)

    world.run_until(GrantReturned)

    node = world.node
    assert node.reboot_needed and world.labels[KEYS.reboot_needed] == "true"
    assert not node.reboot_in_progress
    assert "drain timed out after 600s" in node.blocked_reason
    assert "shop/web-0 (eviction refused by a PodDisruptionBudget" in node.blocked_reason
    assert not world.unschedulable
    assert not node.agent_made_unschedulable
    assert world.drain is None
    assert world.now >= T0 + 600
    assert world.reboots == 0
    [timed_out] = [e for e in world.events() if e.reason is EventReason.DRAIN_TIMED_OUT]
    assert timed_out.type is EventType.WARNING


def test_drain_timeout_on_admin_cordoned_node_leaves_it_cordoned() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,), unschedulable=True, coordinator=False)

    world.run_until(GrantReturned)

    assert world.unschedulable
    assert not cordon_writes(world.actions, False)


def test_aborted_grant_is_not_taken_again_until_the_coordinator_takes_it_back() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,), coordinator=False)
    world.run_until(GrantReturned)
    grants = len([e for e in world.events() if e.reason is EventReason.REBOOT_GRANTED])

    for _ in range(5):
        decision = world.step()
        assert decision.actions == ()

    world.set_annotation("reboot-ok", "false")
    assert writes(world.step()) == [NodePatch(blocked_reason="")]
    world.drain_blockers = ()
    world.set_annotation("reboot-ok", "true")
    world.run_until(WaitingForAfterReboot)
    assert len([e for e in world.events() if e.reason is EventReason.REBOOT_GRANTED]) == grants + 1
    assert world.reboots == 1


def test_blocked_drain_is_retried_when_the_coordinator_grants_again() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,))
    world.run_until(GrantReturned)
    world.drain_blockers = ()  # the PDB allows a disruption now

    world.run()

    assert world.reboots == 1
    assert not world.unschedulable


def test_crash_in_abort_between_patch_and_uncordon_uncordons_instead_of_draining() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,), coordinator=False)
    world.run_until(Draining)
    world.now += 601
    world.step()  # StartDrain
    world.now += 601
    decision = world.step(crash_after=2)  # AbortDrain, PatchNode(in-progress=false) | crash
    assert isinstance(decision.state, Draining)
    assert world.unschedulable

    after = world.step()

    assert isinstance(after.state, Uncordoning)
    assert cordon_writes(after.actions, False)
    world.run_until(GrantReturned)
    assert not world.observe().unschedulable
    assert len(world.actions_of(StartDrain)) == 1


def test_pods_without_controller_are_reported_while_draining_not_crash_looped() -> None:
    world = granted_world(drain_blockers=(NO_CONTROLLER,))
    world.run_until(Draining)

    world.step()  # start
    decision = world.step()

    assert "drain blocked: default/debug (has no controller" in world.node.blocked_reason
    assert world.node.reboot_in_progress
    assert any(isinstance(a, EmitEvent) and a.reason is EventReason.DRAIN_BLOCKED
               for a in decision.actions)
    assert writes(world.step()) == []  # reported once, not on every decision


def test_force_policy_deletes_past_the_pdb_once_then_reboots() -> None:
    config = AgentConfig(drain_timeout_policy=DrainTimeoutPolicy.FORCE)
    world = granted_world(drain_blockers=(PDB_BLOCKER,), config=config)

    world.run()

    assert len(world.actions_of(ForceDrain)) == 1
    assert world.reboots == 1
    assert not world.actions_of(AbortDrain) or world.node.blocked_reason == ""
    assert EventReason.DRAIN_TIMED_OUT not in [e.reason for e in world.events()]


def test_force_policy_aborts_when_forcing_does_not_finish_the_drain() -> None:
    config = AgentConfig(drain_timeout_policy=DrainTimeoutPolicy.FORCE)
    stuck = PodBlocker("shop", "web-0", BlockReason.TERMINATING, "finalizer never removed")
    world = granted_world(drain_blockers=(stuck,), config=config, coordinator=False,
                          force_deletes=False)

    world.run_until(GrantReturned)

    assert len(world.actions_of(ForceDrain)) == 1
    assert world.now >= T0 + 1200
    assert "and again 600s after forcing" in world.node.blocked_reason
    assert "shop/web-0 (still terminating: finalizer never removed)" in world.node.blocked_reason
    assert world.reboots == 0
    assert not world.unschedulable


def test_force_policy_does_not_force_past_pods_without_controller() -> None:
    config = AgentConfig(drain_timeout_policy=DrainTimeoutPolicy.FORCE)
    world = granted_world(drain_blockers=(NO_CONTROLLER,), config=config, coordinator=False)

    world.run_until(GrantReturned)

    assert not world.actions_of(ForceDrain)
    assert "default/debug (has no controller" in world.node.blocked_reason


def test_grant_withdrawn_mid_drain_aborts_and_uncordons() -> None:
    world = granted_world(drain_blockers=(PDB_BLOCKER,), coordinator=False)
    world.run_until(Draining)
    world.step()
    world.set_annotation("reboot-ok", "false")

    decision = world.step()

    assert isinstance(decision.state, GrantWithdrawn)
    assert decision.actions[:2] == (AbortDrain(), ClearRebootAttempts())
    world.run_until(WaitingForGrant)
    node = world.node
    assert node.reboot_needed and not node.reboot_in_progress
    assert not world.unschedulable
    assert world.reboots == 0


def test_grant_withdrawn_waits_for_a_reboot_logind_already_accepted() -> None:
    observation = replace(
        obs(reboot_in_progress=True, reboot_needed=True, boot_id_before_reboot="boot-0",
            agent_made_unschedulable=True),
        unschedulable=True,
        reboot_attempts=(RebootAttempt(T0, RebootOutcome.REQUESTED),),
    )

    waiting = decide(observation, T0 + 10)
    aborting = decide(observation, T0 + 301)

    assert waiting.actions == ()
    assert waiting.recheck_after == timedelta(seconds=290)
    assert AbortDrain() in aborting.actions


# --- reboot failures --------------------------------------------------------------------


def test_reboot_refused_is_reported_and_retried_with_backoff() -> None:
    world = granted_world(reboot_outcomes=[RebootOutcome.INHIBITED] * 3)
    world.run_until(Rebooting)
    tried_at: list[float] = []
    reasons: list[str] = []

    while world.reboots == 0:
        before = len(world.actions_of(Reboot))
        now = world.now
        world.step()
        if len(world.actions_of(Reboot)) > before:
            tried_at.append(now)
        if world.node.blocked_reason and world.node.blocked_reason not in reasons:
            reasons.append(world.node.blocked_reason)

    assert [b - a for a, b in pairwise(tried_at)] == pytest.approx([10, 20, 40], abs=0.5)
    assert [a.attempt for a in world.actions if isinstance(a, Reboot)] == [1, 2, 3, 4]
    assert reasons == [f"reboot attempt {n} inhibited: inhibited; retrying {s}s after it failed"
                       for n, s in ((1, 10), (2, 20), (3, 40))]
    failures = [e for e in world.events() if e.reason is EventReason.REBOOT_FAILED]
    assert len(failures) == 3
    assert all(e.type is EventType.WARNING for e in failures)
    # What happened, in order: three refusals, then the one reboot that went through.
    assert [(e.reason, e.message.split(";")[0]) for e in world.events()[-4:]] == [
        *[(EventReason.REBOOT_FAILED, f"reboot attempt {n} inhibited: inhibited")
          for n in (1, 2, 3)],
        (EventReason.REBOOTING, "drained"),
    ]
    [rebooting] = [e for e in world.events() if e.reason is EventReason.REBOOTING]
    assert rebooting.message == "drained; rebooting (attempt 4, accepted by logind)"
    world.run()
    assert world.node.blocked_reason == ""


def test_reboot_failure_keeps_the_slot_and_never_gives_up() -> None:
    world = granted_world(reboot_outcomes=[RebootOutcome.FAILED] * 30)

    for _ in range(150):
        world.step()

    assert world.reboots == 0
    node = world.node
    assert node.reboot_in_progress and node.reboot_ok and world.unschedulable
    assert len(world.actions_of(Reboot)) > 10
    world.reboot_outcomes.clear()
    world.run()
    assert world.reboots == 1


def test_reboot_backoff_doubles_and_is_capped() -> None:
    config = AgentConfig(reboot_retry_base=10, reboot_retry_max=60)

    assert [config.reboot_backoff(n) for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    assert config.reboot_backoff(10_000) == 60


def test_accepted_reboot_that_never_happens_counts_as_a_failure() -> None:
    observation = replace(
        obs(**RECORDED, boot_id_before_reboot="boot-0", agent_made_unschedulable=True),
        unschedulable=True,
        reboot_attempts=(RebootAttempt(T0, RebootOutcome.REQUESTED),),
    )

    waiting = decide(observation, T0 + 60)
    reported = decide(observation, T0 + 301)
    retried = decide(observation, T0 + 311)

    assert waiting.actions == () and waiting.recheck_after == timedelta(seconds=240)
    [report] = writes(reported)
    assert report.blocked_reason is not None
    assert "accepted by logind but the host is still up after 300s" in report.blocked_reason
    assert [a.attempt for a in retried.actions if isinstance(a, Reboot)] == [2]


@pytest.mark.parametrize(
    ("inhibitor", "blocks"),
    [
        (Inhibitor("shutdown", "backup", "copying", "block", 0, 42), True),
        (Inhibitor("sleep:shutdown:idle", "backup", "copying", "block", 0, 42), True),
        (Inhibitor("shutdown", "NetworkManager", "tear down", "delay", 0, 7), False),
        (Inhibitor("sleep", "gnome", "lid", "block", 1000, 8), False),
        (Inhibitor("handle-power-key", "logind", "", "block", 0, 1), False),
    ],
)
def test_only_block_inhibitors_on_shutdown_stop_a_reboot(
    inhibitor: Inhibitor, blocks: bool
) -> None:
    assert (blocking_inhibitors([inhibitor]) == (inhibitor,)) is blocks


# --- the transition table ---------------------------------------------------------------


def test_illegal_transition_raises() -> None:
    with pytest.raises(IllegalTransition, match="from Idle to Rebooting"):
        check_transition(Idle(), Rebooting(attempt=0))
    with pytest.raises(IllegalTransition):
        check_transition(Draining(started_at=None, deadline=None), Rebooted("a", "b"))


def test_legal_transition_passes() -> None:
    check_transition(Draining(started_at=T0, deadline=T0 + 600), Rebooting(attempt=0))


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    states = set(State.__subclasses__())

    assert set(TRANSITIONS) == states
    assert set().union(*TRANSITIONS.values()) <= states


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="drain_timeout"):
        AgentConfig(drain_timeout=0)
    with pytest.raises(ValueError, match="reboot_retry_max"):
        AgentConfig(reboot_retry_base=100, reboot_retry_max=10)


# --- properties -------------------------------------------------------------------------

boot_ids = st.sampled_from(["", "boot-0", "boot-1"])
blockers = st.lists(st.sampled_from([PDB_BLOCKER, NO_CONTROLLER]), max_size=2).map(tuple)
drains = st.none() | st.builds(
    DrainStatus,
    started_at=st.floats(0, 2000),
    complete=st.booleans(),
    forced_at=st.none() | st.floats(0, 2000),
    blockers=blockers,
)
attempts = st.lists(
    st.builds(RebootAttempt, at=st.floats(0, 2000), outcome=st.sampled_from(RebootOutcome)),
    max_size=3,
).map(tuple)
observations = st.builds(
    Observation,
    node=st.builds(
        NodeProtocolState,
        reboot_needed=st.booleans(),
        reboot_in_progress=st.booleans(),
        reboot_ok=st.booleans(),
        agent_made_unschedulable=st.booleans(),
        boot_id_before_reboot=boot_ids,
        blocked_reason=st.sampled_from(["", "drain timed out"]),
    ),
    unschedulable=st.booleans(),
    reboot_needed_label=st.booleans(),
    boot_id=st.sampled_from(["boot-0", "boot-1"]),
    engine=st.sampled_from([None, IDLE, NEED_REBOOT]),
    drain=drains,
    reboot_attempts=attempts,
    config=st.sampled_from([AgentConfig(),
                            AgentConfig(drain_timeout_policy=DrainTimeoutPolicy.FORCE)]),
)


@settings(max_examples=500, deadline=None)
@given(observation=observations, now=st.floats(0, 4000))
def test_decide_is_total_and_never_acts_unsafely(observation: Observation, now: float) -> None:
    decision = decide(observation, now)  # raises on an illegal move

    node = observation.node
    for action in decision.actions:
        if isinstance(action, Reboot):
            assert node.reboot_ok and node.reboot_in_progress and observation.unschedulable
            assert node.boot_id_before_reboot == observation.boot_id
        if isinstance(action, PatchNode) and action.unschedulable is False:
            assert node.agent_made_unschedulable  # uncordons only what the agent cordoned
        if isinstance(action, PatchNode) and action.unschedulable is True:
            assert action.patch.apply_to(node).agent_made_unschedulable  # with the mark
    assert decision.recheck_after is None or decision.recheck_after >= timedelta(0)


@settings(max_examples=300, deadline=None)
@given(
    cordoned_by_admin=st.booleans(),
    crashes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3)), max_size=6),
)
def test_any_crash_point_ends_with_one_reboot_and_uncordon_iff_agent_cordoned(
    cordoned_by_admin: bool, crashes: list[tuple[int, int]]
) -> None:
    """Crash before or after any action of any decision, any number of times.

    The happy path takes about a dozen decisions of at most three actions each.
    """
    world = World(unschedulable=cordoned_by_admin)
    crash_at = dict(crashes)

    for decision_index in range(300):
        if world.cycle_over():
            break
        world.step(crash_after=crash_at.get(decision_index))
    else:
        raise AssertionError(f"cycle did not end; phases: {world.phases}")

    assert world.reboots == 1
    assert world.unschedulable is cordoned_by_admin
    node = world.node
    assert not (node.reboot_needed or node.reboot_in_progress or node.agent_made_unschedulable)
    assert node.boot_id_before_reboot == "" and node.blocked_reason == ""


def test_update_engine_reason_goes_first_when_both_ask() -> None:
    observation = replace(obs(), engine=NEED_REBOOT, reboot_required=REQUIRED)

    decision = decide(observation, T0)

    assert isinstance(decision.state, RebootNeeded)
    [patch] = [p for p in writes(decision) if p.reboot_needed]
    assert patch.reboot_reason is not None
    assert patch.reboot_reason.startswith("update_engine: version ")


def test_a_reason_left_after_reboot_needed_false_is_removed() -> None:
    observation = replace(obs(), node=replace(obs().node, reboot_reason="left over"))

    decision = decide(observation, T0)

    assert isinstance(decision.state, Idle)
    assert writes(decision) == [NodePatch(reboot_reason="")]
