"""The agent driver with the real logind adapter, against the logind mock on the private
system bus: what the node's Events say of one reboot held back by a block inhibitor.

The node, pods and update_engine are the fakes of tests/unit/agent_rig.py (here on a real
event loop and clock); logind is dbusmock's, reached through ``cluo_host.logind``. While
the inhibitor is listed, each attempt is one ``RebootFailed`` naming it, and Reboot is not
called; once it is gone, Reboot(false) is called once and one ``Rebooting`` follows it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from cluo_host.agent import Agent
from cluo_host.config import load_settings
from cluo_host.logind import Logind
from testbed.dbus_bus import CALL_TIMEOUT
from tests.unit.agent_rig import (
    HOST,
    NEED_REBOOT,
    NODE,
    FakeEngine,
    FakeNode,
    FakePods,
    Journal,
    JournaledNotifier,
    granted,
)

pytestmark = pytest.mark.dbus

BACKUP_BLOCK = ("shutdown:sleep", "backup-tool", "nightly backup running", "block", 0, 4242)
WAIT = CALL_TIMEOUT * 3  # for each step below


def test_a_reboot_held_by_an_inhibitor_posts_its_refusals_then_one_rebooting(
    logind_mock, system_bus_address
):
    settings = load_settings(["--node-name", NODE, "--reboot-retry-base", "0.2s",
                              "--reboot-retry-max", "0.2s"], {})
    started = time.monotonic()
    journal = Journal(clock=lambda: time.monotonic() - started)
    node = FakeNode(settings, journal, annotations=granted(settings.keys), cordoned=False)
    logind_mock.mock.AddInhibitor(*BACKUP_BLOCK)

    def events(reason: str) -> list[str]:
        return [message for r, message in list(node.events) if r == reason]

    async def until(predicate: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {WAIT:g}s waiting for {what}")
            await asyncio.sleep(0.05)  # the fakes have no event to wait on

    async def scenario() -> None:
        agent = Agent(settings, host=HOST, nodes=node, pods_factory=lambda: FakePods(journal),
                      engine_factory=lambda on_event: FakeEngine(on_event, NEED_REBOOT),
                      rebooter=Logind(system_bus_address),
                      notifier=JournaledNotifier(journal))
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            await until(lambda: len(events("RebootFailed")) >= 3, "three inhibited attempts")
            assert logind_mock.calls("Reboot") == [], "Reboot is not called while inhibited"
            assert events("Rebooting") == []
            logind_mock.mock.ClearInhibitors()
            await until(lambda: events("Rebooting"), "the Rebooting Event")
        finally:
            stop.set()
            await asyncio.wait_for(running, WAIT)

    asyncio.run(scenario())

    assert logind_mock.calls("Reboot") == [[False]]
    refused = events("RebootFailed")
    assert all("inhibited: 'backup-tool' (pid 4242, uid 0): nightly backup running" in m
               for m in refused)
    [rebooting] = events("Rebooting")
    assert rebooting == f"drained; rebooting (attempt {len(refused) + 1}, accepted by logind)"
    reasons = [c.detail for c in journal.of("event")]
    assert reasons[-1] == "Rebooting"
    assert set(reasons[:-1]) >= {"RebootFailed"}
