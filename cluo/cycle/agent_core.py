"""The agent's decisions: a pure function of what it observed and the time.

``decide(observation, now) -> Decision``. The async driver gathers an ``Observation``
(the node's protocol annotations, whether the node is cordoned, update_engine's status,
the boot id, the drain it runs, the reboot attempts it made), calls ``decide``, performs
the decision's actions in order, and calls ``decide`` again after ``recheck_after``
seconds, or sooner: when anything it watches changes (node, update_engine) and when an
action's result arrives (drain progress, a recorded reboot attempt). If an action fails,
the driver stops there and decides again from a fresh observation: every step is
level-based, so the next decision redoes whatever did not happen. ``EmitEvent`` is best
effort: its failure is logged and does not stop the actions after it.

``now`` is the driver's **monotonic** clock in seconds (the event loop's ``loop.time()``).
Every time in an ``Observation`` (``DrainStatus.started_at``, ``RebootAttempt.at``, ...)
is on that same clock. The core only measures durations, so no wall clock is needed.

States are derived, never stored. ``derive_state(observation)`` reads the state from the
cluster (annotations, spec.unschedulable) and the host (boot id, the drain and the
reboot attempts of this process). It is total: any observation maps to one state. A
restart loses the drain and the reboot attempts, which only restarts the drain timer and
the reboot backoff; everything that must survive a restart is on the node.

Each decision names the state its actions lead to (``Decision.next_state``), and that
move must be in ``TRANSITIONS``, the table of moves the agent makes by its own writes;
anything else raises ``IllegalTransition``. Moves made by others (update_engine asks for
a reboot, the coordinator grants or withdraws, the host reboots) are not in the table:
the next ``derive_state`` simply sees them.

The cycle and its writes, one write (one request) per decision, in this order:

    Idle
      │ update_engine says UPDATED_NEED_REBOOT, /run/reboot-required exists
      │ (Observation.reboot_required), an admin set reboot-needed=true, or root on the
      │ host sent the agent SIGUSR1 (Observation.requested_on_host)
    RebootNeeded ── W1 reboot-needed=true (annotation + label), reboot-reason
    WaitingForGrant
      │ the coordinator sets reboot-ok=true
    Granted ─────── W2 reboot-in-progress=true, blocked-reason cleared and, unless already
      │                cordoned, agent-made-unschedulable=true + spec.unschedulable=true
      │                (one patch of metadata and spec)
    Draining ────── start the drain (local); when complete: W3 boot-id-before-reboot=<boot id>
    Rebooting ───── check logind inhibitors, Reboot(false); a refusal is reported
      │                (Event + blocked-reason) and retried with exponential backoff
      │ the host reboots: the boot id differs from boot-id-before-reboot
    Rebooted ────── W4 reboot-needed=false (annotation + label), reboot-in-progress=false,
      │                reboot-reason removed
    WaitingForAfterReboot
      │ the coordinator sets reboot-ok=false (after-reboot hooks done); cluo-coord
      │ uncordons the node in that write and removes agent-made-unschedulable and
      │ boot-id-before-reboot: Idle, with nothing to write. Only when a reset left
      │ them (an older coordinator's, or the end of an aborted cycle):
    Uncordoning ─── W5 agent-made-unschedulable=false, boot-id-before-reboot removed and,
                       only if agent-made-unschedulable=true and still cordoned,
                       spec.unschedulable=false (one patch of metadata and spec)
    Idle

Cordoning is off this path: it is an open cycle on a schedulable node (someone uncordoned
it mid-cycle, or an older agent, which marked and cordoned in two writes, stopped in
between). One patch cordons it, marking it too if the mark is missing, after stopping any
drain that ran meanwhile.

Crash points (a restart re-derives the state from the node and the host):

- before W1: update_engine repeats NEED_REBOOT (it survives an update_engine restart and
  is re-read with GetStatus on start), so W1 is redone.
- before W2: reboot-ok=true, reboot-needed=true, nothing else: Granted again. W2 is one
  request, so the mark and the cordon land together or not at all: the node is never
  cordoned by us without the mark, nor marked without the cordon. (A mark without a
  cordon, left by an older agent, reads as Cordoning; W5 uncordons only a node that is
  cordoned.)
- during the drain (after W2, before W3): in progress, cordoned, no boot id recorded:
  Draining with no drain running in this process, so the drain starts again (evictions
  are idempotent; the drain timeout starts again).
- between W3 and the reboot call: the recorded boot id is the current one: Rebooting,
  which calls Reboot without draining again (the node stayed cordoned; if someone
  uncordoned it meanwhile, Cordoning clears the recorded boot id and the drain is redone).
- the reboot is refused or fails: still Rebooting, the slot is kept, it is reported and
  retried; a restart only restarts the backoff.
- logind accepted the reboot but the host stays up for ``reboot_timeout``: reported as a
  failed attempt and retried.
- after the reboot, before W4: reboot-in-progress=true and the boot id differs: Rebooted,
  W4 again. A different boot id is the proof; the same boot id with reboot-in-progress
  means the agent restarted without a reboot and resumes (Draining or Rebooting), never
  starting a new cycle.
- W4 keeps boot-id-before-reboot, so the coordinator can compare it with the kubelet's
  bootID, and so the agent still knows the cycle is open until W5.
- before W5: the mark set, cordoned: Uncordoning again. W5 is one request, so the
  uncordon and the mark's removal land together: the right to uncordon is never lost
  before the uncordon is done. (Uncordoned with the mark still set, left by an older
  agent or by an admin's uncordon, reads as Uncordoning too, whose W5 then leaves
  spec.unschedulable alone.)

Abort paths:

- Drain timeout (policy ``abort``, the default): stop the drain, then one patch
  reboot-in-progress=false + blocked-reason=<which pods blocked and why>, keeping
  reboot-needed=true and agent-made-unschedulable; then W5 (Uncordoning). The patch
  comes *before* the uncordon: had we uncordoned first and crashed, in-progress + mark +
  not cordoned would read as Cordoning and restart the drain. After the mark is cleared
  the node reads as GrantReturned (reboot-ok=true, not in progress, blocked-reason set):
  the agent hands the grant back and does not take it again; the coordinator sees
  blocked-reason, sets reboot-ok=false and releases the slot; the agent then clears
  blocked-reason (WaitingForGrant) and the next grant is a new cycle. Policy ``force``:
  at the timeout the driver deletes the remaining pods ignoring PodDisruptionBudgets
  (unless some pod blocks for good, e.g. it has no controller), and the drain gets one
  more timeout before it aborts the same way.
- Grant withdrawn (reboot-ok=false while in progress, before the reboot): stop the drain,
  forget reboot attempts, one patch reboot-in-progress=false + boot-id-before-reboot
  removed, then Uncordoning (W5). A reboot logind already accepted cannot be taken back:
  the agent waits ``reboot_timeout`` for it first.
- Reboot refused or failed: never aborted by the agent (see above); an admin can release
  the slot, which withdraws the grant.

This module is pure: it imports no I/O library and reads no clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta

from cluo.cycle.config import AgentConfig, DrainTimeoutPolicy
from cluo.cycle.drain_plan import DrainOptions, PodBlocker, describe_blockers
from cluo.cycle.update_status import UpdateEngineStatus, UpdateOperation
from cluo.protocol import NodePatch, NodeProtocolState

# An annotation value is free text, but a node is not a log: keep reasons short.
MAX_REASON_CHARS = 1000
# update_engine checks for updates periodically, each check with a new last_checked_time.
# A check that changes nothing else moves the node's last-checked-time only when the one
# recorded is this much older (seconds), so an idle node is written at most once an hour.
LAST_CHECKED_REFRESH = 3600


# --- what the driver observes on the host -----------------------------------------------


@dataclass(frozen=True)
class DrainStatus:
    """The drain this process runs. ``Observation.drain`` is ``None`` when none runs."""

    started_at: float
    complete: bool = False
    forced_at: float | None = None  # when ForceDrain was done, if it was
    # Every pod the drain still waits for, and why.
    blockers: tuple[PodBlocker, ...] = ()


class RebootOutcome(enum.Enum):
    REQUESTED = "requested"  # logind accepted Reboot(false); the host should go down
    INHIBITED = "inhibited"  # not called: a block inhibitor on shutdown is held
    REFUSED = "refused"  # logind answered with an error (denied, inhibited on systemd 257+)
    FAILED = "failed"  # the call failed (bus gone, timeout)


@dataclass(frozen=True)
class RebootAttempt:
    at: float
    outcome: RebootOutcome
    detail: str = ""


@dataclass(frozen=True)
class Observation:
    """Everything the agent knows right now."""

    node: NodeProtocolState  # the node's annotations and labels, typed
    unschedulable: bool  # spec.unschedulable
    reboot_needed_label: bool  # the reboot-needed label (NodeProtocolState lacks it)
    boot_id: str  # /proc/sys/kernel/random/boot_id
    engine: UpdateEngineStatus | None = None  # None until the first GetStatus
    drain: DrainStatus | None = None
    reboot_attempts: tuple[RebootAttempt, ...] = ()  # this process, this cycle, in order
    # Root on the host asked this process for a reboot (SIGUSR1) that the node does not
    # carry yet (the driver forgets the request once the node says reboot-needed=true).
    requested_on_host: bool = False
    # /run/reboot-required exists: its description (with the .pkgs list), None if absent.
    reboot_required: str | None = None
    config: AgentConfig = field(default_factory=AgentConfig)


# --- what the driver does ---------------------------------------------------------------


class EventType(enum.Enum):
    NORMAL = "Normal"
    WARNING = "Warning"


class EventReason(enum.Enum):
    REBOOT_NEEDED = "RebootNeeded"
    REBOOT_GRANTED = "RebootGranted"
    DRAIN_BLOCKED = "DrainBlocked"
    DRAIN_FORCED = "DrainForced"
    DRAIN_TIMED_OUT = "DrainTimedOut"
    REBOOTING = "Rebooting"
    REBOOT_FAILED = "RebootFailed"
    REBOOTED = "Rebooted"
    GRANT_WITHDRAWN = "GrantWithdrawn"
    UNCORDONED = "Uncordoned"
    STATUS_UPDATE_IGNORED = "StatusUpdateIgnored"  # posted by the driver, not decided


@dataclass(frozen=True)
class Action:
    """Something the driver does. Actions of one decision are done in order."""


@dataclass(frozen=True)
class PatchNode(Action):
    """One write of the node, one request: its metadata (``patch.to_metadata(keys)``,
    cluo.protocol) and, unless ``unschedulable`` is None, spec.unschedulable (True
    cordons, False uncordons). The API server applies all of it or none."""

    patch: NodePatch
    unschedulable: bool | None = None


@dataclass(frozen=True)
class StartDrain(Action):
    """Start draining in the background (drain_plan + Eviction API), reporting DrainStatus."""

    options: DrainOptions


@dataclass(frozen=True)
class ForceDrain(Action):
    """Delete the pods the drain still evicts, ignoring PodDisruptionBudgets."""


@dataclass(frozen=True)
class AbortDrain(Action):
    """Stop the running drain, if any, and forget its DrainStatus."""


@dataclass(frozen=True)
class ClearRebootAttempts(Action):
    """Forget the reboot attempts of the cycle being abandoned (resets the backoff)."""


@dataclass(frozen=True)
class Reboot(Action):
    """Check logind inhibitors (``inhibitors.blocking_inhibitors``); if none, call Reboot(false).

    Record the result as a ``RebootAttempt``: REQUESTED, INHIBITED, REFUSED or FAILED.
    Only once logind accepted (REQUESTED), post the ``Rebooting`` Event with
    ``accepted_message`` (best effort, as ``EmitEvent``): an Event says what happened, so
    an attempt that did not go through posts none here; the next decision reports it.
    """

    attempt: int  # 1 for the first attempt of the cycle in this process
    accepted_message: str


@dataclass(frozen=True)
class EmitEvent(Action):
    """A Kubernetes Event on the node (best effort: a failure does not stop the rest)."""

    reason: EventReason
    message: str
    type: EventType = EventType.NORMAL


# --- states -----------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """Base of the agent's states. Each state carries what its decision needs."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Idle(State):
    """No reboot needed, no cycle open."""

    stale_blocked_reason: str = ""  # left from an abandoned cycle: clear it
    stale_label: bool = False  # reboot-needed label says true, annotation false
    stale_reboot_reason: bool = False  # reboot-reason left after reboot-needed=false


@dataclass(frozen=True)
class RebootNeeded(State):
    """A reboot is needed and the node does not say so yet (annotation or label)."""

    new_version: str = ""
    by_admin: bool = False  # the reboot-needed annotation was set by hand
    on_host: bool = False  # root on the host asked the agent (SIGUSR1)
    required_file: str = ""  # /run/reboot-required exists: its description


@dataclass(frozen=True)
class WaitingForGrant(State):
    """reboot-needed=true; waiting for the coordinator's reboot-ok=true."""

    stale_blocked_reason: str = ""  # the coordinator took back a returned grant: clear it


@dataclass(frozen=True)
class Granted(State):
    """reboot-ok=true while reboot-needed: start the cycle."""

    already_cordoned: bool  # someone else cordoned the node: it stays cordoned after


@dataclass(frozen=True)
class Cordoning(State):
    """In progress, node schedulable: mark it as ours, then cordon."""

    marked: bool  # agent-made-unschedulable=true and no stale boot id recorded


@dataclass(frozen=True)
class Draining(State):
    """In progress, cordoned, boot id not recorded yet."""

    started_at: float | None  # None: no drain runs in this process yet
    deadline: float | None
    complete: bool = False
    forced: bool = False
    blockers: tuple[PodBlocker, ...] = ()


@dataclass(frozen=True)
class Rebooting(State):
    """Drained, boot id recorded (it is the current one): reboot, retry until it happens."""

    attempt: int  # attempts made by this process in this cycle
    pending_until: float | None = None  # logind accepted; the host should be down by then
    failure: str = ""  # how the last attempt failed, once it has failed
    next_try_at: float | None = None  # None: now


@dataclass(frozen=True)
class Rebooted(State):
    """In progress and the boot id differs from the recorded one: the reboot happened."""

    boot_id_before: str
    boot_id: str


@dataclass(frozen=True)
class GrantWithdrawn(State):
    """reboot-ok=false while in progress and not rebooted yet: abort the cycle."""

    reboot_pending_until: float | None = None  # a reboot logind accepted may still happen


@dataclass(frozen=True)
class WaitingForAfterReboot(State):
    """Rebooted and reported; waiting for reboot-ok=false (after-reboot hooks done)."""


@dataclass(frozen=True)
class Uncordoning(State):
    """The cycle is over (done or aborted): uncordon if we cordoned, clear our marks."""

    agent_cordoned: bool
    unschedulable: bool


@dataclass(frozen=True)
class GrantReturned(State):
    """Aborted with reboot-ok still true: wait for the coordinator to take it back."""

    reason: str


# The moves the agent makes by its own writes. A waiting state moves to itself.
TRANSITIONS: Mapping[type[State], frozenset[type[State]]] = {
    Idle:                  frozenset({Idle}),
    RebootNeeded:          frozenset({WaitingForGrant, Granted}),
    WaitingForGrant:       frozenset({WaitingForGrant}),
    Granted:               frozenset({Draining}),
    Cordoning:             frozenset({Draining}),
    Draining:              frozenset({Draining, Rebooting, Uncordoning, GrantReturned}),
    Rebooting:             frozenset({Rebooting}),
    Rebooted:              frozenset({WaitingForAfterReboot, Uncordoning}),
    WaitingForAfterReboot: frozenset({WaitingForAfterReboot}),
    GrantWithdrawn:        frozenset({GrantWithdrawn, Uncordoning, WaitingForGrant,
                                      RebootNeeded, Idle}),
    Uncordoning:           frozenset({Idle, RebootNeeded, WaitingForGrant, Granted,
                                      GrantReturned}),
    GrantReturned:         frozenset({GrantReturned}),
}  # fmt: skip


class IllegalTransition(RuntimeError):
    """A decision would move the agent along an edge that is not in TRANSITIONS."""

    kind = "illegal-transition"


def check_transition(before: State, after: State) -> None:
    if type(after) not in TRANSITIONS[type(before)]:
        raise IllegalTransition(f"the agent may not move from {before.name} to {after.name}")


# --- deriving the state -----------------------------------------------------------------


def derive_state(obs: Observation) -> State:
    """The agent's state, read from the cluster and the host. Total: never raises."""
    node = obs.node
    recorded = node.boot_id_before_reboot
    rebooted = bool(recorded) and recorded != obs.boot_id

    if node.reboot_in_progress:
        if rebooted:
            return Rebooted(boot_id_before=recorded, boot_id=obs.boot_id)
        if not node.reboot_ok:
            pending = _rebooting(obs).pending_until if recorded else None
            return GrantWithdrawn(reboot_pending_until=pending)
        if not obs.unschedulable:
            return Cordoning(marked=node.agent_made_unschedulable and recorded == "")
        if recorded:
            return _rebooting(obs)
        return _draining(obs)

    if rebooted and node.reboot_ok:
        return WaitingForAfterReboot()
    if recorded or node.agent_made_unschedulable:
        return Uncordoning(
            agent_cordoned=node.agent_made_unschedulable, unschedulable=obs.unschedulable
        )
    if node.reboot_ok and node.blocked_reason:
        return GrantReturned(reason=node.blocked_reason)

    engine = obs.engine
    engine_needs_reboot = engine is not None and engine.reboot_needed
    if engine is not None and engine.reboot_needed and not node.reboot_needed:
        return RebootNeeded(new_version=engine.new_version)
    if obs.reboot_required is not None and not node.reboot_needed:
        return RebootNeeded(required_file=obs.reboot_required)
    if obs.requested_on_host and not node.reboot_needed:
        return RebootNeeded(on_host=True)
    if node.reboot_needed and not obs.reboot_needed_label:
        return RebootNeeded(by_admin=not engine_needs_reboot)
    if node.reboot_needed and node.reboot_ok:
        return Granted(already_cordoned=obs.unschedulable)
    if node.reboot_needed:
        return WaitingForGrant(stale_blocked_reason=node.blocked_reason)
    return Idle(stale_blocked_reason=node.blocked_reason, stale_label=obs.reboot_needed_label,
                stale_reboot_reason=bool(node.reboot_reason))


def _draining(obs: Observation) -> Draining:
    drain = obs.drain
    if drain is None:
        return Draining(started_at=None, deadline=None)
    clock_start = drain.forced_at if drain.forced_at is not None else drain.started_at
    return Draining(
        started_at=drain.started_at,
        deadline=clock_start + obs.config.drain_timeout,
        complete=drain.complete,
        forced=drain.forced_at is not None,
        blockers=drain.blockers,
    )


def _rebooting(obs: Observation) -> Rebooting:
    attempts = obs.reboot_attempts
    if not attempts:
        return Rebooting(attempt=0)
    last = attempts[-1]
    config = obs.config
    if last.outcome is RebootOutcome.REQUESTED:
        failed_at = last.at + config.reboot_timeout
        return Rebooting(
            attempt=len(attempts),
            pending_until=failed_at,
            failure=f"was accepted by logind but the host is still up after "
            f"{config.reboot_timeout:g}s",
            next_try_at=failed_at + config.reboot_backoff(len(attempts)),
        )
    detail = f": {last.detail}" if last.detail else ""
    return Rebooting(
        attempt=len(attempts),
        failure=f"{last.outcome.value}{detail}",
        next_try_at=last.at + config.reboot_backoff(len(attempts)),
    )


# --- deciding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    state: State  # where the agent is
    next_state: State  # where the actions lead, if nothing else changes meanwhile
    actions: tuple[Action, ...]
    # Decide again after this long (zero: right away, with a fresh observation); None: only
    # when something observed changes. A timedelta, as the coordinator's Plan.recheck_after.
    recheck_after: timedelta | None
    status: str  # one line for sd_notify STATUS=

    @property
    def phase(self) -> str:
        return self.state.name


@dataclass(frozen=True)
class _Step:
    actions: tuple[Action, ...]
    recheck_after: float | None
    status: str


def _duration(seconds: float | None) -> timedelta | None:
    """Seconds as a timedelta, rounded up to the microsecond: a wait that has not quite run
    out must not read as zero (decide again at once); a past one is zero."""
    if seconds is None:
        return None
    return timedelta(microseconds=math.ceil(max(seconds, 0.0) * 1_000_000))


def decide(obs: Observation, now: float) -> Decision:
    """What to do next. Raises IllegalTransition only on a bug in this module."""
    state = derive_state(obs)
    step = _step(state, obs, now)
    mirror = _mirror_patch(obs)
    actions = ((PatchNode(mirror),) if mirror else ()) + step.actions
    next_state = derive_state(_expected_observation(obs, actions, now))
    check_transition(state, next_state)
    return Decision(state, next_state, actions, _duration(step.recheck_after), step.status)


def _step(state: State, obs: Observation, now: float) -> _Step:
    match state:
        case Idle():
            return _idle(state)
        case RebootNeeded():
            return _announce(state)
        case WaitingForGrant():
            return _wait_for_grant(state)
        case Granted():
            return _take_grant(state)
        case Cordoning():
            return _cordon(state, obs)
        case Draining():
            return _drain(state, obs, now)
        case Rebooting():
            return _reboot(state, obs, now)
        case Rebooted():
            return _report_reboot(state)
        case GrantWithdrawn():
            return _abandon_after_withdrawal(state, obs, now)
        case WaitingForAfterReboot():
            return _Step((), None, "rebooted: waiting for the after-reboot hooks (reboot-ok=false)")
        case Uncordoning():
            return _uncordon(state)
        case GrantReturned():
            return _Step((), None, f"gave the grant back: {state.reason}")
    raise IllegalTransition(f"no decision for state {state.name}")  # pragma: no cover


def _idle(state: Idle) -> _Step:
    patch = NodePatch(
        blocked_reason="" if state.stale_blocked_reason else None,
        reboot_needed=False if state.stale_label else None,
        reboot_reason="" if state.stale_reboot_reason else None,
    )
    actions: tuple[Action, ...] = (PatchNode(patch),) if patch != NodePatch() else ()
    return _Step(actions, 0.0 if actions else None, "idle")


def _announce(state: RebootNeeded) -> _Step:
    if state.required_file:
        message = f"{state.required_file} asks for a reboot"
        reason = state.required_file
    elif state.on_host:
        message = "reboot requested on the host (SIGUSR1 to cluo-agent)"
        reason = "requested on the host (SIGUSR1)"
    elif state.by_admin:
        message = "reboot requested through the reboot-needed annotation"
        reason = "reboot-needed=true set on the node"
    else:
        message = f"update_engine installed version {state.new_version} and needs a reboot"
        reason = f"update_engine: version {state.new_version}"
    return _Step(
        (
            PatchNode(NodePatch(reboot_needed=True, reboot_reason=_cap(reason))),
            EmitEvent(EventReason.REBOOT_NEEDED, f"{message}; waiting for a reboot slot"),
        ),
        0.0,
        "reboot needed: announcing it",
    )


def _wait_for_grant(state: WaitingForGrant) -> _Step:
    status = "reboot needed: waiting for the coordinator's grant"
    if state.stale_blocked_reason:
        return _Step((PatchNode(NodePatch(blocked_reason="")),), 0.0, status)
    return _Step((), None, status)


def _take_grant(state: Granted) -> _Step:
    if state.already_cordoned:
        write = PatchNode(NodePatch(reboot_in_progress=True, blocked_reason=""))
        message = ("reboot granted; draining (the node was already cordoned and stays "
                   "cordoned after the reboot)")
    else:
        # The mark and the cordon in one write: never one without the other.
        write = PatchNode(NodePatch(reboot_in_progress=True, agent_made_unschedulable=True,
                                    blocked_reason=""), unschedulable=True)
        message = "reboot granted; cordoning and draining"
    return _Step(
        (write, EmitEvent(EventReason.REBOOT_GRANTED, message)),
        0.0,
        "reboot granted: starting",
    )


def _cordon(state: Cordoning, obs: Observation) -> _Step:
    # The mark, if missing, goes with the cordon (one write). A stale recorded boot id
    # goes too: the node was schedulable, so it must be drained again before any reboot.
    patch = NodePatch() if state.marked else NodePatch(agent_made_unschedulable=True,
                                                       boot_id_before_reboot="")
    # A drain that ran while the node was schedulable proves nothing: start over.
    restart: tuple[Action, ...] = (AbortDrain(),) if obs.drain is not None else ()
    return _Step((*restart, PatchNode(patch, unschedulable=True)), 0.0, "cordoning")


def _drain(state: Draining, obs: Observation, now: float) -> _Step:
    config = obs.config
    if state.started_at is None or state.deadline is None:
        options = DrainOptions(evict_pods_without_controller=config.drain_pods_without_controller)
        return _Step((StartDrain(options),), config.drain_timeout,
                     "draining: starting")
    if state.complete:
        patch = NodePatch(boot_id_before_reboot=obs.boot_id, blocked_reason="")
        return _Step((PatchNode(patch),), 0.0, "drained: recording the boot id")

    permanent = tuple(b for b in state.blockers if b.reason.permanent)
    status = (f"draining: {len(state.blockers)} pods left, "
              f"timeout in {max(state.deadline - now, 0.0):.0f}s")
    if now >= state.deadline:
        policy = config.drain_timeout_policy
        if policy is DrainTimeoutPolicy.FORCE and not state.forced and not permanent:
            message = (f"drain timed out after {config.drain_timeout:g}s; deleting the "
                       f"remaining pods ignoring PodDisruptionBudgets: "
                       f"{describe_blockers(state.blockers) or 'none listed'}")
            return _Step(
                (ForceDrain(), EmitEvent(EventReason.DRAIN_FORCED, message, EventType.WARNING)),
                config.drain_timeout,
                "draining: forcing",
            )
        return _abort_drain(state, obs)

    want = _cap(f"drain blocked: {describe_blockers(permanent)}") if permanent else ""
    if obs.node.blocked_reason != want:
        actions: list[Action] = [PatchNode(NodePatch(blocked_reason=want))]
        if want:
            actions.append(EmitEvent(EventReason.DRAIN_BLOCKED, want, EventType.WARNING))
        return _Step(tuple(actions), state.deadline - now, status)
    return _Step((), state.deadline - now, status)


def _abort_drain(state: Draining, obs: Observation) -> _Step:
    timeout = obs.config.drain_timeout
    reason = f"drain timed out after {timeout:g}s"
    if state.forced:
        reason += f", and again {timeout:g}s after forcing"
    if state.blockers:
        reason += f"; blocking pods: {describe_blockers(state.blockers)}"
    reason = _cap(reason)
    return _Step(
        (
            AbortDrain(),
            # Before any uncordon: see "Abort paths" in the module docstring.
            PatchNode(NodePatch(reboot_in_progress=False, blocked_reason=reason)),
            EmitEvent(
                EventReason.DRAIN_TIMED_OUT,
                f"{reason}; reboot aborted, the node stays reboot-needed and is retried later",
                EventType.WARNING,
            ),
        ),
        0.0,
        "drain timed out: aborting",
    )


def _reboot(state: Rebooting, obs: Observation, now: float) -> _Step:
    config = obs.config
    if state.pending_until is not None and now < state.pending_until:
        return _Step((), state.pending_until - now,
                     f"rebooting: logind accepted attempt {state.attempt}")
    if state.next_try_at is None or now >= state.next_try_at:
        attempt = state.attempt + 1
        accepted = f"drained; rebooting (attempt {attempt}, accepted by logind)"
        return _Step(
            (Reboot(attempt=attempt, accepted_message=accepted),),
            config.reboot_timeout,
            f"rebooting: attempt {attempt}",
        )
    # Failed, next attempt not due yet: report what happened to this attempt, once (the
    # text names it), and when the next one comes.
    retry_in = config.reboot_backoff(state.attempt)
    report = _cap(f"reboot attempt {state.attempt} {state.failure}; "
                  f"retrying {retry_in:g}s after it failed")
    status = f"reboot failed: retrying in {state.next_try_at - now:.0f}s"
    if obs.node.blocked_reason != report:
        return _Step(
            (
                EmitEvent(EventReason.REBOOT_FAILED, report, EventType.WARNING),
                PatchNode(NodePatch(blocked_reason=report)),
            ),
            state.next_try_at - now,
            status,
        )
    return _Step((), state.next_try_at - now, status)


def _report_reboot(state: Rebooted) -> _Step:
    patch = NodePatch(reboot_needed=False, reboot_in_progress=False, blocked_reason="",
                      reboot_reason="")
    message = (f"rebooted (boot id {state.boot_id_before} -> {state.boot_id}); "
               f"waiting for the after-reboot hooks")
    return _Step((PatchNode(patch), EmitEvent(EventReason.REBOOTED, message)), 0.0,
                 "rebooted: reporting it")


def _abandon_after_withdrawal(state: GrantWithdrawn, obs: Observation, now: float) -> _Step:
    if state.reboot_pending_until is not None and now < state.reboot_pending_until:
        # logind accepted a reboot: it cannot be taken back, so let it happen or time out.
        return _Step((), state.reboot_pending_until - now,
                     "grant withdrawn: waiting for the reboot logind accepted")
    patch = NodePatch(reboot_in_progress=False, boot_id_before_reboot="", blocked_reason="")
    message = ("the coordinator withdrew the reboot grant (reboot-ok=false) before the "
               "reboot; aborting, the node stays reboot-needed")
    return _Step(
        (
            AbortDrain(),
            ClearRebootAttempts(),
            PatchNode(patch),
            EmitEvent(EventReason.GRANT_WITHDRAWN, message, EventType.WARNING),
        ),
        0.0,
        "grant withdrawn: aborting",
    )


def _uncordon(state: Uncordoning) -> _Step:
    patch = NodePatch(agent_made_unschedulable=False, boot_id_before_reboot="")
    if state.agent_cordoned and state.unschedulable:
        # The uncordon and the mark's removal in one write: the right to uncordon is
        # never lost before the uncordon is done.
        return _Step(
            (PatchNode(patch, unschedulable=False),
             EmitEvent(EventReason.UNCORDONED, "uncordoned (the agent cordoned it)")),
            0.0,
            "uncordoning",
        )
    return _Step((PatchNode(patch),), 0.0, "finishing the cycle")


def _mirror_patch(obs: Observation) -> NodePatch | None:
    """update_engine's status for the node's annotations, only when something an operator
    or the coordinator reads changed.

    ``status`` and ``new-version`` when they differ, except for the seconds-long
    ``CHECKING_FOR_UPDATE`` of a check (the node keeps the operation before it; what the
    check found shows next). ``last-checked-time`` along with either, or on its own once
    the recorded one is ``LAST_CHECKED_REFRESH`` older than update_engine's (or unreadable,
    or ahead of it): a periodic check alone writes at most once an hour.
    """
    engine = obs.engine
    if engine is None:
        return None
    node = obs.node
    checking = engine.operation is UpdateOperation.CHECKING_FOR_UPDATE
    status = (engine.current_operation
              if node.status != engine.current_operation and not checking else None)
    new_version = engine.new_version if node.new_version != engine.new_version else None
    last_checked = str(engine.last_checked_time)
    refresh = (status is not None or new_version is not None
               or _check_time_is_stale(node.last_checked_time, engine.last_checked_time))
    patch = NodePatch(
        status=status,
        new_version=new_version,
        last_checked_time=last_checked if refresh and node.last_checked_time != last_checked
        else None,
    )
    return patch if patch != NodePatch() else None


def _check_time_is_stale(recorded: str, checked: int) -> bool:
    """Whether the node's ``last-checked-time`` must give way to update_engine's."""
    try:
        age = checked - int(recorded)
    except ValueError:
        return True
    return not 0 <= age < LAST_CHECKED_REFRESH


def _expected_observation(obs: Observation, actions: Iterable[Action], now: float) -> Observation:
    """The observation once ``actions`` took effect and nothing else changed."""
    node = obs.node
    unschedulable = obs.unschedulable
    label = obs.reboot_needed_label
    drain = obs.drain
    attempts = obs.reboot_attempts
    for action in actions:
        match action:
            case PatchNode(patch=patch, unschedulable=spec):
                node = patch.apply_to(node)
                if patch.reboot_needed is not None:
                    label = patch.reboot_needed
                if spec is not None:
                    unschedulable = spec
            case StartDrain():
                drain = DrainStatus(started_at=now)
            case ForceDrain():
                drain = replace(drain, forced_at=now) if drain is not None else None
            case AbortDrain():
                drain = None
            case ClearRebootAttempts():
                attempts = ()
            case Reboot():
                attempts = (*attempts, RebootAttempt(at=now, outcome=RebootOutcome.REQUESTED))
    return replace(obs, node=node, unschedulable=unschedulable, reboot_needed_label=label,
                   drain=drain, reboot_attempts=attempts)


def _cap(text: str) -> str:
    if len(text) <= MAX_REASON_CHARS:
        return text
    return text[: MAX_REASON_CHARS - 3] + "..."
