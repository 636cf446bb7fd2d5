"""What cluo-coord does for a FleetLock client: it is that node's agent.

A FleetLock client (Zincati on Fedora CoreOS, or any other) is a Node of the cluster
whose reboot cluo-coord coordinates exactly as a cluo-agent node's: on the same slot
Leases, through the same planner, so ``--max-concurrent``, the groups and the health
gates cover both kinds. The difference is who runs the node's side of the cycle: there
is no cluo-agent on the host, so cluo-coord runs the agent's own decision core
(``cluo.cycle.agent_core.decide``) and drain (``cluo.cycle.drainer``) for it, one
virtual agent per FleetLock node that asked, in an asyncio loop of its own thread.

- **id -> Node** (``NodeDirectory``): the node whose ``fleetlock-id`` annotation is the
  client's id; else the node whose kubelet-reported ``status.nodeInfo.machineID`` gives
  that id through Zincati's derivation (``fleetlock.app_specific_id``). None: the answer
  says so and how to set the annotation; nothing is granted.
- **pre-reboot** is the agent's trigger: the first one announces the reboot
  (``reboot-needed=true``, ``reboot-reason`` "FleetLock pre-reboot from <id>") and marks the
  node ``fleetlock-client=<id>``, so a restarted or new leader resumes the cycle from the
  node. The answer is 200 only in the agent's ``Rebooting`` state: granted, cordoned,
  drained and the kubelet's boot id recorded (``boot-id-before-reboot``); the 200 is the
  reboot (Zincati reboots on any 2xx). Before that: ``waiting_for_slot``, ``draining`` or
  ``cycle_open``, a 409 Zincati asks again after. The holder asking again gets 200 again.
- **After the reboot** the kubelet reports a new boot id, and the cycle goes on as the
  agent's: reboot reported, ``reboot-ok=false`` awaited (the planner's reset uncordons
  the node), marks cleared.
- **steady-state** is 200 once the node holds no slot and its cycle is over (the planner
  releases the slot after the node is Ready again and the gates pass); before, 409
  ``slot_held``. A client that asks for steady-state while its reboot only waits for a
  slot withdraws it (``reboot-needed=false``, as it no longer wants it).

A node that never comes back keeps its slot and is marked stuck by the planner (rule 7),
as an agent node is. Only the leader answers and runs the virtual agents; losing the
lead stops them, the next leader resumes them from their ``fleetlock-client`` marks.
See docs/fleetlock.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from cluo.backoff import Backoff
from cluo.cycle.agent_core import (
    Action,
    ClearRebootAttempts,
    Cordoning,
    Decision,
    Draining,
    EmitEvent,
    EventReason,
    Granted,
    GrantReturned,
    GrantWithdrawn,
    Idle,
    Observation,
    PatchNode,
    Reboot,
    RebootAttempt,
    Rebooting,
    RebootNeeded,
    RebootOutcome,
    State,
    WaitingForGrant,
    decide,
    derive_state,
)
from cluo.cycle.config import AgentConfig, DrainTuning
from cluo.cycle.eviction import KubePods, PodApi
from cluo.cycle.node_actions import NodeActions
from cluo.errors import CluoError
from cluo.kube.client import KubeClient
from cluo.kube.nodes import KubeNodes, NodeApi, NodeEvent, NodeSnapshot
from cluo.kube.objects import newer_or_same
from cluo.kube.resources import NODES_PATH, WATCH_TIMEOUT_SECONDS
from cluo.kube.watch import WatchLoop
from cluo.protocol import Keys, NodePatch, label_value
from cluo_coord.fleetlock import (
    Answer,
    ClientParams,
    Endpoint,
    FleetLockServer,
    Kind,
    Request,
    app_specific_id,
)
from cluo_coord.fleetlock_config import FleetLockConfig
from cluo_coord.groups import DEFAULT_GROUP
from cluo_coord.leases import KubeSlots
from cluo_coord.planner import SlotLease

log = logging.getLogger(__name__)

COMPONENT = "cluo-coord"
REASON_PREFIX = "FleetLock pre-reboot from "
ANSWER_TIMEOUT = 30.0  # s: the longest a request waits for the virtual agent's loop
RESUME_INTERVAL = 30.0  # s: the leader looks for marked nodes to resume this often
ACTION_BACKOFF = Backoff(initial=0.5, maximum=30.0)  # after a failed action
WATCH_BACKOFF = Backoff()

Obj = dict[str, Any]


class SlotReader(Protocol):
    """The slot Leases (``cluo_coord.leases.KubeSlots``)."""

    def list(self) -> tuple[list[SlotLease], str]: ...


# --- id -> Node -------------------------------------------------------------------------


def matching_nodes(client_id: str, nodes: Iterable[Mapping[str, Any]], keys: Keys) -> list[str]:
    """The names of the nodes ``client_id`` is: by ``fleetlock-id`` annotation if any node
    carries it, else by the machine id (a node with a ``fleetlock-id`` of another value
    is never matched by its machine id)."""
    explicit, derived = [], []
    for obj in nodes:
        metadata = obj.get("metadata") or {}
        name = str(metadata.get("name") or "")
        named = (metadata.get("annotations") or {}).get(keys.fleetlock_id)
        if named is not None:
            if named.strip() == client_id:
                explicit.append(name)
            continue
        machine_id = str(((obj.get("status") or {}).get("nodeInfo") or {}).get("machineID") or "")
        with contextlib.suppress(ValueError):
            if app_specific_id(machine_id) == client_id:
                derived.append(name)
    return sorted(explicit or derived)


class NodeDirectory:
    """Finds a client's Node: a list of the Nodes on a miss, a read of the one found on a
    hit (the mapping is checked again on every request)."""

    def __init__(self, api: KubeClient, keys: Keys, node_selector: str = "") -> None:
        self._api = api
        self._keys = keys
        self._selector = node_selector
        self._known: dict[str, str] = {}  # client id -> node name
        self._lock = threading.Lock()

    def list(self) -> list[Obj]:
        query = {"labelSelector": self._selector} if self._selector else None
        answer = self._api.call("listing nodes for FleetLock", "GET", NODES_PATH, query=query)
        return list(answer.get("items") or [])

    def find(self, client_id: str) -> str | Answer:
        """The node's name, or the error answer."""
        with self._lock:
            known = self._known.get(client_id)
        if known is not None:
            try:
                obj = self._api.call(f"reading node {known!r}", "GET", f"{NODES_PATH}/{known}")
            except CluoError as err:
                if err.kind != "not_found":
                    raise
            else:
                if matching_nodes(client_id, [obj], self._keys) == [known]:
                    return known
        names = matching_nodes(client_id, self.list(), self._keys)
        if len(names) > 1:
            return Answer(409, Kind.UNKNOWN_CLIENT,
                          f"FleetLock client id {client_id!r} matches several nodes "
                          f"({', '.join(names)}): give each its own "
                          f"{self._keys.fleetlock_id} annotation")
        if not names:
            return Answer(404, Kind.UNKNOWN_CLIENT,
                          f"no node has FleetLock client id {client_id!r}: neither a "
                          f"{self._keys.fleetlock_id}={client_id} annotation nor a "
                          f"kubelet-reported machineID that Zincati's id derivation maps "
                          f"to it; annotate the host's node with "
                          f"{self._keys.fleetlock_id}={client_id} (docs/fleetlock.md)")
        with self._lock:
            self._known[client_id] = names[0]
        return names[0]


# --- one virtual agent ------------------------------------------------------------------


@dataclass(frozen=True)
class VirtualAgentConfig:
    core: AgentConfig
    drain: DrainTuning
    keys: Keys


class VirtualAgent:
    """The agent's cycle for one FleetLock node, driven from its Node object.

    ``run()`` observes (the node from a watch, the drain this process runs, the reboot
    answers given), ``decide``s and acts, until the cycle is over and no pre-reboot is
    pending, then removes the ``fleetlock-client`` mark. Must be used on one event loop.
    """

    def __init__(self, name: str, client_id: str, *, nodes: NodeApi, pods: PodApi,
                 config: VirtualAgentConfig, is_leader: Callable[[], bool]) -> None:
        self.name = name
        self.client_id = client_id
        self._nodes = nodes
        self._pods = pods
        self._config = config
        self._is_leader = is_leader
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._node: NodeSnapshot | None = None
        self._loop = asyncio.get_running_loop()
        self._actions = NodeActions(
            name, nodes=nodes, pods_factory=lambda: pods, keys=config.keys, tuning=config.drain,
            clock=self._loop.time, on_node=self._set_node,
            on_drain_progress=lambda _status: self._wake.set(), component=COMPONENT)
        self._attempts: tuple[RebootAttempt, ...] = ()
        # A pre-reboot not handed to the node yet: the boot id it was asked on.
        self._requested_on: str | None = None
        self._asking = 0  # pre-reboot requests being answered: the cycle is not over
        self._last_phase = ""
        self._watch = WatchLoop(
            f"fleetlock-watch-{name}",
            open_watch=lambda version: nodes.watch(name, version, WATCH_TIMEOUT_SECONDS),
            on_event=self._on_node_event,
            backoff=WATCH_BACKOFF,
            log_fields={"NODE": name},
            failed_message="FleetLock node watch failed, watching again",
            expired_message="FleetLock node watch expired, watching again from now",
        )

    # -- what the server asks ------------------------------------------------------------

    async def pre_reboot(self) -> Answer:
        self._asking += 1
        try:
            return await self._pre_reboot()
        finally:
            self._asking -= 1

    async def _pre_reboot(self) -> Answer:
        node = await self._read()
        if not node.boot_id:
            return Answer(409, Kind.CYCLE_OPEN,
                          f"node {self.name} reports no status.nodeInfo.bootID: the reboot "
                          f"could not be proven, so none is granted")
        state = derive_state(self._observe())
        if isinstance(state, Rebooting):
            await self._answered_yes(state)
            return Answer.ok(f"node {self.name} is cordoned and drained: reboot now")
        if self._requested_on is None and not node.state.reboot_needed:
            self._requested_on = node.boot_id
            log.info("FleetLock pre-reboot asks for a reboot",
                     extra={"NODE": self.name, "CLIENT_ID": self.client_id})
        self._wake.set()
        return await self._not_yet(state)

    async def steady_state(self, slots: SlotReader) -> Answer:
        node = await self._read()
        held = [slot for slot in (await asyncio.to_thread(slots.list))[0]
                if slot.holder == self.name]
        self._requested_on = None
        state = derive_state(self._observe())
        if held or not isinstance(state, Idle | RebootNeeded | WaitingForGrant):
            return Answer(409, Kind.SLOT_HELD,
                          f"node {self.name} still holds its reboot slot "
                          f"({decide(self._observe(), self._loop.time()).status}); it is "
                          f"released once the node is Ready again and the health gates pass")
        if node.state.reboot_needed and node.state.reboot_reason.startswith(REASON_PREFIX):
            await self._act(PatchNode(NodePatch(reboot_needed=False, reboot_reason="")))
            log.info("FleetLock steady-state withdraws the reboot it asked for",
                     extra={"NODE": self.name, "CLIENT_ID": self.client_id})
        self._wake.set()
        return Answer.ok(f"node {self.name} holds no reboot slot")

    async def _not_yet(self, state: State) -> Answer:
        status = decide(self._observe(), self._loop.time()).status
        match state:
            case Granted() | Cordoning() | Draining():
                return Answer(409, Kind.DRAINING,
                              f"reboot granted to node {self.name}: cordoning and draining "
                              f"it first ({status})")
            case Idle() | RebootNeeded() | WaitingForGrant() | GrantReturned() \
                    | GrantWithdrawn():
                reason = self._node.state.blocked_reason if self._node else ""
                why = f"; the last drain failed: {reason}" if reason else ""
                return Answer(409, Kind.WAITING_FOR_SLOT,
                              f"node {self.name} waits for a reboot slot (all are held, or "
                              f"the planner holds the queue: cluo-coord status){why}")
        return Answer(409, Kind.CYCLE_OPEN,
                      f"node {self.name} is still finishing its last reboot ({status})")

    async def _answered_yes(self, state: Rebooting) -> None:
        if state.pending_until is not None and self._loop.time() < state.pending_until:
            return  # the holder asked again: the reboot it was told to do is still due
        self._attempts += (RebootAttempt(self._loop.time(), RebootOutcome.REQUESTED),)
        log.info("FleetLock pre-reboot granted: the client reboots the host", extra={
            "NODE": self.name, "CLIENT_ID": self.client_id, "ATTEMPT": len(self._attempts),
            "BOOT_ID": self._node.boot_id if self._node else ""})
        await self._act(EmitEvent(EventReason.REBOOTING,
                                  f"drained; FleetLock client {self.client_id} told to reboot "
                                  f"(pre-reboot answered 200, attempt {len(self._attempts)})"))
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        self._watch.start()
        failures = 0
        try:
            while not self._stop.is_set() and self._is_leader():
                self._wake.clear()
                try:
                    wait = await self._step()
                except CluoError as err:
                    failures += 1
                    log.warning("FleetLock node step failed", extra={
                        "NODE": self.name, "ERROR": str(err), "ERROR_KIND": err.kind})
                    await self._wait(ACTION_BACKOFF.delay(failures))
                    continue
                failures = 0
                if wait is False:
                    return
                if wait is not True:
                    await self._wait(wait)
        finally:
            await self._actions.stop_drain()
            await asyncio.to_thread(self._watch.stop)

    async def _step(self) -> float | bool | None:
        """One decision, acted on. Returns how long to wait for a change (None: until
        one), True to decide again at once, False once the cycle is over."""
        if self._node is None:
            await self._read()
        decision = decide(self._observe(), self._loop.time())
        self._report(decision)
        if (isinstance(decision.state, Idle) and not decision.actions
                and self._requested_on is None and not self._asking):
            await asyncio.to_thread(self._nodes.patch_metadata, self.name,
                                    {self._config.keys.fleetlock_client: None})
            log.info("FleetLock node's reboot cycle is over",
                     extra={"NODE": self.name, "CLIENT_ID": self.client_id})
            return False
        for action in decision.actions:
            await self._act(action)
        recheck = decision.recheck_after
        if decision.actions and recheck is not None and recheck.total_seconds() == 0:
            return True
        return recheck.total_seconds() if recheck is not None else None

    async def _wait(self, seconds: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _report(self, decision: Decision) -> None:
        if decision.phase != self._last_phase:
            log.info("FleetLock node phase changed", extra={
                "NODE": self.name, "CLIENT_ID": self.client_id, "PHASE": decision.phase,
                "PREVIOUS_PHASE": self._last_phase or "none", "STATUS": decision.status})
            self._last_phase = decision.phase

    def _observe(self) -> Observation:
        node = self._node
        assert node is not None
        requested = (f"{REASON_PREFIX}{self.client_id}"
                     if self._requested_on is not None and self._requested_on == node.boot_id
                     else None)
        return Observation(
            node=node.state,
            unschedulable=node.unschedulable,
            reboot_needed_label=node.state.reboot_needed_label,
            boot_id=node.boot_id,
            drain=self._actions.drain,
            reboot_attempts=self._attempts,
            reboot_required=requested,
            config=self._config.core,
        )

    async def _read(self) -> NodeSnapshot:
        self._set_node(await asyncio.to_thread(self._nodes.get, self.name))
        assert self._node is not None
        return self._node

    async def _act(self, action: Action) -> None:
        if await self._actions.act(action):
            return
        match action:
            case ClearRebootAttempts():
                self._attempts = ()
            case Reboot():
                pass  # the reboot is the 200 to the client's next pre-reboot
            case _:  # pragma: no cover - a new action without a handler is a bug
                raise NotImplementedError(f"no handler for {type(action).__name__}")

    def _set_node(self, node: NodeSnapshot) -> None:
        current = self._node
        if current is None or newer_or_same(node.resource_version, current.resource_version):
            self._node = node
            if node.state.reboot_needed or (self._requested_on is not None
                                            and self._requested_on != node.boot_id):
                self._requested_on = None  # handed over, or the host rebooted since
            self._wake.set()

    def _on_node_event(self, event: NodeEvent) -> None:
        """In the watch's thread: hand the node to the event loop."""
        if event.type != "DELETED":
            self._loop.call_soon_threadsafe(self._set_node, event.node)


# --- the backend ------------------------------------------------------------------------


class FleetLockNodes:
    """``FleetLockBackend``: finds the client's node and answers from its virtual agent.

    ``start()`` runs the virtual agents' event loop in a thread; ``answer()`` is called
    from the HTTP server's threads.
    """

    def __init__(self, directory: NodeDirectory, *, nodes: NodeApi, pods: PodApi,
                 slots: SlotReader, config: VirtualAgentConfig,
                 is_leader: Callable[[], bool], groups: frozenset[str] = frozenset(),
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._directory = directory
        self._wall_clock = wall_clock
        self._nodes = nodes
        self._pods = pods
        self._slots = slots
        self._config = config
        self._is_leader = is_leader
        self._groups = groups  # empty: any group
        self._agents: dict[str, VirtualAgent] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fleetlock-nodes", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def answer(self, request: Request) -> Answer:
        client = request.client
        # Zincati's group when its configuration names none is "default", the name of
        # the group of cluo-coord's nodes without one.
        known = self._groups | {DEFAULT_GROUP}
        if self._groups and client.group not in known:
            return Answer(400, Kind.UNKNOWN_GROUP,
                          f"group {client.group!r} is not one of cluo-coord's groups "
                          f"({', '.join(sorted(known))}); set Zincati's [identity] group "
                          f"to one of them")
        try:
            found = self._directory.find(client.id)
        except CluoError as err:
            return Answer(503, Kind.INTERNAL_ERROR, f"cannot read the nodes: {err}")
        if isinstance(found, Answer):
            return found
        loop = self._loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(self._answer(found, request), loop)
        try:
            return future.result(ANSWER_TIMEOUT)
        except CluoError as err:
            return Answer(503, Kind.INTERNAL_ERROR,
                          f"cannot read or write node {found}: {err}")
        except TimeoutError:
            future.cancel()
            return Answer(503, Kind.INTERNAL_ERROR,
                          f"no answer for node {found} within {ANSWER_TIMEOUT:g}s")

    async def _answer(self, name: str, request: Request) -> Answer:
        client = request.client
        agent = self._agents.get(name)
        if request.endpoint is Endpoint.STEADY_STATE:
            # A node with no cycle running is read by a throwaway agent, never started.
            agent = agent or VirtualAgent(name, client.id, nodes=self._nodes, pods=self._pods,
                                          config=self._config, is_leader=self._is_leader)
            return await agent.steady_state(self._slots)
        if agent is None:
            await asyncio.to_thread(self._mark, name, client)
            agent = self._start_agent(name, client.id)
        return await agent.pre_reboot()

    def _mark(self, name: str, client: ClientParams) -> None:
        """``fleetlock-client=<id>``; if the node has none, the client's group label; and,
        for a new request, ``last-checked-time`` now: the planner queues by it (the agent
        mirrors update_engine's check that found the update; the first pre-reboot is the
        closest a FleetLock client tells), so FleetLock nodes do not queue behind the rest."""
        keys = self._config.keys
        node = self._nodes.get(name)
        labels = {} if node.labels.get(keys.group) else {keys.group: label_value(client.group)}
        annotations = {keys.fleetlock_client: client.id}
        if not node.state.reboot_needed:
            annotations[keys.last_checked_time] = str(int(self._wall_clock()))
        if any(node.annotations.get(k) != v for k, v in annotations.items()) or labels:
            self._nodes.patch_metadata(name, annotations, labels)

    def _start_agent(self, name: str, client_id: str) -> VirtualAgent:
        agent = VirtualAgent(name, client_id, nodes=self._nodes, pods=self._pods,
                             config=self._config, is_leader=self._is_leader)
        self._agents[name] = agent
        task = asyncio.create_task(agent.run(), name=f"fleetlock-{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._forget(name, agent))
        log.info("FleetLock node's virtual agent started",
                 extra={"NODE": name, "CLIENT_ID": client_id})
        return agent

    def _forget(self, name: str, agent: VirtualAgent) -> None:
        if self._agents.get(name) is agent:
            del self._agents[name]
            del self._tasks[name]

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        was_leader = False
        while not self._stop.is_set():
            leader = self._is_leader()
            if leader:
                await self._resume()
            elif was_leader:
                self._stop_agents()
            was_leader = leader
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RESUME_INTERVAL if leader else 1.0)
        self._stop_agents()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _resume(self) -> None:
        """Start a virtual agent for every marked node that has none (after a restart or
        a change of leader)."""
        keys = self._config.keys
        try:
            objects = await asyncio.to_thread(self._directory.list)
        except CluoError as err:
            log.warning("cannot list the nodes to resume FleetLock nodes",
                        extra={"ERROR": str(err), "ERROR_KIND": err.kind})
            return
        for obj in objects:
            metadata = obj.get("metadata") or {}
            name = str(metadata.get("name") or "")
            client_id = (metadata.get("annotations") or {}).get(keys.fleetlock_client)
            if client_id and name not in self._agents:
                log.info("resuming a FleetLock node's reboot cycle",
                         extra={"NODE": name, "CLIENT_ID": client_id})
                self._start_agent(name, client_id)

    def _stop_agents(self) -> None:
        for agent in self._agents.values():
            agent.stop()


# --- the whole service ------------------------------------------------------------------


class FleetLockService:
    """The FleetLock server and its backend, built from the flags (cluo_coord.main)."""

    def __init__(self, server: FleetLockServer, nodes: FleetLockNodes) -> None:
        self.server = server
        self.nodes = nodes

    @classmethod
    def build(cls, api: KubeClient, config: FleetLockConfig, *, namespace: str, keys: Keys,
              node_selector: str, registry: CollectorRegistry,
              is_leader: Callable[[], bool], groups: Iterable[str] = ()) -> FleetLockService:
        """Raises OSError (the port is taken, unreadable TLS files) or ssl.SSLError."""
        backend = FleetLockNodes(
            NodeDirectory(api, keys, node_selector),
            nodes=KubeNodes(api, keys), pods=KubePods(api), slots=KubeSlots(api, namespace),
            config=VirtualAgentConfig(
                core=AgentConfig(drain_timeout=config.drain_timeout),
                drain=DrainTuning(), keys=keys),
            is_leader=is_leader, groups=frozenset(groups))
        server = FleetLockServer(config.host, config.port, backend, is_leader=is_leader,
                                 registry=registry, tls=config.tls)
        return cls(server, backend)

    def start(self) -> None:
        self.nodes.start()
        self.server.start()
        log.info("FleetLock server listening", extra={
            "PORT": self.server.port, "TLS": self.server.tls})

    def stop(self) -> None:
        self.server.stop()
        self.nodes.stop()
