"""What ``kubectl describe node`` shows of a reboot, from the real driver on fake time.

The node's Events say what happened: each attempt a block inhibitor stopped is one
``RebootFailed`` naming the inhibitor and the retry, and the one attempt logind accepted
is the one ``Rebooting``, posted after logind said yes (tests/unit/agent_rig.py).
"""

from __future__ import annotations

import asyncio

import pytest

from cluo.cycle.inhibitors import Inhibitor
from tests.unit.agent_rig import FakeLogind, run_agent

pytestmark = pytest.mark.timeout(30)

BACKUP = Inhibitor("shutdown:sleep", "backup-tool", "nightly backup running", "block", 0, 4242)


def test_one_reboot_held_by_an_inhibitor_shows_its_refusals_and_one_rebooting_event() -> None:
    def held_for_100s(logind: FakeLogind) -> None:
        logind.inhibitors.append(BACKUP)
        asyncio.get_running_loop().call_later(100, logind.inhibitors.clear)

    result = run_agent(until=250, logind=held_for_100s)

    journal = result.journal
    events = [c for c in journal.of("event") if c.detail in ("RebootFailed", "Rebooting")]
    # Attempts at 0, 10, 30 and 70 s are inhibited; the one at 150 s goes through.
    assert [(c.t, c.detail) for c in events] == [
        (0, "RebootFailed"), (10, "RebootFailed"), (30, "RebootFailed"), (70, "RebootFailed"),
        (150, "Rebooting"),
    ]
    assert journal.times("reboot") == [150]
    assert journal.first("reboot") < journal.first("event", "Rebooting")
    messages = dict(result.node.events[-2:])
    assert messages["RebootFailed"] == ("reboot attempt 4 inhibited: 'backup-tool' (pid 4242, "
                                        "uid 0): nightly backup running; retrying 80s after "
                                        "it failed")
    assert messages["Rebooting"] == "drained; rebooting (attempt 5, accepted by logind)"
