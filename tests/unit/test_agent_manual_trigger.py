"""Manual reboot triggers, from the real driver on fake time (tests/unit/agent_rig.py).

Root on the host asks with SIGUSR1 (``Agent.request_reboot``): the agent announces the
reboot as it would update_engine's, once. A ``StatusUpdate`` the update_engine adapter
did not accept (a one-shot root sender gone before it could be identified, a sender that
is not root) is shown on the node as one Warning Event saying why and what to do instead,
at most one per ``IGNORED_UPDATE_EVENT_INTERVAL``; nothing else happens.
"""

from __future__ import annotations

import asyncio

import pytest

from cluo.cycle.update_status import UpdateEngineStatus, UpdateOperation
from cluo_host.agent import IGNORED_UPDATE_EVENT_INTERVAL
from cluo_host.update_engine import UNIDENTIFIED_SENDER
from tests.unit.agent_rig import AgentRun, run_agent

pytestmark = pytest.mark.timeout(30)

IDLE = UpdateEngineStatus(1_700_000_000, 0.0, UpdateOperation.IDLE.value, "0.0.0", 0)


def test_an_ignored_status_update_is_shown_on_the_node_once_per_interval() -> None:
    def one_shot_senders(run: AgentRun) -> None:
        loop = asyncio.get_running_loop()
        engine = run.engine
        assert engine is not None
        for at, sender in ((10, ":1.40"), (11, ":1.41"), (12, ":1.42"),  # one Event
                           (100, ":1.43"),  # within the interval: the log only
                           (400, ":1.44")):  # a new interval: a new Event
            loop.call_later(at, engine.ignore, sender, UNIDENTIFIED_SENDER)

    result = run_agent(until=500, annotations=lambda keys: {}, status=IDLE,
                       script=one_shot_senders)

    assert IGNORED_UPDATE_EVENT_INTERVAL == 300
    assert result.journal.times("event", "StatusUpdateIgnored") == [10, 400]
    first, second = [m for reason, m in result.node.events if reason == "StatusUpdateIgnored"]
    assert first.startswith("a StatusUpdate signal from :1.40 was ignored: its sender "
                            "disconnected before it could be identified as root")
    assert "annotate the node reboot-needed=true" in first
    assert second.startswith("a StatusUpdate signal from :1.44 was ignored")
    assert result.keys.reboot_needed not in result.node.annotations


def test_a_reboot_requested_on_the_host_is_announced_once() -> None:
    def request(run: AgentRun) -> None:
        assert run.agent is not None
        loop = asyncio.get_running_loop()
        loop.call_later(10, run.agent.request_reboot)
        loop.call_later(20, run.agent.request_reboot)  # again: the node already says so

    result = run_agent(until=60, annotations=lambda keys: {}, status=IDLE, script=request)

    keys = result.keys
    assert result.node.annotations[keys.reboot_needed] == "true"
    assert result.node.labels[keys.reboot_needed] == "true"
    [(at, _what)] = [(c.t, c.detail) for c in result.journal.of("event")]
    assert at == 10
    assert result.node.events == [("RebootNeeded", "reboot requested on the host (SIGUSR1 to "
                                   "cluo-agent); waiting for a reboot slot")]
