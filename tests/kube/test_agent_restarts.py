"""The whole cluo-agent process while the system bus or update_engine restarts under it.

The rig of tests/kube/test_agent.py (the real ``cluo-agent`` as its node, dbusmock's
update_engine and logind, pods run by the kubelet emulator), but on a system bus of its
own (`SystemBusDaemon`, at a fixed socket) so that its dbus-daemon can be restarted
without touching the session's bus. After the restart, a reboot-needed signal from
update_engine must still lead to exactly one drain and one reboot.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.dbus_bus import (
    LOGIND_TEMPLATE,
    UPDATE_ENGINE_TEMPLATE,
    MockService,
    SystemBusDaemon,
    spawn_mock,
)
from tests.kube import test_agent as agent_tests

pytestmark = [pytest.mark.kube, pytest.mark.dbus]

Rig = agent_tests.Rig
KEYS = agent_tests.KEYS
# Fixtures shared with that file; `rig` takes the mocks of this module's bus.
agent_policy = agent_tests.agent_policy
kubelet = agent_tests.kubelet
rig = agent_tests.rig
RECONNECT_TIMEOUT = 30.0


@pytest.fixture
def own_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[SystemBusDaemon]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="cluo-bus-", dir="/tmp"))
    try:
        with SystemBusDaemon(folder) as bus:
            monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)  # for spawn_mock
            yield bus
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def system_bus_address(own_bus: SystemBusDaemon) -> str:
    """This module's bus instead of the session's (the mocks and the agent use it)."""
    return own_bus.address


@pytest.fixture
def respawned(tmp_path: Path) -> Iterator[list[MockService]]:
    """Mocks a test starts again; stopped before the first ones' teardown, which would
    otherwise wait for their names to be released."""
    mocks: list[MockService] = []
    yield mocks
    for mock in reversed(mocks):
        mock.stop()


def _respawn(template: Path, log_dir: Path, respawned: list[MockService]) -> MockService:
    mock = spawn_mock(template, None, log_dir / f"{template.stem}-mock-again.log")
    respawned.append(mock)
    return mock


def _started(rig: Rig) -> None:
    rig.wait(lambda: (rig.read().metadata.labels or {}).get(KEYS.group) == "stable",
             "the agent to label its node (it is up and talking to the API server)")


def _one_cycle_to_one_reboot(rig: Rig) -> None:
    """update_engine announces a reboot: the node is drained once and rebooted once."""
    history = rig.history()
    agent_tests.announce_and_grant(rig)
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false) after the grant")
    assert rig.pods() == [], "the drain evicted both pods"
    rig.reboot_host()
    rig.finish_cycle()
    assert rig.reboots() == 1
    cordons = [(a.unschedulable, b.unschedulable)
               for a, b in zip(history.snapshot(), history.snapshot()[1:], strict=False)]
    assert cordons.count((False, True)) == 1, "one drain: the node was cordoned once"
    assert not rig.cordoned()


def test_dbus_daemon_restart_under_the_agent_then_one_drain_and_one_reboot(
    rig: Rig, own_bus: SystemBusDaemon, respawned: list[MockService], tmp_path: Path
) -> None:
    _started(rig)
    own_bus.stop()  # every connection cut: the agent's, update_engine's, logind's
    own_bus.start()
    # As systemd restarts them: the services come back on the new bus.
    rig.update_engine = _respawn(UPDATE_ENGINE_TEMPLATE, tmp_path, respawned)
    rig.logind = _respawn(LOGIND_TEMPLATE, tmp_path, respawned)
    rig.wait(lambda: "system bus reconnected" in rig.agent.log(),
             "the agent to reconnect to the restarted bus", timeout=RECONNECT_TIMEOUT)
    assert rig.agent.running(), "the same agent process rode the restart out"
    _one_cycle_to_one_reboot(rig)
    assert "system bus lost, reconnecting" in rig.agent.log()


def test_update_engine_restart_under_the_agent_then_one_drain_and_one_reboot(
    rig: Rig, respawned: list[MockService], tmp_path: Path
) -> None:
    _started(rig)
    rig.update_engine.stop()  # its name released: the agent sees the owner go
    rig.update_engine = _respawn(UPDATE_ENGINE_TEMPLATE, tmp_path, respawned)
    assert rig.agent.running()
    _one_cycle_to_one_reboot(rig)
    # It followed the new owner: the announcement came from update_engine, not merely from
    # some root connection (the test runs as root, so either would be accepted).
    (announced,) = [line for line in rig.agent.log().splitlines()
                    if "update_engine status" in line
                    and "OPERATION=UPDATE_STATUS_UPDATED_NEED_REBOOT" in line]
    assert "FROM_OWNER=True" in announced, announced
