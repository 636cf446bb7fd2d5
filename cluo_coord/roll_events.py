"""Roll events: what the coordinator tells the world about a roll (webhooks).

A roll event is derived, at the point where the driver acts, from what the driver already
has, so that none reports what did not happen:

- from an Event the driver posted (``EmitEvent``), which it posts only once the change
  the Event reports was applied: ``REASON_EVENTS`` maps each Event reason to the roll
  event it is sent as (one line per reason). A Warning Event whose reason is not in the
  table is sent as ``warning``; a Normal one is not sent. A Normal Event whose reason maps
  to ``failed`` is the release that follows a failure already reported by a Warning Event
  (a ``DrainBlocked`` slot released after its grant was withdrawn): not sent again;
- ``drained``, from the node cache: the coordinator does not see a drain end, but the
  agent records ``boot-id-before-reboot`` once its drain is done, right before it asks
  logind to reboot. A slot holder with ``reboot-ok=true``, that boot id, and no
  ``after-reboot`` label yet (its reboot is not proven) has drained: sent once per node
  and boot id;
- from ``Plan.holds`` (what keeps the queue from a free slot, one sentence each, its kind
  before the first colon, ``cluo_coord.health.hold_kind``: ``paused: ...``, ``window:
  ...``, ``blocker: ...``; the brake's pause is a ``paused`` hold): when a kind appears,
  ``HOLD_EVENTS`` says what is sent (``paused`` for the pause, ``blocked`` for any other),
  and when it goes while nodes still queue, its end (``resumed``, ``unblocked``). A hold
  that goes because nothing queues any more ends nothing: nothing is sent.

``drained`` and the holds are remembered by this process only: a restarted or newly
elected coordinator may send them once more (never one for what did not happen). Pure:
no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cluo_coord.health import hold_kind
from cluo_coord.planner import EmitEvent, EventType, NodeView, Plan, Reason, SlotLease

GRANTED = "granted"
DRAINED = "drained"
REBOOTED = "rebooted"
DONE = "done"
CANCELLED = "cancelled"
FAILED = "failed"
RELEASED = "released"
WARNING = "warning"
PAUSED = "paused"
RESUMED = "resumed"
BLOCKED = "blocked"
UNBLOCKED = "unblocked"

# The Event reason -> the roll event it is sent as (None: not sent).
REASON_EVENTS: Mapping[str, str | None] = {
    Reason.SLOT_ACQUIRED: None,  # before-reboot hooks start; "granted" follows them
    Reason.REBOOT_APPROVED: GRANTED,
    Reason.REBOOT_VERIFIED: REBOOTED,
    Reason.REBOOT_FINISHED: DONE,
    Reason.REBOOT_CANCELLED: CANCELLED,
    Reason.DRAIN_BLOCKED: FAILED,
    Reason.REBOOT_TIMED_OUT: FAILED,
    Reason.RELEASED_BY_ADMIN: RELEASED,
    Reason.HOLDER_GONE: RELEASED,
    Reason.HOLDER_REPLACED: RELEASED,
    Reason.MALFORMED_VALUE: None,  # a value to fix, not a step of the roll
    Reason.REBOOT_ROLLED_BACK: FAILED,  # back on an older version than announced
    Reason.ROLL_PAUSED: None,  # the brake's pause: sent as "paused", from its hold
}

# The kind of a hold -> (sent when it appears, sent when it ends, the events' type).
HOLD_EVENTS: Mapping[str, tuple[str, str, str]] = {
    "paused": (PAUSED, RESUMED, EventType.NORMAL.value),
}
OTHER_HOLD = (BLOCKED, UNBLOCKED, EventType.NORMAL.value)

DRAINED_REASON = "Drained"  # the reason of a "drained" roll event (no Event is posted)


@dataclass(frozen=True)
class RollEvent:
    """One roll event. ``node`` is empty for an event of the whole roll (a hold), whose
    ``reason`` is then the hold's kind; ``type`` is ``Normal`` or ``Warning``."""

    event: str
    node: str
    reason: str
    message: str
    type: str
    time: datetime


class RollNotifier(Protocol):
    """Told by the driver what happened (``WebhookNotifier``). Neither call blocks on
    delivery or raises: notifying never holds up a grant."""

    def posted(self, change: EmitEvent, now: datetime) -> None:
        """The Event ``change`` was posted: the change it reports was applied."""

    def planned(self, nodes: Sequence[NodeView], slots: Sequence[SlotLease], plan: Plan,
                now: datetime) -> None:
        """``plan`` was made from these nodes and slots (before its changes are applied)."""


class NoNotifier:
    """Nothing is notified (no ``--webhook-url``)."""

    def posted(self, change: EmitEvent, now: datetime) -> None:
        return None

    def planned(self, nodes: Sequence[NodeView], slots: Sequence[SlotLease], plan: Plan,
                now: datetime) -> None:
        return None


def from_posted_event(change: EmitEvent, now: datetime) -> RollEvent | None:
    """The roll event an Event is sent as, if any (``REASON_EVENTS``)."""
    reason = change.reason.value
    if reason in REASON_EVENTS:
        event = REASON_EVENTS[reason]
    else:
        event = WARNING if change.type is EventType.WARNING else None
    if event is None or (event == FAILED and change.type is not EventType.WARNING):
        return None
    return RollEvent(event, change.node, reason, change.message, change.type.value, now)


class RollEvents:
    """The roll events of each plan that are not Events: ``drained`` and the holds. It
    remembers what it reported (the holds of the last plan, the drained boot ids)."""

    def __init__(self) -> None:
        self._holds: dict[str, str] = {}  # kind -> its sentences, in the last plan
        self._drained: dict[str, str] = {}  # node -> boot-id-before-reboot reported

    def from_plan(self, nodes: Iterable[NodeView], slots: Iterable[SlotLease], plan: Plan,
                  now: datetime) -> list[RollEvent]:
        return [*self._drains(nodes, slots, now), *self._hold_changes(plan, now)]

    def _drains(self, nodes: Iterable[NodeView], slots: Iterable[SlotLease], now: datetime
                ) -> list[RollEvent]:
        holders = {slot.holder for slot in slots if slot.holder}
        drained: dict[str, str] = {}
        events = []
        for view in nodes:
            state = view.state
            boot = state.boot_id_before_reboot
            if (view.name not in holders or not state.reboot_ok or not boot
                    or state.after_reboot):
                continue
            drained[view.name] = boot
            if self._drained.get(view.name) != boot:
                events.append(RollEvent(
                    DRAINED, view.name, DRAINED_REASON,
                    f"The agent drained the node and is rebooting it (boot id before the "
                    f"reboot: {boot}).", EventType.NORMAL.value, now))
        self._drained = drained
        return events

    def _hold_changes(self, plan: Plan, now: datetime) -> list[RollEvent]:
        holds: dict[str, str] = {}
        for sentence in plan.holds:
            kind = hold_kind(sentence)
            holds[kind] = f"{holds[kind]}; {sentence}" if kind in holds else sentence
        events = []
        for kind, sentences in holds.items():
            if kind not in self._holds:
                begin, _, type_ = HOLD_EVENTS.get(kind, OTHER_HOLD)
                events.append(RollEvent(begin, "", kind, sentences, type_, now))
        if plan.queue:
            for kind, sentences in self._holds.items():
                if kind not in holds:
                    _, end, type_ = HOLD_EVENTS.get(kind, OTHER_HOLD)
                    events.append(RollEvent(end, "", kind, f"No longer held: {sentences}",
                                            type_, now))
        self._holds = holds
        return events
