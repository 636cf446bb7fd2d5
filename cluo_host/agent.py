"""The agent's driver: observe, ``decide``, act, and wait for the next change.

All decisions are made by ``agent_core.decide``; this module only starts up, gathers the
observation (the node from a watch, update_engine's status from D-Bus, the boot id, the
host's requests) and runs the loop, through the adapters it was given (``NodeApi``,
``UpdateStatusSource``, ``Rebooter``, ``ServiceNotifier``, and a factory of the
``PodApi``). Each turn of the loop is ``CycleDriver``'s (cluo_host/cycle.py): it adds the
drain and the reboot attempts it runs, asks ``decide`` and performs the actions; it is
imported after ``READY=1``, with the decision core under it, since the start needs
neither. Kubernetes calls are synchronous and run in threads; the node watch runs in
a thread of its own and wakes the loop on every change.

The loop never sleeps blindly: it waits for a wake-up (node changed, update_engine
status, drain progress) or for the decision's ``recheck_after``, whichever is first.
A failed action stops the decision; the next one is made from a fresh observation after
a backoff, so an API server or bus outage is ridden out without exiting.

The watchdog is fed by this loop's progress (``notify.Heartbeat``): before each await
the loop beats with how long the await may take, one watchdog interval for an idle wait
(a long wait is cut into such steps), ``ACTION_BOUND`` for an action. A drain runs in a
task of its own and the loop waits for it in those steps, enforcing its timeout; so a
long drain keeps the watchdog fed, and a loop stuck in an await past its bound does not.

Start-up ends with ``READY=1`` once the host side is set up: settings read, the kube
client configured, the system bus connected, update_engine answered and its signals
subscribed. Reading and labelling the node come after it: they need the API server, and
a unit whose start waited for the network would hold up ``multi-user.target`` on every
boot where the control plane is late, and after ``TimeoutStartSec=`` systemd would
restart an agent that a restart cannot help. What goes wrong afterwards stays loud: a
warning in the journal when the kind of failure changes, ``STATUS=`` saying it
(``starting: cannot read node: …``), and the agent retries until it works. When the
answer is that no Node has this name (the kubelet has not registered yet, or registered
under another name), ``STATUS=`` names the node name, where it came from and how to set
it, and the agent waits for the Node (its watch ends the wait as soon as the Node is
added; a read every ``Backoff.maximum`` at most keeps the reason honest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluo.backoff import Backoff
from cluo.errors import CluoError
from cluo.kube.nodes import NodeApi, NodeEvent, NodeSnapshot
from cluo.kube.objects import newer_or_same
from cluo.kube.resources import REQUEST_TIMEOUT, RETRY_AFTER_ATTEMPTS, WATCH_TIMEOUT_SECONDS
from cluo.kube.watch import WatchLoop
from cluo.protocol import label_value
from cluo_host.config import (
    NODE_NAME_FLAG,
    NODE_NAME_FROM_HOSTNAME,
    NODE_NAME_VARIABLE,
    AgentSettings,
)
from cluo_host.host_facts import HostFacts
from cluo_host.login_message import RELATIVE_PATH as LOGIN_MESSAGE_PATH
from cluo_host.login_message import CoordinatorConf
from cluo_host.logind import Rebooter
from cluo_host.notify import Heartbeat, ServiceNotifier, watchdog_loop
from cluo_host.reboot_required import RELATIVE_PATH as REBOOT_REQUIRED_PATH
from cluo_host.reboot_required import RebootRequired, RebootRequiredWatch
from cluo_host.update_engine import (
    BusDisconnected,
    BusReconnected,
    StatusIgnored,
    StatusUpdated,
    UpdateEngineEvent,
    UpdateStatusSource,
)

if TYPE_CHECKING:
    from cluo.cycle.agent_core import DrainStatus
    from cluo.cycle.eviction import PodApi
    from cluo.cycle.update_status import UpdateEngineStatus
    from cluo_host.cycle import CycleDriver

log = logging.getLogger(__name__)

AGENT_ENV_FILE = "/etc/cluo/agent.env"  # the unit's EnvironmentFile= (units/cluo-agent.service)
# When no Node has the agent's node name: how to give it another (the Ignition generator's
# `--node-setting node-name=...` writes that variable into that file).
NODE_NAME_HINT = (f"if the kubelet registered this host under another name, set "
                  f"{NODE_NAME_FLAG} or {NODE_NAME_VARIABLE} in {AGENT_ENV_FILE}")
NO_NODE_MESSAGE = f"no Node of this name, waiting for it to be registered; {NODE_NAME_HINT}"
# The longest one action's await takes when the timeouts under it work: a Kubernetes GET
# sent again after Retry-After answers (cluo.kube.resources), longer than a write (never
# sent again) or the D-Bus calls (10 s each). An action still running after this is hung:
# the heartbeat is overdue and the watchdog no longer fed.
ACTION_BOUND = (RETRY_AFTER_ATTEMPTS + 1) * sum(REQUEST_TIMEOUT) + REQUEST_TIMEOUT[1]
# A StatusUpdate the agent did not accept is shown on the node as a Warning Event, at most
# once in this many seconds (a flood of spoofed signals is not a flood of Events).
IGNORED_UPDATE_EVENT_INTERVAL = 300.0
MANUAL_TRIGGERS = ("To ask for a reboot by hand, run `systemctl kill --kill-whom=main "
                   "--signal=SIGUSR1 cluo-agent` as root on the host, or annotate the node "
                   "reboot-needed=true (docs/agent.md)")


class Agent:
    """One agent for one node. ``await run(stop)`` until ``stop`` is set.

    ``pods_factory`` makes the drain's ``PodApi`` when the first drain starts
    (cluo/cycle/node_actions.py).
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        host: HostFacts,
        nodes: NodeApi,
        pods_factory: Callable[[], PodApi],
        engine_factory: Callable[[Callable[[UpdateEngineEvent], None]], UpdateStatusSource],
        rebooter: Rebooter,
        notifier: ServiceNotifier,
        watchdog_interval: float | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._settings = settings
        self._host = host
        self._nodes = nodes
        self._pods_factory = pods_factory
        self._engine = engine_factory(self._on_engine_event)
        self._rebooter = rebooter
        self._notifier = notifier
        self._heartbeat = Heartbeat(watchdog_interval) if watchdog_interval else None
        self._backoff = backoff or Backoff()
        self._name = settings.node_name
        self._wake = asyncio.Event()
        self._node: NodeSnapshot | None = None
        self._engine_status: UpdateEngineStatus | None = None
        # Deciding and acting, from the first decision on (cluo_host/cycle.py).
        self._cycle: CycleDriver | None = None
        # StatusUpdates not accepted and not shown on the node yet: the latest, how many.
        self._ignored: tuple[StatusIgnored | None, int] = (None, 0)
        self._requested_on_host = False  # by request_reboot(), until the node carries it
        # /run/reboot-required below the host root: its description while it exists.
        self._reboot_required: str | None = None
        self._reboot_required_watch = RebootRequiredWatch(
            settings.host_root / REBOOT_REQUIRED_PATH, self._on_reboot_required)
        # Flatcar's login message reads the agent's state from this file.
        self._login_message = CoordinatorConf(settings.host_root / LOGIN_MESSAGE_PATH)
        self._ignored_shown_at: float | None = None
        # The node watch, in a thread of its own: from now (its first event is the node as
        # it is), again from where it ended, from now again after an expiry or an error.
        self._node_watch = WatchLoop(
            "node-watch",
            open_watch=lambda version: self._nodes.watch(
                self._name, version, WATCH_TIMEOUT_SECONDS),
            on_event=self._on_node_event,
            backoff=self._backoff,
            log_fields={"NODE": self._name},
            failed_message="node watch failed, watching again",
            expired_message="node watch expired, watching again from now",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.decisions = 0  # how many decisions were made (for tests and benchmarks)

    # -- life cycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        self._loop = asyncio.get_running_loop()
        watchdog: asyncio.Task[None] | None = None
        if self._heartbeat is not None:
            self._beat(ACTION_BOUND)
            watchdog = asyncio.create_task(watchdog_loop(self._notifier, self._heartbeat))
        self._login_message.take()
        try:
            if not await self._connect_engine(stop) or not await self._find_node(stop):
                return 0
            self._cycle = self._start_cycle()
            self._notifier.status("started")
            # The watches start once the node is read and labelled, so their connections do
            # not compete with it. Neither misses a change: the node watch's first event is
            # the node as it is, and the reboot-required file is read once its inotify watch
            # is in place.
            self._start_watch()
            self._watch_reboot_required()
            log.info("agent ready", extra={"NODE": self._name,
                                           "NODE_NAME_SOURCE": self._settings.node_name_source,
                                           "BOOT_ID": self._host.boot_id})
            await self._loop_until(stop)
            return 0
        finally:
            self._notifier.stopping("stopping")
            log.info("agent stopping", extra={"NODE": self._name})
            self._beat(ACTION_BOUND)
            await self._shutdown()
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            self._login_message.close()

    async def _connect_engine(self, stop: asyncio.Event) -> bool:
        """Connect to update_engine, retrying until it answers: what READY=1 waits for.
        False if stopped meanwhile."""
        self._notifier.status("starting: connecting to update_engine")
        failures = 0
        while not stop.is_set():
            try:
                self._beat(ACTION_BOUND)
                self._engine_status = await self._engine.connect(self._settings.bus_address)
                break
            except CluoError as err:
                failures += 1
                log.warning("cannot reach update_engine, retrying",
                            extra={"NODE": self._name, "ERROR": str(err),
                                   "ERROR_KIND": err.kind})
                self._notifier.status(f"starting: update_engine unreachable: {err}")
                await self._sleep_or_stop(stop, self._backoff.delay(failures))
        return not stop.is_set()

    def _watch_reboot_required(self) -> None:
        """Start the inotify watch of /run/reboot-required; without it (turned off, or
        the kernel refused) the other triggers still work, and the journal says so."""
        watch = self._reboot_required_watch
        if not self._settings.reboot_required_trigger:
            log.info("not watching for a reboot-required file (--reboot-required-trigger"
                     "=false)", extra={"NODE": self._name, "PATH": str(watch.path)})
            return
        try:
            self._on_reboot_required(watch.start())
        except CluoError as err:
            log.warning("cannot watch for a reboot-required file; update_engine and the "
                        "other triggers still work",
                        extra={"NODE": self._name, "PATH": str(watch.path), "ERROR": str(err),
                               "ERROR_KIND": err.kind})

    async def _find_node(self, stop: asyncio.Event) -> bool:
        """READY=1, then read the node and label it, retrying until it works. False if
        stopped first.

        Logs once per change of what is wrong (its error kind), not once per retry.
        """
        self._notifier.ready("starting: reading the node")
        failures = 0
        problem: str | None = None  # the error kind last reported
        was_missing = False
        while not stop.is_set():
            self._wake.clear()  # from here on, a node from the watch wakes the wait below
            self._beat(ACTION_BOUND)
            try:
                if self._node is None:
                    self._set_node(await asyncio.to_thread(self._nodes.get, self._name))
                await self._label_host()
            except CluoError as err:
                failures += 1
                if err.kind == "not_found":
                    was_missing = True
                    self._node = None  # also when deleted between the read and the labels
                    self._start_watch()  # its ADDED event ends the wait below at once
                self._report_unreadable_node(err, first=err.kind != problem)
                problem = err.kind
                await self._wait_for_wake(stop, self._backoff.delay(failures))
                continue
            if was_missing:
                log.info("the Node appeared", extra={"NODE": self._name})
            return True
        return False

    def _report_unreadable_node(self, err: CluoError, *, first: bool) -> None:
        """Log (``first``: this kind of failure is new) and say in STATUS= why the node
        cannot be read (module docstring)."""
        extra = {"NODE": self._name, "ERROR": str(err), "ERROR_KIND": err.kind}
        if err.kind != "not_found":
            log.log(logging.WARNING if first else logging.DEBUG,
                    "cannot read or label the node, retrying", extra=extra)
            self._notifier.status(f"starting: cannot read node: {err}")
            return
        source = self._settings.node_name_source
        if first:
            log.warning(NO_NODE_MESSAGE, extra={**extra, "NODE_NAME_SOURCE": source})
        origin = "the hostname" if source == NODE_NAME_FROM_HOSTNAME else source
        self._notifier.status(f"waiting for Node {self._name!r} (name from {origin}): "
                    f"no Node of this name; {NODE_NAME_HINT}")

    def _start_cycle(self) -> CycleDriver:
        # Imported after READY=1, with the decision core under it: the start needs
        # neither (docs/agent.md, Footprint).
        from cluo_host.cycle import CycleDriver  # noqa: PLC0415

        return CycleDriver(
            self._settings, self._host, nodes=self._nodes, pods_factory=self._pods_factory,
            rebooter=self._rebooter, notifier=self._notifier,
            login_message=self._login_message, clock=self._now, on_node=self._set_node,
            on_drain_progress=self._on_drain_progress, on_result=self._wake.set,
            on_action=lambda: self._beat(ACTION_BOUND))

    def _start_watch(self) -> None:
        self._node_watch.start()  # once; later calls do nothing

    async def _shutdown(self) -> None:
        self._reboot_required_watch.close()
        if self._cycle is not None:
            await self._cycle.stop_drain()
        await asyncio.to_thread(self._node_watch.stop, 5.0)
        with contextlib.suppress(Exception):
            await self._engine.close()

    async def _sleep_or_stop(self, stop: asyncio.Event, seconds: float) -> None:
        await self._wait((stop,), seconds)

    async def _wait_for_wake(self, stop: asyncio.Event, seconds: float | None) -> None:
        """Wait ``seconds`` (None: no limit), or less if stopped or woken (a node event, an
        engine event, drain progress)."""
        await self._wait((stop, self._wake), seconds)

    async def _wait(self, events: tuple[asyncio.Event, ...], seconds: float | None) -> None:
        """Until one of ``events`` is set or ``seconds`` passed (None: no limit), beating
        the heartbeat at least once a watchdog interval meanwhile."""
        waiters = {asyncio.create_task(event.wait()) for event in events}
        deadline = None if seconds is None else self._now() + seconds
        try:
            while True:
                left = None if deadline is None else deadline - self._now()
                if left is not None and left <= 0:
                    return
                if self._heartbeat is not None:
                    left = self._heartbeat.bounded(left)
                    self._beat(left)
                done, _pending = await asyncio.wait(waiters, timeout=left,
                                                    return_when=asyncio.FIRST_COMPLETED)
                if done:
                    return
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _beat(self, within: float) -> None:
        """The loop is here now and back within ``within`` seconds (module docstring)."""
        if self._heartbeat is not None:
            self._heartbeat.beat(self._now(), within)

    async def _label_host(self) -> None:
        keys = self._settings.keys
        wanted = {
            keys.id: label_value(self._host.os_id) or None,
            keys.version: label_value(self._host.os_version) or None,
            keys.group: label_value(self._host.group) or None,
        }
        node = self._node
        if node is not None and all(node.labels.get(k) == v for k, v in wanted.items()):
            return
        self._set_node(await asyncio.to_thread(
            self._nodes.patch_metadata, self._name, None, wanted
        ))

    # -- the loop ----------------------------------------------------------------------

    async def _loop_until(self, stop: asyncio.Event) -> None:
        cycle = self._cycle
        assert cycle is not None
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            await self._show_ignored_updates(cycle)
            node = self._node
            assert node is not None
            decision = cycle.decide(node, self._engine_status,
                                    requested_on_host=self._requested_on_host,
                                    reboot_required=self._reboot_required)
            self.decisions += 1
            error = await cycle.perform(decision.actions)
            if error is not None:
                failures += 1
                recheck: float | None = self._backoff.delay(failures)
                log.warning(
                    "action failed, deciding again after a pause",
                    extra={"NODE": self._name, "PHASE": decision.phase, "ERROR": str(error),
                           "ERROR_KIND": error.kind, "RETRY_IN": recheck},
                )
                self._notifier.status(f"{decision.status} (retrying: {error})")
            else:
                failures = 0
                recheck = (None if decision.recheck_after is None
                           else decision.recheck_after.total_seconds())
            if recheck == 0:
                await asyncio.sleep(0)  # decide again at once, but let the loop run
                continue
            await self._wait_for_wake(stop, recheck)

    async def _show_ignored_updates(self, cycle: CycleDriver) -> None:
        """The StatusUpdates update_engine's adapter did not accept since the last time, as
        one Warning Event (at most one per IGNORED_UPDATE_EVENT_INTERVAL; the log has all)."""
        (last, count), self._ignored = self._ignored, (None, 0)
        now = self._now()
        shown = self._ignored_shown_at
        if last is None or (shown is not None and now - shown < IGNORED_UPDATE_EVENT_INTERVAL):
            return
        self._ignored_shown_at = now
        more = f" (and {count - 1} more)" if count > 1 else ""
        await cycle.show_ignored_updates(
            f"a StatusUpdate signal from {last.sender or 'an unknown sender'} was "
            f"ignored{more}: {last.reason}; only update_engine and root connections "
            f"still connected when identified are accepted. {MANUAL_TRIGGERS}")

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- inputs ------------------------------------------------------------------------

    def request_reboot(self) -> None:
        """Root on the host asks for a reboot (main.py: SIGUSR1, ``MANUAL_TRIGGERS``): the
        agent announces it as it would update_engine's. Kept in memory until the node
        says reboot-needed=true (a restart before that loses it: the journal line below
        says it arrived)."""
        node = self._node
        already = node is not None and node.state.reboot_needed
        log.info("reboot requested on the host",
                 extra={"NODE": self._name, "ALREADY_NEEDED": already})
        if not already:
            self._requested_on_host = True
            self._wake.set()

    def _on_reboot_required(self, found: RebootRequired | None) -> None:
        described = found.describe() if found is not None else None
        if described == self._reboot_required:
            return
        if described is None:
            log.info("the reboot-required file is gone", extra={"NODE": self._name})
        else:
            log.info("a reboot-required file asks for a reboot",
                     extra={"NODE": self._name, "REASON": described})
        self._reboot_required = described
        self._wake.set()

    def _set_node(self, node: NodeSnapshot) -> None:
        current = self._node
        if current is None or newer_or_same(node.resource_version, current.resource_version):
            self._node = node
            if node.state.reboot_needed:
                self._requested_on_host = False  # handed over, or a reboot already on its way
            self._wake.set()

    def _on_drain_progress(self, status: DrainStatus) -> None:
        self._wake.set()

    def _on_engine_event(self, event: UpdateEngineEvent) -> None:
        match event:
            case StatusUpdated(status=status, sender=sender, from_owner=from_owner):
                log.info("update_engine status", extra={
                    "NODE": self._name, "OPERATION": status.current_operation,
                    "NEW_VERSION": status.new_version, "SENDER": sender,
                    "FROM_OWNER": from_owner})
                self._engine_status = status
            case StatusIgnored():
                self._ignored = (event, self._ignored[1] + 1)
            case BusDisconnected(reason=reason):
                log.warning("system bus lost, reconnecting",
                            extra={"NODE": self._name, "ERROR": reason})
            case BusReconnected(status=status):
                log.info("system bus reconnected", extra={"NODE": self._name})
                self._engine_status = status
        self._wake.set()

    def _on_node_event(self, event: NodeEvent) -> None:
        """In the watch's thread: hand the node to the event loop."""
        if event.type == "DELETED":
            log.error("the node object was deleted", extra={"NODE": self._name})
            return
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._set_node, event.node)
