"""The watchdog is fed by the agent loop's progress, on fake time (tests/unit/agent_rig.py).

systemd kills an agent whose pings stop for ``WatchdogSec`` (twice the interval). A ping
goes out only while the loop keeps its promise to be back from each await in time: an
idle wait lasts one interval at most, an action ``ACTION_BOUND`` at most. So an idle
agent and one waiting out a long drain keep the watchdog fed, and one stuck in an await
that never returns stops feeding it, although its event loop still runs.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from cluo.cycle.update_status import UpdateEngineStatus
from cluo_host.agent import ACTION_BOUND
from tests.unit.agent_rig import FakeLogind, run_agent

pytestmark = pytest.mark.timeout(30)

INTERVAL = 15.0  # WatchdogSec=30s
IDLE = UpdateEngineStatus(1_700_000_100, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)


def gaps(pings: list[float], until: float) -> list[float]:
    """The silences between pings, the one after the last ping up to ``until`` included."""
    times = [0.0, *pings, until]
    return [later - earlier for earlier, later in pairwise(times)]


def test_an_idle_agent_feeds_the_watchdog_for_an_hour_without_any_event() -> None:
    result = run_agent(until=3600, annotations=lambda keys: {}, status=IDLE,
                       watchdog_interval=INTERVAL)

    pings = result.journal.times("watchdog")
    assert max(gaps(pings, 3600)) <= INTERVAL
    assert not result.journal.of("reboot")


def test_an_agent_waiting_out_a_blocked_drain_feeds_the_watchdog_throughout() -> None:
    result = run_agent(lambda pods: pods.add("db-0", refusals=-1), until=900,
                       watchdog_interval=INTERVAL)

    journal = result.journal
    assert journal.times("event", "DrainTimedOut") == [600]  # the drain took its full time
    assert max(gaps(journal.times("watchdog"), 900)) <= INTERVAL


def test_an_agent_stuck_in_an_await_stops_feeding_the_watchdog() -> None:
    def wedge(logind: FakeLogind) -> None:
        logind.wedged = True  # ListInhibitors, before the reboot, never answers

    result = run_agent(until=1800, logind=wedge, watchdog_interval=INTERVAL)

    journal = result.journal
    [wedged_at] = journal.times("wedged")
    pings = journal.times("watchdog")
    assert pings[-1] <= wedged_at + ACTION_BOUND + INTERVAL  # the action's bound, then grace
    assert pings[-1] >= wedged_at + ACTION_BOUND  # a bounded action is not cut short
    assert 1800 - pings[-1] > 2 * INTERVAL, "systemd would have killed it long ago"
    assert not journal.of("reboot")
    assert result.killed
