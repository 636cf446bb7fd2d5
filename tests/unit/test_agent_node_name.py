"""The agent's start-up when no Node has its name, on fakes: it says so and waits.

The real ``Agent`` driver runs in a thread of its own against in-memory fakes of the
node API (with a watch), update_engine and sd_notify. No Node of the agent's name is an
answer, not a failure: ``READY=1`` with a ``STATUS=`` naming the name, where it came from
and how to set it, one journal line, then a wait that ends when the Node appears. Any
other failure to read the node is reported as what it is, and holds ``READY=1`` back.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pytest

from cluo.cycle.update_status import UpdateEngineStatus
from cluo.errors import KubeError
from cluo.kube.nodes import NodeChange, NodeEvent, NodeSnapshot
from cluo_host.agent import NO_NODE_MESSAGE, Agent, Backoff
from cluo_host.config import AgentSettings, load_settings
from cluo_host.host_facts import HostFacts
from cluo_host.journal import fields_of
from cluo_host.update_engine import UpdateEngineEvent
from testbed.waiting import assert_stays, wait_for

NAME = "worker-1.example.com"
TIMEOUT = 10.0
IDLE = UpdateEngineStatus(1_700_000_100, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)
HOST = HostFacts(boot_id="b-1", os_id="flatcar", os_version="4081.2.0", group="stable")
CANNOT_READ = "cannot read or label the node, retrying"
HINT = "set --node-name or CLUO_AGENT_NODE_NAME in /etc/cluo/agent.env"
READING = "starting: reading the node"  # the STATUS= sent with READY=1
FAST = Backoff(initial=0.01, maximum=0.05)  # the agent reads the node again quickly


# -- fakes ----------------------------------------------------------------------------------


class FakeNodes:
    """Nodes in memory, as ``NodeApi``: reads, merge patches and watches of one name."""

    def __init__(self, settings: AgentSettings) -> None:
        self._keys = settings.keys
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._watchers: list[tuple[str, queue.Queue[NodeEvent | None]]] = []
        self.refusal: str | None = None  # set: every call is refused with this (HTTP 403)
        self.gets = 0

    def create(self, name: str) -> None:
        """The kubelet registers the Node."""
        with self._lock:
            self._objects[name] = {"metadata": {"name": name, "annotations": {}, "labels": {}},
                                   "spec": {}, "status": {}}
            self._publish("ADDED", name)

    def annotations(self, name: str) -> Mapping[str, str]:
        with self._lock:
            return dict(self._objects.get(name, {}).get("metadata", {}).get("annotations", {}))

    def labels(self, name: str) -> Mapping[str, str]:
        with self._lock:
            return dict(self._objects.get(name, {}).get("metadata", {}).get("labels", {}))

    def get(self, name: str) -> NodeSnapshot:
        with self._lock:
            self.gets += 1
            return self._snapshot(self._existing(f"reading node {name!r}", name))

    def patch_metadata(
        self,
        name: str,
        annotations: Mapping[str, str | None] | None = None,
        labels: Mapping[str, str | None] | None = None,
    ) -> NodeSnapshot:
        return self.patch(name, NodeChange(annotations or {}, labels or {}))

    def patch(self, name: str, change: NodeChange) -> NodeSnapshot:
        with self._lock:
            obj = self._existing(f"patching node {name!r}", name)
            for key, values in (("annotations", change.annotations),
                                ("labels", change.labels)):
                target = obj["metadata"][key]
                for k, v in values.items():
                    if v is None:
                        target.pop(k, None)
                    else:
                        target[k] = v
            if change.unschedulable is not None:
                obj["spec"]["unschedulable"] = change.unschedulable
            return self._publish("MODIFIED", name)

    def update(
        self,
        name: str,
        mutate: Callable[[NodeSnapshot], NodeChange | None],
        *,
        attempts: int = 5,
    ) -> NodeSnapshot:
        raise NotImplementedError("the agent does not use update()")

    def watch(self, name: str, resource_version: str | None, timeout_seconds: int) -> FakeWatch:
        events: queue.Queue[NodeEvent | None] = queue.Queue()
        with self._lock:
            if name in self._objects:  # a watch from now starts with the node as it is
                events.put(NodeEvent("ADDED", self._snapshot(self._objects[name])))
            self._watchers.append((name, events))
        return FakeWatch(events)

    def emit_event(self, node_name: str, reason: str, message: str, *,
                   type: str = "Normal", component: str = "cluo-agent",
                   instance: str | None = None) -> None:
        pass

    def _existing(self, action: str, name: str) -> dict[str, Any]:
        if self.refusal is not None:
            raise KubeError(action, self.refusal, kind="forbidden", status=403,
                            reason="Forbidden")
        obj = self._objects.get(name)
        if obj is None:
            raise KubeError(action, f'nodes "{name}" not found', kind="not_found", status=404,
                            reason="NotFound")
        return obj

    def _publish(self, kind: str, name: str) -> NodeSnapshot:
        self._version += 1
        obj = self._objects[name]
        obj["metadata"]["resourceVersion"] = str(self._version)
        snapshot = self._snapshot(obj)
        for watched, events in self._watchers:
            if watched == name:
                events.put(NodeEvent(kind, snapshot))
        return snapshot

    def _snapshot(self, obj: Mapping[str, Any]) -> NodeSnapshot:
        return NodeSnapshot.from_object(obj, self._keys)


class FakeWatch:
    resource_version: str | None = None

    def __init__(self, events: queue.Queue[NodeEvent | None]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[NodeEvent]:
        while (event := self._events.get()) is not None:
            self.resource_version = event.node.resource_version
            yield event

    def close(self) -> None:
        self._events.put(None)

    def __enter__(self) -> FakeWatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class FakeEngine:
    async def connect(self, bus_address: str | None = None) -> UpdateEngineStatus:
        return IDLE

    async def get_status(self) -> UpdateEngineStatus:
        return IDLE

    async def close(self) -> None:
        pass


class Unused:
    """The logind and pod adapters: nothing in these tests may reach them."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected call of {name}")


@dataclass
class FakeNotifier:
    """What systemd would receive on NOTIFY_SOCKET, one list of assignments per message."""

    messages: list[list[str]] = field(default_factory=list)

    def ready(self, status: str | None = None) -> None:
        self.messages.append(["READY=1", *self._status(status)])

    def status(self, text: str) -> None:
        self.messages.append(self._status(text))

    def watchdog(self) -> None:
        self.messages.append(["WATCHDOG=1"])

    def stopping(self, status: str | None = None) -> None:
        self.messages.append(["STOPPING=1", *self._status(status)])

    def extend_timeout(self, seconds: float) -> None:
        self.messages.append([f"EXTEND_TIMEOUT_USEC={round(seconds * 1e6)}"])

    def assignments(self) -> list[str]:
        return [line for message in list(self.messages) for line in message]

    def statuses(self) -> list[str]:
        return [a.removeprefix("STATUS=") for a in self.assignments() if a.startswith("STATUS=")]

    def count(self, assignment: str) -> int:
        return self.assignments().count(assignment)

    def ready_status(self) -> str | None:
        """The STATUS= sent with READY=1, None before READY=1."""
        for message in list(self.messages):
            if message[0] == "READY=1":
                return message[1].removeprefix("STATUS=") if len(message) > 1 else ""
        return None

    def waiting_for_node(self) -> str | None:
        """The first STATUS= saying no Node has the agent's name, None before it."""
        return next((s for s in self.statuses() if s.startswith("waiting for Node ")), None)

    @staticmethod
    def _status(text: str | None) -> list[str]:
        return [] if text is None else [f"STATUS={text}"]


# -- running the agent ------------------------------------------------------------------------


class RunningAgent:
    """The agent's ``run`` in an event loop of its own thread, stopped as SIGTERM would."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name="agent", daemon=True)
        self._thread.start()
        if not self._started.wait(TIMEOUT):
            raise TimeoutError("the agent's event loop did not start")

    def _run(self) -> None:
        async def main() -> int:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            return await self._agent.run(self._stop)

        self.exit_code = asyncio.run(main())

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> int | None:
        if self._loop is not None and self._stop is not None and self.running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the agent did not stop"
        return self.exit_code


@dataclass
class Rig:
    nodes: FakeNodes
    notifier: FakeNotifier
    agent: RunningAgent
    settings: AgentSettings

    def mirrored_idle(self) -> bool:
        return self.nodes.annotations(NAME).get(self.settings.keys.status) == "UPDATE_STATUS_IDLE"


@pytest.fixture
def start_agent() -> Iterator[Callable[..., Rig]]:
    running: list[RunningAgent] = []

    def start(argv: list[str], env: dict[str, str] | None = None, *,
              backoff: Backoff = FAST,
              node_exists: bool = False, refusal: str | None = None) -> Rig:
        settings = load_settings(argv, env or {})
        nodes = FakeNodes(settings)
        nodes.refusal = refusal
        if node_exists:
            nodes.create(settings.node_name)
        notifier = FakeNotifier()

        def engine(on_event: Callable[[UpdateEngineEvent], None]) -> FakeEngine:
            return FakeEngine()

        agent = Agent(settings, host=HOST, nodes=nodes, pods_factory=Unused, engine_factory=engine,
                      rebooter=Unused(), notifier=notifier, watchdog_interval=0.01,
                      backoff=backoff)
        runner = RunningAgent(agent)
        running.append(runner)
        return Rig(nodes, notifier, runner, settings)

    yield start
    for runner in running:
        runner.stop()


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


# -- the tests --------------------------------------------------------------------------------


def test_a_missing_node_is_reported_once_and_the_agent_carries_on_when_it_appears(
    start_agent: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cluo_host")
    rig = start_agent(["--node-name", NAME])

    status = wait_for(rig.notifier.waiting_for_node, TIMEOUT, "STATUS= for the missing Node")
    assert rig.notifier.ready_status() == READING, "READY=1 came before the node was read"
    assert status == (f"waiting for Node {NAME!r} (name from --node-name): no Node of this "
                      f"name; if the kubelet registered this host under another name, {HINT}")
    wait_for(lambda: rig.nodes.gets >= 5, TIMEOUT, "the agent to read again, and again")
    pings = rig.notifier.count("WATCHDOG=1")
    wait_for(lambda: rig.notifier.count("WATCHDOG=1") > pings, TIMEOUT,
             "watchdog pings while waiting for the Node")
    assert rig.agent.running()
    [missing] = records(caplog, NO_NODE_MESSAGE)  # one line, not one per read
    assert missing.levelno == logging.WARNING
    fields = fields_of(missing)  # what journald gets as fields
    assert (fields["NODE"], fields["NODE_NAME_SOURCE"], fields["ERROR_KIND"]) == (
        NAME, "--node-name", "not_found")
    assert HINT in missing.getMessage()
    assert not records(caplog, CANNOT_READ), "no such Node is not reported as unreadable"
    assert not rig.nodes.labels(NAME), "nothing written before the Node exists"

    rig.nodes.create(NAME)  # the kubelet registers late
    wait_for(rig.mirrored_idle, TIMEOUT, "update_engine's status mirrored onto the Node")
    assert rig.nodes.labels(NAME)[rig.settings.keys.group] == "stable"
    assert rig.agent.running()
    assert rig.notifier.count("READY=1") == 1
    assert "started" in rig.notifier.statuses()[rig.notifier.statuses().index(status):]
    assert records(caplog, "the Node appeared")
    assert len(records(caplog, NO_NODE_MESSAGE)) == 1
    assert rig.agent.stop() == 0


def test_the_watch_ends_the_wait_for_the_node_without_the_next_read(
    start_agent: Callable[..., Rig],
) -> None:
    # The next read would come an hour later: only the watch can end the wait in time.
    rig = start_agent(["--node-name", NAME], backoff=Backoff(initial=3600, maximum=3600))
    wait_for(rig.notifier.waiting_for_node, TIMEOUT, "STATUS= for the missing Node")
    rig.nodes.create(NAME)
    wait_for(rig.mirrored_idle, TIMEOUT, "update_engine's status mirrored onto the Node")
    assert rig.nodes.gets == 1


@pytest.mark.parametrize(("argv", "env", "source", "origin"), [
    (["--node-name", NAME], {"CLUO_AGENT_NODE_NAME": "other"}, "--node-name", "--node-name"),
    ([], {"CLUO_AGENT_NODE_NAME": NAME}, "CLUO_AGENT_NODE_NAME", "CLUO_AGENT_NODE_NAME"),
    ([], {"CLUO_AGENT_NODE_NAME": ""}, "hostname", "the hostname"),
])
def test_the_report_says_where_the_name_came_from(
    start_agent: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str], env: dict[str, str], source: str, origin: str,
) -> None:
    caplog.set_level(logging.INFO, logger="cluo_host")
    monkeypatch.setattr(socket, "gethostname", lambda: "Worker-1.Example.COM")
    rig = start_agent(argv, env)
    status = wait_for(rig.notifier.waiting_for_node, TIMEOUT, "STATUS= for the missing Node")
    assert status.startswith(f"waiting for Node {NAME!r} (name from {origin}): ")
    [missing] = wait_for(lambda: records(caplog, NO_NODE_MESSAGE), TIMEOUT, "the journal line")
    assert fields_of(missing)["NODE"] == NAME
    assert fields_of(missing)["NODE_NAME_SOURCE"] == source


def test_a_node_that_may_not_be_read_is_reported_as_such_not_as_missing(
    start_agent: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cluo_host")
    refusal = 'nodes "worker-1.example.com" is forbidden: User cannot get resource "nodes"'
    rig = start_agent(["--node-name", NAME], node_exists=True, refusal=refusal)

    wait_for(lambda: rig.nodes.gets >= 5, TIMEOUT, "the agent to read again, and again")
    status = rig.notifier.statuses()[-1]
    assert status.startswith("starting: cannot read node: ")
    assert refusal in status and "HTTP 403" in status
    # Start-up does not wait for the API server: READY=1 came first, the failure is loud
    # in STATUS= and the journal.
    assert rig.notifier.ready_status() == READING
    assert_stays(lambda: rig.agent.running() and "started" not in rig.notifier.statuses(), 0.2,
                 "the agent retrying, not started while the node may not be read")
    assert not records(caplog, NO_NODE_MESSAGE)
    assert not any(NAME in s and "no Node of this name" in s for s in rig.notifier.statuses())
    unreadable = records(caplog, CANNOT_READ)
    assert [r.levelno for r in unreadable[:2]] == [logging.WARNING, logging.DEBUG], (
        "one warning, then the retries at debug level"
    )
    assert fields_of(unreadable[0])["ERROR_KIND"] == "forbidden"

    rig.nodes.refusal = None  # the RBAC is fixed
    wait_for(rig.mirrored_idle, TIMEOUT, "update_engine's status mirrored onto the Node")
    assert rig.notifier.count("READY=1") == 1
    wait_for(lambda: "started" in rig.notifier.statuses(), TIMEOUT, "STATUS=started")
