"""The node's side of the cycle's actions, shared by both drivers of ``agent_core.decide``:
cluo-agent for its own node (cluo_host/agent.py) and cluo-coord for a FleetLock client's
node (cluo_coord/fleetlock_nodes.py).

``NodeActions.act`` does ``PatchNode`` (one request: metadata and spec.unschedulable
together, ``NodeApi.patch``) and ``EmitEvent`` through the ``NodeApi`` (in threads: its
calls are synchronous) and runs the drain (``StartDrain``, ``ForceDrain``,
``AbortDrain``) in a task of its own; it returns False for the actions
that are the driver's own (``Reboot``, ``ClearRebootAttempts``). Every node it gets back
from a write goes to ``on_node``; drain progress goes to ``on_drain_progress``. A failed
Kubernetes call raises its ``CluoError``; an Event that cannot be posted is logged by
the ``NodeApi`` and raises nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluo.cycle.agent_core import (
    AbortDrain,
    Action,
    DrainStatus,
    EmitEvent,
    ForceDrain,
    PatchNode,
    StartDrain,
)
from cluo.cycle.config import DrainTuning
from cluo.kube.nodes import NodeApi, NodeChange, NodeSnapshot
from cluo.protocol import Keys

if TYPE_CHECKING:
    from cluo.cycle.drainer import Drainer
    from cluo.cycle.eviction import PodApi

log = logging.getLogger(__name__)


class NodeActions:
    """The node-side actions for node ``name``. Use on one event loop.

    ``pods_factory`` makes the drain's ``PodApi`` when the first drain starts.
    """

    def __init__(self, name: str, *, nodes: NodeApi, pods_factory: Callable[[], PodApi],
                 keys: Keys, tuning: DrainTuning, clock: Callable[[], float],
                 on_node: Callable[[NodeSnapshot], None],
                 on_drain_progress: Callable[[DrainStatus], None],
                 component: str) -> None:
        self._name = name
        self._nodes = nodes
        self._pods_factory = pods_factory
        self._pods: PodApi | None = None  # made for the first drain
        self._keys = keys
        self._tuning = tuning
        self._clock = clock
        self._on_node = on_node
        self._on_drain_progress = on_drain_progress
        self._component = component
        self._drainer: Drainer | None = None
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def drain(self) -> DrainStatus | None:
        """The running drain's status (``Observation.drain``); None when none runs."""
        return self._drainer.status if self._drainer is not None else None

    async def act(self, action: Action) -> bool:
        """Do ``action`` if it is one of the node's; False if it is the driver's own."""
        name = self._name
        match action:
            case PatchNode(patch=patch, unschedulable=unschedulable):
                written = patch.to_metadata(self._keys)
                change = NodeChange(written.annotations, written.labels, unschedulable)
                self._on_node(await asyncio.to_thread(self._nodes.patch, name, change))
                if unschedulable is not None:
                    log.info("node cordoned" if unschedulable else "node uncordoned",
                             extra={"NODE": name})
            case StartDrain(options=options):
                await self.stop_drain()
                # Imported with the first drain, as the pods' adapter is made: a node that
                # is not draining needs neither (docs/agent.md, Footprint).
                from cluo.cycle.drainer import Drainer  # noqa: PLC0415

                if self._pods is None:
                    self._pods = self._pods_factory()
                self._drainer = Drainer(self._pods, name, options, self._on_drain_progress,
                                        started_at=self._clock(), clock=self._clock,
                                        tuning=self._tuning)
                self._drain_task = asyncio.create_task(self._drainer.run())
            case ForceDrain():
                if self._drainer is not None:
                    log.warning("drain timed out, deleting the remaining pods ignoring "
                                "disruption budgets", extra={"NODE": name})
                    self._drainer.force(self._clock())
            case AbortDrain():
                await self.stop_drain()
            case EmitEvent(reason=reason, message=message, type=event_type):
                await asyncio.to_thread(
                    self._nodes.emit_event, name, reason.value, message,
                    type=event_type.value, component=self._component, instance=name)
            case _:
                return False
        return True

    async def stop_drain(self) -> None:
        """Stop the running drain, if any, and forget it."""
        task, self._drain_task, self._drainer = self._drain_task, None, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
