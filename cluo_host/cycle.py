"""The agent's side of the reboot cycle: each decision of ``agent_core.decide`` made,
shown and done.

The Agent (cluo_host/agent.py) starts up, gathers what it observes (the node, update_engine's
status, the host's requests) and runs the loop; for each turn of it, this driver adds
what its own actions left behind (the drain it runs, the reboot attempts it made), asks
``decide``, shows the decision (STATUS=, the journal, Flatcar's login message) and does
its actions: the node's through ``NodeActions`` (cluo/cycle/node_actions.py: the node's
writes, its Events and the drain), the reboot through logind.

The Agent imports this module once ``READY=1`` is sent, and the decision core with it:
neither is needed to start. The drain and the Eviction API adapter come later still, with
the first drain (``NodeActions``; docs/agent.md, Footprint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluo.cycle.agent_core import (
    Action,
    ClearRebootAttempts,
    Cordoning,
    Decision,
    Draining,
    DrainStatus,
    EmitEvent,
    EventReason,
    EventType,
    Granted,
    Observation,
    Reboot,
    RebootAttempt,
    Rebooting,
    RebootNeeded,
    RebootOutcome,
    State,
    WaitingForGrant,
    decide,
)
from cluo.cycle.inhibitors import blocking_inhibitors, describe_inhibitors
from cluo.cycle.node_actions import NodeActions
from cluo.cycle.update_status import UpdateEngineStatus
from cluo.errors import CluoError
from cluo.kube.nodes import NodeApi, NodeSnapshot
from cluo_host.config import AgentSettings
from cluo_host.host_facts import HostFacts
from cluo_host.login_message import REBOOT_PLANNED, REBOOTING, RUNNING, CoordinatorConf
from cluo_host.logind import Rebooter, RebootError, RebootRefused
from cluo_host.notify import ServiceNotifier

if TYPE_CHECKING:
    from cluo.cycle.eviction import PodApi

log = logging.getLogger(__name__)

COMPONENT = "cluo-agent"  # the source of its Events


def login_state(state: State) -> str:
    """The login message's STATE for one of the agent's states."""
    if isinstance(state, RebootNeeded | WaitingForGrant):
        return REBOOT_PLANNED
    if isinstance(state, Granted | Cordoning | Draining | Rebooting):
        return REBOOTING
    return RUNNING


class CycleDriver:
    """Decides and acts for the agent's node. Use on the Agent's event loop."""

    def __init__(
        self,
        settings: AgentSettings,
        host: HostFacts,
        *,
        nodes: NodeApi,
        pods_factory: Callable[[], PodApi],
        rebooter: Rebooter,
        notifier: ServiceNotifier,
        login_message: CoordinatorConf,
        clock: Callable[[], float],
        on_node: Callable[[NodeSnapshot], None],
        on_drain_progress: Callable[[DrainStatus], None],
        on_result: Callable[[], None],
        on_action: Callable[[], None],
    ) -> None:
        """``on_result``: an action's result is in (decide again at once); ``on_action``:
        an action starts (the Agent's heartbeat)."""
        self._settings = settings
        self._host = host
        self._name = settings.node_name
        self._rebooter = rebooter
        self._notifier = notifier
        self._login_message = login_message
        self._clock = clock
        self._on_result = on_result
        self._on_action = on_action
        # The node's side of the actions, and the drain (cluo/cycle/node_actions.py).
        self._actions = NodeActions(
            self._name, nodes=nodes, pods_factory=pods_factory, keys=settings.keys,
            tuning=settings.drain, clock=clock, on_node=on_node,
            on_drain_progress=on_drain_progress, component=COMPONENT)
        self._attempts: tuple[RebootAttempt, ...] = ()
        self._last_phase = ""
        self._last_status = ""

    def decide(self, node: NodeSnapshot, engine: UpdateEngineStatus | None, *,
               requested_on_host: bool, reboot_required: str | None) -> Decision:
        """The decision for what the Agent observed, shown (STATUS=, journal, login
        message)."""
        decision = decide(Observation(
            node=node.state,
            unschedulable=node.unschedulable,
            reboot_needed_label=node.state.reboot_needed_label,
            boot_id=self._host.boot_id,
            engine=engine,
            drain=self._actions.drain,
            reboot_attempts=self._attempts,
            config=self._settings.core,
            requested_on_host=requested_on_host,
            reboot_required=reboot_required,
        ), self._clock())
        self._report(decision)
        return decision

    def _report(self, decision: Decision) -> None:
        self._login_message.show(login_state(decision.state))
        if decision.phase != self._last_phase:
            log.info("phase changed", extra={"NODE": self._name, "PHASE": decision.phase,
                                             "PREVIOUS_PHASE": self._last_phase or "none"})
            self._last_phase = decision.phase
        if decision.status != self._last_status:
            self._last_status = decision.status
            self._notifier.status(decision.status)

    async def perform(self, actions: tuple[Action, ...]) -> CluoError | None:
        """Do ``actions`` in order; the first one's error stops the rest."""
        for action in actions:
            self._on_action()
            try:
                await self._act(action)
            except CluoError as err:
                return err
        return None

    async def show_ignored_updates(self, message: str) -> None:
        """The StatusUpdates the Agent did not accept, as a Warning Event on the node."""
        self._on_action()
        await self._act(EmitEvent(EventReason.STATUS_UPDATE_IGNORED, message,
                                  EventType.WARNING))

    async def stop_drain(self) -> None:
        await self._actions.stop_drain()

    async def _act(self, action: Action) -> None:
        if await self._actions.act(action):
            return
        match action:
            case ClearRebootAttempts():
                self._attempts = ()
            case Reboot(attempt=attempt, accepted_message=accepted):
                result = await self._reboot(attempt)
                self._attempts += (result,)
                # A recorded attempt is an action's result: decide again at once (report
                # a refusal, schedule the retry) rather than after reboot_timeout.
                self._on_result()
                if result.outcome is RebootOutcome.REQUESTED:
                    await self._act(EmitEvent(EventReason.REBOOTING, accepted))
            case _:  # pragma: no cover - a new action without a handler is a bug
                raise NotImplementedError(f"no handler for {type(action).__name__}")

    async def _reboot(self, attempt: int) -> RebootAttempt:
        extra = {"NODE": self._name, "ATTEMPT": attempt, "BOOT_ID": self._host.boot_id}
        try:
            blocking = blocking_inhibitors(await self._rebooter.list_inhibitors())
        except CluoError as err:
            log.error("cannot list logind inhibitors", extra={**extra, "ERROR": str(err)})
            return RebootAttempt(self._clock(), RebootOutcome.FAILED, str(err))
        if blocking:
            detail = describe_inhibitors(blocking)
            log.error("reboot blocked by an inhibitor", extra={**extra, "INHIBITORS": detail})
            return RebootAttempt(self._clock(), RebootOutcome.INHIBITED, detail)
        log.info("rebooting", extra=extra)
        self._notifier.status("rebooting")
        try:
            await self._rebooter.reboot()
        except RebootRefused as err:
            log.error("logind refused the reboot", extra={**extra, "ERROR": str(err)})
            return RebootAttempt(self._clock(), RebootOutcome.REFUSED, str(err))
        except RebootError as err:
            log.error("reboot call failed", extra={**extra, "ERROR": str(err)})
            return RebootAttempt(self._clock(), RebootOutcome.FAILED, str(err))
        return RebootAttempt(self._clock(), RebootOutcome.REQUESTED)
