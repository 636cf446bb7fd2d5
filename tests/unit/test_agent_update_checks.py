"""The agent's writes under a realistic update_engine, from the real driver on fake time.

update_engine checks for updates periodically: each check is a ``StatusUpdate`` saying
``CHECKING_FOR_UPDATE``, then one saying ``IDLE`` with a new ``last_checked_time``
(tests/unit/agent_rig.py). A check that finds nothing changes nothing an operator or the
coordinator reads, so an idle node is written at most once an hour (``last-checked-time``,
``LAST_CHECKED_REFRESH``); a check that finds an update is written at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest

from cluo.cycle.agent_core import LAST_CHECKED_REFRESH
from cluo.cycle.update_status import UpdateEngineStatus, UpdateOperation
from tests.unit.agent_rig import AgentRun, run_agent

pytestmark = pytest.mark.timeout(30)

CHECKED_AT = 1_700_000_000  # update_engine's clock (Unix seconds) at the agent's start
IDLE = UpdateEngineStatus(CHECKED_AT, 0.0, UpdateOperation.IDLE.value, "0.0.0", 0)
CHECK_EVERY = 300.0  # 12 checks an hour
CHECK_TAKES = 2.0


def periodic_checks(count: int, *, found: UpdateEngineStatus | None = None
                    ) -> Callable[[AgentRun], None]:
    """``count`` checks CHECK_EVERY apart, the first CHECK_EVERY after the start; the last
    finds ``found`` if given, the others nothing."""

    def script(run: AgentRun) -> None:
        loop = asyncio.get_running_loop()
        engine = run.engine
        assert engine is not None
        for n in range(1, count + 1):
            start = n * CHECK_EVERY
            checked = CHECKED_AT + round(start + CHECK_TAKES)
            checking = replace(engine.status,
                               current_operation=UpdateOperation.CHECKING_FOR_UPDATE.value)
            result = replace(found if n == count and found else IDLE, last_checked_time=checked)
            loop.call_later(start, engine.publish, checking)
            loop.call_later(start + CHECK_TAKES, engine.publish, result)

    return script


def writes_after_start(run: AgentRun) -> list[tuple[float, str]]:
    """(fake time, what) of each write to the node after the start-up ones (at t=0)."""
    return [(c.t, c.detail) for c in run.journal.of("patch", "cordon", "uncordon") if c.t > 0]


def test_twelve_checks_in_an_hour_write_the_node_once() -> None:
    result = run_agent(until=3700, annotations=lambda keys: {}, status=IDLE,
                       script=periodic_checks(12))

    # The 12th check, at 3600 s, is the first whose time is LAST_CHECKED_REFRESH newer.
    assert LAST_CHECKED_REFRESH == 3600
    assert writes_after_start(result) == [(3602, f"last-checked-time={CHECKED_AT + 3602}")]
    assert result.node.annotations[result.keys.status] == "UPDATE_STATUS_IDLE"


def test_a_check_that_finds_an_update_is_written_at_once() -> None:
    need_reboot = replace(IDLE, current_operation="UPDATE_STATUS_UPDATED_NEED_REBOOT",
                          new_version="4152.2.0")
    result = run_agent(until=1000, annotations=lambda keys: {}, status=IDLE,
                       script=periodic_checks(3, found=need_reboot))

    found_at = 3 * CHECK_EVERY + CHECK_TAKES
    assert writes_after_start(result)[0] == (
        found_at, f"last-checked-time={CHECKED_AT + round(found_at)} new-version=4152.2.0 "
                  f"status=UPDATE_STATUS_UPDATED_NEED_REBOOT")
    assert result.node.annotations[result.keys.reboot_needed] == "true"
