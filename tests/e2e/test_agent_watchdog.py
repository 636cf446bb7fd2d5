"""The agent's watchdog on a real systemd host (units/cluo-agent.service: Type=notify,
WatchdogSec=30s, Restart=always): a wedged agent is killed and restarted by systemd, and
the restarted one finishes the cycle with exactly one reboot. The host and the cycle are
those of tests/e2e/test_agent_host.py.

Two wedges:

- The agent's loop stuck in an await that never returns while the process and its event
  loop run on (testbed/wedged_agent.py: the agent from source, its logind Reboot call
  made to hang). The pings stop only because the loop stopped beating its heartbeat
  (cluo_host/notify.py): a pinger on its own timer, which the event loop still runs,
  would keep the agent alive for ever, and this test fails with it.
- The release image's agent stopped whole (SIGSTOP) mid-drain: nothing in it runs, so no
  ping reaches systemd. Any pinger in the process stops there; what this proves is that
  the shipped bundle under the shipped unit is watched: systemd gives it the watchdog,
  kills it when the pings stop and starts it again.

The same logic on fake time, with every bound, is tests/unit/test_agent_watchdog.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from cluo_host.agent import ACTION_BOUND
from testbed import wedged_agent
from testbed.nspawn import EXIT_REBOOT, RebootFollower
from testbed.waiting import assert_stays
from tests.e2e import test_agent_host
from tests.e2e.test_agent_host import SLOW_GRACE_SECONDS, Cycle, phases, report

pytestmark = test_agent_host.pytestmark

# The rig of tests/e2e/test_agent_host.py, and the fixtures it is built from.
cycle = test_agent_host.cycle
kubelet = test_agent_host.kubelet
core = test_agent_host.core

WATCHDOG = 30.0  # the unit's WatchdogSec=; the agent pings every half of it
OVERDUE = "the agent's loop is overdue; not feeding the watchdog"  # cluo_host/notify.py
WEDGED = "test bed: the reboot call hangs for ever, the event loop runs on"
# WatchdogSec=30s without a ping, then WatchdogSignal (SIGABRT, with SIGCONT so that a
# stopped process gets it), RestartSec=10s, the rest of the drain and the reboot; with
# room to spare.
RESTART_TIMEOUT = 120.0
# The reboot await's bound and one ping interval of grace before the heartbeat lapses,
# up to one more interval until watchdog_loop looks, WatchdogSec=, then RESTART_TIMEOUT.
WEDGED_RESTART_TIMEOUT = ACTION_BOUND + 2 * WATCHDOG / 2 + WATCHDOG + RESTART_TIMEOUT


@pytest.mark.timeout(900)
def test_an_agent_stuck_in_an_await_stops_feeding_the_watchdog_and_is_restarted(
    cycle: Cycle,
) -> None:
    host = cycle.host
    cycle.add_pod("web-a")
    cycle.wait_until_agent_ready()
    released_pid = cycle.agent_property("MainPID")
    wedged_agent.install(host)
    cycle.wait_until_agent_ready()
    assert cycle.agent_property("WatchdogUSec") == "30s"
    wedged_pid = cycle.agent_property("MainPID")
    argv = host.run("cat", f"/proc/{wedged_pid}/cmdline").stdout.split("\0")
    assert argv[:3] == ["/usr/bin/python3", "-m", "testbed.wedged_agent"], argv
    cycle.announce_reboot_needed()
    first_boot = host.boot_id()
    wedged_agent.wedge(host, wedged_pid)

    with RebootFollower(host) as follower:
        cycle.set_annotation("reboot-ok", "true")
        cycle.wait(lambda: _message(cycle, WEDGED), "the agent to wedge in its reboot call")
        assert cycle.pods() == [], "drained before the reboot call"
        # The loop is stuck, the process and its event loop run on (it logs the lapse).
        cycle.wait(lambda: _message(cycle, OVERDUE), "the wedged agent to stop feeding "
                   "the watchdog", ACTION_BOUND + 2 * WATCHDOG)
        assert host.run("cat", f"/proc/{wedged_pid}/stat").stdout.split()[2] != "T"
        assert not follower.exits
        first = _rebooted_once_after_the_watchdog(cycle, follower, first_boot,
                                                  WEDGED_RESTART_TIMEOUT)
    watchdog = [e for e in first if "Watchdog timeout" in e.get("MESSAGE", "")]
    [wedged] = [e for e in first if e.get("MESSAGE") == WEDGED]
    [overdue] = [e for e in first if e.get("MESSAGE") == OVERDUE]
    assert wedged["_PID"] == overdue["_PID"] == wedged_pid
    ready = [e for e in first if e.get("MESSAGE") == "agent ready"]
    assert [e["_PID"] for e in ready[:2]] == [released_pid, wedged_pid]
    assert len(ready) == 3 and ready[2]["_PID"] not in (released_pid, wedged_pid), ready
    # Both decided to reboot; the restarted one got to make the call.
    rebooting = [e for e in first if e.get("MESSAGE") == "rebooting"]
    assert [e["_PID"] for e in rebooting] == [wedged_pid, ready[2]["_PID"]], rebooting
    assert "Rebooting" in phases(first, host.name)
    start = _seconds(wedged)
    report("loop wedged in an await", {
        "to overdue": _seconds(overdue) - start,
        "to Watchdog timeout": _seconds(watchdog[0]) - start,
        "to restarted agent ready": _seconds(ready[2]) - start,
        "to reboot call": _seconds(rebooting[1]) - start,
    })


@pytest.mark.timeout(900)
def test_a_stopped_agent_is_killed_by_the_watchdog_restarted_and_reboots_once(
    cycle: Cycle,
) -> None:
    host = cycle.host
    cycle.add_pod("web-a")
    cycle.add_pod("slow", grace=SLOW_GRACE_SECONDS)
    cycle.wait_until_agent_ready()
    assert cycle.agent_property("WatchdogUSec") == "30s"
    cycle.announce_reboot_needed()
    first_boot = host.boot_id()
    wedged_pid = cycle.agent_property("MainPID")

    with RebootFollower(host) as follower:
        cycle.set_annotation("reboot-ok", "true")
        cycle.wait(lambda: cycle.pod_deleting("slow"), "the drain to evict the slow pod")
        host.run("kill", "-STOP", wedged_pid)
        assert cycle.annotation("reboot-in-progress") == "true"
        assert not follower.exits
        # systemd kills it and starts a new one, which finishes the drain and reboots.
        first = _rebooted_once_after_the_watchdog(cycle, follower, first_boot,
                                                  RESTART_TIMEOUT)
    ready = [e for e in first if e.get("MESSAGE") == "agent ready"]
    assert len(ready) == 2, "the agent started twice in the first boot"
    assert ready[0]["_PID"] == wedged_pid != ready[1]["_PID"]
    assert "Rebooting" in phases(first, host.name)


def _rebooted_once_after_the_watchdog(cycle: Cycle, follower: RebootFollower,
                                      first_boot: str, timeout: float) -> list[dict[str, Any]]:
    """Wait for the restarted agent's reboot and the end of the cycle; check there was
    exactly one reboot and that systemd's watchdog killed the agent in the first boot.
    Returns the unit's journal of that boot."""
    host = cycle.host
    cycle.wait(lambda: follower.exits, "the restarted agent's reboot", timeout)
    second_boot = cycle.follow_reboot(follower, first_boot)
    cycle.finish_after_reboot()
    assert_stays(lambda: host.running and host.boots == 2, 2.0, "no second reboot")
    assert follower.exits == [EXIT_REBOOT], "exactly one reboot"
    assert second_boot != first_boot
    first = cycle.agent_journal(first_boot)
    messages = [e.get("MESSAGE", "") for e in first]
    assert any("Watchdog timeout" in m for m in messages), messages[-30:]
    assert any("Failed with result 'watchdog'" in m for m in messages), messages[-30:]
    return first


def _message(cycle: Cycle, message: str) -> bool:
    return any(e.get("MESSAGE") == message for e in cycle.agent_journal())


def _seconds(entry: dict[str, Any]) -> float:
    return int(entry["__REALTIME_TIMESTAMP"]) / 1_000_000
