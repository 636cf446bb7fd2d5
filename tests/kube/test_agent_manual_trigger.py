"""Asking the real cluo-agent process for a reboot by hand (docs/agent.md), on the real
control plane and the private system bus, as tests/kube/test_agent.py runs it.

A one-shot root sender of update_engine's StatusUpdate (``busctl emit``, as
``locksmithctl send-need-reboot`` does) has left the bus before the agent can ask who it
was: the agent refuses it, and says so in its journal and in a Warning Event naming the
supported triggers. SIGUSR1, which only root on the host can send, is one of them: it
starts the cycle as update_engine's UPDATED_NEED_REBOOT does.
"""

from __future__ import annotations

import shutil
import signal
import subprocess

import dbus
import pytest

from testbed.dbus_templates import update_engine as update1
from testbed.waiting import wait_for
from tests.kube import test_agent
from tests.kube.test_agent import NEED_REBOOT, TIMEOUT, Rig

pytestmark = [
    pytest.mark.kube,
    pytest.mark.dbus,
    pytest.mark.skipif(shutil.which("busctl") is None, reason="needs busctl"),
]

# The rig of tests/kube/test_agent.py, and the fixtures it is built from.
rig = test_agent.rig
kubelet = test_agent.kubelet
agent_policy = test_agent.agent_policy

DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


def unique_names(bus: dbus.bus.BusConnection) -> set[str]:
    names = bus.call_blocking(DBUS, DBUS_PATH, DBUS, "ListNames", "", ())
    return {str(name) for name in names if str(name).startswith(":")}


def test_a_one_shot_signal_is_refused_visibly_and_sigusr1_starts_the_cycle(
    rig: Rig, system_bus_address: str
) -> None:
    rig.wait(lambda: rig.annotation("status") == "UPDATE_STATUS_IDLE",
             "the agent to mirror update_engine's idle status")
    agent = rig.agent.popen
    assert agent is not None
    watcher = dbus.bus.BusConnection(system_bus_address)
    try:
        before = unique_names(watcher)
        # The agent is stopped until busctl has left the bus, so it reads the signal only
        # then: the race a one-shot sender loses on a real host, made certain.
        agent.send_signal(signal.SIGSTOP)
        try:
            subprocess.run(
                ["busctl", f"--address={system_bus_address}", "emit", update1.MAIN_OBJ,
                 update1.MAIN_IFACE, update1.STATUS_SIGNAL, update1.STATUS_SIGNATURE,
                 *map(str, NEED_REBOOT)],
                check=True, timeout=TIMEOUT)
            wait_for(lambda: unique_names(watcher) <= before, TIMEOUT,
                     "busctl's connection to be gone from the bus")
        finally:
            agent.send_signal(signal.SIGCONT)
    finally:
        watcher.close()

    [ignored] = rig.wait(lambda: rig.events("StatusUpdateIgnored"),
                         "a StatusUpdateIgnored Event on the node")
    assert ignored.type == "Warning"
    assert "disconnected before it could be identified as root" in ignored.message
    assert "--signal=SIGUSR1 cluo-agent" in ignored.message
    assert "status update ignored: sender could not be identified" in rig.agent.log()
    assert rig.annotation("reboot-needed") != "true", "the refused signal started nothing"

    agent.send_signal(signal.SIGUSR1)  # as `systemctl kill --signal=SIGUSR1 cluo-agent`
    rig.wait(lambda: rig.annotation("reboot-needed") == "true"
             and rig.label("reboot-needed") == "true", "reboot-needed=true, annotation and label")
    [needed] = rig.wait(lambda: rig.events("RebootNeeded"), "the RebootNeeded Event")
    assert needed.message.startswith("reboot requested on the host (SIGUSR1 to cluo-agent)")
    assert "reboot requested on the host" in rig.agent.log()

    rig.set_annotation("reboot-ok", "true")  # the coordinator's grant
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false) after the drain")
    rig.reboot_host()
    rig.finish_cycle()
    assert rig.annotation("reboot-needed") == "false", "the request was not made again"
