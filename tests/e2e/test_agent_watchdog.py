"""The agent's watchdog on a real systemd host: a wedged agent is killed and restarted by
systemd (units/cluo-agent.service: WatchdogSec=30s, Restart=always), and the restarted one
finishes the cycle with exactly one reboot.

The host and the cycle are those of tests/e2e/test_agent_host.py. The agent is wedged
with SIGSTOP mid-drain: nothing in it runs, so no WATCHDOG=1 reaches systemd. That a
loop stuck in an await stops the pings while the process runs on is proven on fake time
(tests/unit/test_agent_watchdog.py); no await of the real agent can hang unbounded, so
on a real host only the whole process can be wedged from outside.
"""

from __future__ import annotations

import pytest

from testbed.nspawn import EXIT_REBOOT, RebootFollower
from testbed.waiting import assert_stays
from tests.e2e import test_agent_host
from tests.e2e.test_agent_host import SLOW_GRACE_SECONDS, Cycle, phases

pytestmark = test_agent_host.pytestmark

# The rig of tests/e2e/test_agent_host.py, and the fixtures it is built from.
cycle = test_agent_host.cycle
kubelet = test_agent_host.kubelet
core = test_agent_host.core

# WatchdogSec=30s without a ping, then WatchdogSignal (SIGABRT, with SIGCONT so that a
# stopped process gets it), RestartSec=10s, the rest of the drain and the reboot; with
# room to spare.
RESTART_TIMEOUT = 120.0


@pytest.mark.timeout(900)
def test_a_wedged_agent_is_killed_by_the_watchdog_restarted_and_reboots_once(
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
        cycle.wait(lambda: follower.exits, "the restarted agent's reboot", RESTART_TIMEOUT)
        second_boot = cycle.follow_reboot(follower, first_boot)
        cycle.finish_after_reboot()
        assert_stays(lambda: host.running and host.boots == 2, 2.0, "no second reboot")
    assert follower.exits == [EXIT_REBOOT], "exactly one reboot"
    assert second_boot != first_boot

    first = cycle.agent_journal(first_boot)
    messages = [e.get("MESSAGE", "") for e in first]
    assert any("Watchdog timeout" in m for m in messages), messages[-30:]
    ready = [e for e in first if e.get("MESSAGE") == "agent ready"]
    assert len(ready) == 2, "the agent started twice in the first boot"
    assert ready[0]["_PID"] == wedged_pid != ready[1]["_PID"]
    assert "Rebooting" in phases(first, host.name)
