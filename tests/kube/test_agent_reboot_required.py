"""``/run/reboot-required`` as a trigger of the real cluo-agent process (docs/agent.md
"What asks for a reboot"), and the agent's other file in ``/run``, the one Flatcar's
login message reads; on the real control plane and the private system bus, as
tests/kube/test_agent.py runs it. The host's ``/run`` is the host dir's (``--host-root``),
emptied by the rig's reboot as the tmpfs is on a real host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.waiting import assert_stays
from tests.kube import test_agent
from tests.kube.test_agent import AgentOptions, Rig

pytestmark = [pytest.mark.kube, pytest.mark.dbus]

# The rig of tests/kube/test_agent.py, and the fixtures it is built from.
rig = test_agent.rig
kubelet = test_agent.kubelet
agent_policy = test_agent.agent_policy

REASON = "/run/reboot-required (packages: kubernetes, containerd)"


def test_the_file_appearing_starts_a_cycle_with_its_reason_and_the_reboot_ends_it(
    rig: Rig,
) -> None:
    rig.wait(lambda: rig.annotation("status") == "UPDATE_STATUS_IDLE",
             "the agent to mirror update_engine's idle status")
    run = rig.host.root / "run"
    (run / "reboot-required.pkgs").write_text("kubernetes\ncontainerd\n")
    (run / "reboot-required").write_text("*** System restart required ***\n")

    rig.wait(lambda: rig.annotation("reboot-needed") == "true"
             and rig.label("reboot-needed") == "true", "reboot-needed=true, annotation and label")
    assert rig.annotation("reboot-reason") == REASON
    [needed] = rig.wait(lambda: rig.events("RebootNeeded"), "the RebootNeeded Event")
    assert needed.message.startswith(f"{REASON} asks for a reboot")
    assert "a reboot-required file asks for a reboot" in rig.agent.log()
    assert_stays(lambda: rig.reboots() == 0 and not rig.cordoned(), 1.0,
                 "no drain nor reboot without a grant")

    rig.set_annotation("reboot-ok", "true")  # the coordinator's grant
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false) after the drain")
    rig.reboot_host()  # /run is empty again
    rig.finish_cycle()
    assert rig.annotation("reboot-reason") is None
    assert_stays(lambda: rig.annotation("reboot-needed") == "false" and rig.reboots() == 1,
                 1.0, "the file is gone with the reboot: no second request")


def test_a_file_made_before_the_agent_started_counts(rig: Rig) -> None:
    rig.agent.kill()
    (rig.host.root / "run" / "reboot-required").touch()
    rig.agent.start()

    rig.wait(lambda: rig.annotation("reboot-needed") == "true",
             "reboot-needed=true from the file found at start")
    assert rig.annotation("reboot-reason") == "/run/reboot-required"


@pytest.mark.parametrize(
    "rig", [AgentOptions(args=("--reboot-required-trigger=false",))], indirect=True)
def test_the_trigger_can_be_turned_off(rig: Rig) -> None:
    rig.wait(lambda: rig.annotation("status") == "UPDATE_STATUS_IDLE",
             "the agent to mirror update_engine's idle status")
    (rig.host.root / "run" / "reboot-required").touch()
    assert_stays(lambda: rig.annotation("reboot-needed") != "true", 2.0,
                 "no reboot asked for: the trigger is off")
    assert "not watching for a reboot-required file" in rig.agent.log()


def profile_sees_a_coordinator(conf: Path) -> bool:
    """The check of Flatcar's login profile: a coordinator holds the file's lock."""
    free = subprocess.run(["flock", "--nonblock", "--exclusive", str(conf), "true"],
                          check=False, timeout=10)
    return free.returncode != 0


def login_state(conf: Path) -> str:
    return dict(line.split("=", 1) for line in conf.read_text().splitlines()).get("STATE", "")


def test_the_login_message_file_follows_the_cycle_while_the_agent_runs(rig: Rig) -> None:
    conf = rig.host.root / "run/update-engine/coordinator.conf"
    rig.wait(lambda: conf.exists() and login_state(conf) == "running",
             "the agent to say it runs in /run/update-engine/coordinator.conf")
    assert conf.read_text().startswith("NAME=cluo-agent\nSTRATEGY=cluo\n")
    assert profile_sees_a_coordinator(conf)

    (rig.host.root / "run" / "reboot-required").touch()
    rig.wait(lambda: login_state(conf) == "reboot-planned", "STATE=reboot-planned")
    rig.set_annotation("reboot-ok", "true")
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false) after the drain")
    assert login_state(conf) == "rebooting"

    rig.agent.terminate()
    assert not profile_sees_a_coordinator(conf), "the lock went with the agent"
