"""cluo_host.login_message: the states Flatcar's login message shows, and the locked file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from cluo.cycle.agent_core import (
    Cordoning,
    Draining,
    Granted,
    GrantReturned,
    Idle,
    Rebooted,
    Rebooting,
    RebootNeeded,
    State,
    Uncordoning,
    WaitingForAfterReboot,
    WaitingForGrant,
)
from cluo_host.cycle import login_state
from cluo_host.login_message import CoordinatorConf


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        (Idle(), "running"),
        (RebootNeeded(), "reboot-planned"),
        (WaitingForGrant(), "reboot-planned"),
        (Granted(already_cordoned=False), "rebooting"),
        (Cordoning(marked=True), "rebooting"),
        (Draining(started_at=None, deadline=None), "rebooting"),
        (Rebooting(attempt=1), "rebooting"),
        (Rebooted(boot_id_before="a", boot_id="b"), "running"),
        (WaitingForAfterReboot(), "running"),
        (Uncordoning(agent_cordoned=True, unschedulable=True), "running"),
        (GrantReturned(reason="drain timed out"), "running"),
    ],
)
def test_each_state_shows_as_the_profile_reads_it(state: State, shown: str) -> None:
    assert login_state(state) == shown


def held_by_someone(path: Path) -> bool:
    """What the profile asks: can another open of the file take the lock?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_the_file_is_made_locked_and_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "run/update-engine/coordinator.conf"
    conf = CoordinatorConf(path)
    assert conf.take()
    try:
        inode = path.stat().st_ino
        assert path.read_text() == "NAME=cluo-agent\nSTRATEGY=cluo\nSTATE=starting\n"
        assert held_by_someone(path)
        conf.show("reboot-planned")
        conf.show("running")
        assert path.read_text() == "NAME=cluo-agent\nSTRATEGY=cluo\nSTATE=running\n"
        assert path.stat().st_ino == inode, "rewritten in place, so the lock stays on it"
        assert held_by_someone(path)
    finally:
        conf.close()
    assert not held_by_someone(path), "closed: the profile reads the agent as not running"


def test_a_file_another_coordinator_holds_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "coordinator.conf"
    path.write_text("NAME=locksmithd\nSTATE=running\n")
    other = os.open(path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        conf = CoordinatorConf(path)
        assert not conf.take()
        conf.show("rebooting")
    finally:
        os.close(other)
    assert path.read_text() == "NAME=locksmithd\nSTATE=running\n"
    assert "is locksmithd running?" in caplog.text
