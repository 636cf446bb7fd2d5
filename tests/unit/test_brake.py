"""The brake on bad releases (planner rule 14): failed reboot proofs are recorded once per
node, and the roll pauses itself at --max-failed-reboots until an admin resumes it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from cluo.errors import ConfigError
from cluo.protocol import (
    FAILED_REBOOTS_ANNOTATION,
    PAUSED_ANNOTATION,
    PAUSED_AT_ANNOTATION,
    PAUSED_BY_ANNOTATION,
    PAUSED_REASON_ANNOTATION,
)
from cluo.settings import CommandLineExit
from cluo_coord.brake import FailedReboot, PausedBy, RollState, older_version, parse_version
from cluo_coord.config import load_admin_settings, load_settings
from cluo_coord.planner import (
    AcquireSlot,
    EmitEvent,
    EventType,
    MarkStuck,
    NodeView,
    PauseRoll,
    Plan,
    Reason,
    RecordFailedReboot,
    ResetRebootOk,
    SlotLease,
)
from tests.unit.test_planner import KEYS, NOW, acquired, kinds, node, of, reasons, run, slot

TIMEOUT = timedelta(hours=1)
LATE = NOW + TIMEOUT  # the holders below took their slot 5 minutes before NOW
NEW = "4152.0.0"
OLD = "4081.2.0"

# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(("running", "announced", "older"), [
    ("4081.2.0", "4152.0.0", True),
    ("4081.2.0", "4081.2.1", True),
    ("4081.2", "4081.2.1", True),  # a missing part counts as 0
    ("4081.10.0", "4081.9.0", False),  # numeric, not text order
    ("4152.0.0", "4152.0.0", False),
    ("4152.2.0", "4152.0.0", False),
    ("3815.0.0+nightly-20240101-2100", "3815.0.1", True),  # a build suffix is ignored
    ("4081.2.0", "0.0.0", False),  # update_engine announced nothing
    ("", "4152.0.0", False),  # the node reports no version
    ("unknown", "4152.0.0", False),
])
def test_version_comparison(running: str, announced: str, older: bool) -> None:
    assert older_version(running, announced) is older


def test_parse_version_reads_flatcar_versions() -> None:
    assert parse_version("4081.2.0") == (4081, 2, 0)
    assert parse_version("0.0.0") is None
    assert parse_version("") is None


# --------------------------------------------------------------------------- the record


def test_roll_state_round_trips_through_the_leader_lease_annotations() -> None:
    at = datetime(2026, 12, 7, 3, 50, tzinfo=UTC)
    state = RollState().with_failure(FailedReboot("a", "did not come back", at)).paused_as(
        PausedBy.BRAKE, "1 node failed", at)
    annotations = {k: v for k, v in state.annotations().items() if v is not None}
    assert annotations[PAUSED_ANNOTATION] == "true"
    assert annotations[PAUSED_BY_ANNOTATION] == "brake"
    assert annotations[PAUSED_REASON_ANNOTATION] == "1 node failed"
    assert annotations[PAUSED_AT_ANNOTATION] == "2026-12-07T03:50:00Z"
    assert RollState.from_annotations(annotations) == state


def test_a_pause_written_by_an_older_coordinator_reads_as_paused_by_nobody_named() -> None:
    state = RollState.from_annotations({PAUSED_ANNOTATION: "true"})
    assert state.paused and state.paused_by == "" and state.describe_pause() == "paused"


def test_a_malformed_record_reads_as_empty_and_says_so() -> None:
    state = RollState.from_annotations({FAILED_REBOOTS_ANNOTATION: "{not json"})
    assert state.failed == ()
    assert FAILED_REBOOTS_ANNOTATION in state.complaints[0]


def test_a_node_is_recorded_once_and_the_first_pauser_keeps_the_pause() -> None:
    state = RollState().with_failure(FailedReboot("a", "first")).with_failure(
        FailedReboot("a", "second"))
    assert [f.why for f in state.failed] == ["first"]
    paused = state.paused_as(PausedBy.ADMIN, "maintenance", NOW).paused_as(
        PausedBy.BRAKE, "failures", NOW + timedelta(minutes=1))
    assert (paused.paused_by, paused.reason, paused.since) == ("admin", "maintenance", NOW)


def test_resume_clears_the_pause_and_the_record() -> None:
    state = RollState().with_failure(FailedReboot("a", "x")).paused_as(PausedBy.BRAKE, "r", NOW)
    resumed = state.resumed()
    assert not resumed.paused and not resumed.failed
    assert all(value is None for value in resumed.annotations().values())


# --------------------------------------------------------------------------- rule 14


def gone(name: str = "lost") -> NodeView:
    """Granted, went down, never came back: NotReady on its old boot."""
    return node(name, needed=True, ok=True, in_progress=True, ready=False, boot_before="boot-1",
                cordoned=True, marked=True)


def back_not_ready(name: str = "lost") -> NodeView:
    """Granted, rebooted (a new boot id), but NotReady."""
    return node(name, ok=True, ready=False, boot="boot-2", boot_before="boot-1",
                cordoned=True, marked=True)


def back_on(version: str, name: str = "back") -> NodeView:
    """Granted, rebooted, Ready, reporting ``version``: the reboot is proven."""
    view = node(name, ok=True, boot="boot-2", boot_before="boot-1", cordoned=True, marked=True)
    return replace(view, os_version=version)


def announced(holder: str, version: str = NEW) -> SlotLease:
    return replace(slot(0, holder), announced_version=version)


def recorded(result: Plan) -> list[tuple[str, str]]:
    return [(c.failure.node, c.failure.why) for c in of(result, RecordFailedReboot)]


@pytest.mark.parametrize(("view", "why"), [
    (gone(), "did not come back within --reboot-timeout (1:00:00)"),
    (back_not_ready(), "came back (a new boot id) but was not Ready within --reboot-timeout "
                       "(1:00:00)"),
])
def test_a_granted_holder_not_back_at_its_timeout_failed_the_reboot_proof(
    view: NodeView, why: str
) -> None:
    result = run([view], [slot(0, "lost")], now=LATE, max_failed_reboots=2)
    assert recorded(result) == [("lost", why)]
    assert of(result, RecordFailedReboot)[0].failure.at == LATE
    # Recorded before the stuck mark: a crash in between records it again, never not.
    assert kinds(result)[:2] == ["RecordFailedReboot", "MarkStuck"]
    assert not of(result, PauseRoll)  # one failure, the limit is two


def test_a_holder_back_on_an_older_version_than_it_announced_failed_the_proof() -> None:
    result = run([back_on(OLD)], [announced("back")], max_failed_reboots=2)
    assert recorded(result) == [("back", f"came back on {OLD}, older than the announced {NEW}")]
    # It finishes: without after-reboot hooks the reset follows the proof, after the record.
    assert kinds(result)[:2] == ["RecordFailedReboot", "ResetRebootOk"]
    warning = [e for e in of(result, EmitEvent) if e.reason == Reason.REBOOT_ROLLED_BACK]
    assert warning and warning[0].type == EventType.WARNING


@pytest.mark.parametrize("version", [NEW, "4152.1.0"])
def test_a_holder_back_on_the_announced_version_or_newer_passes(version: str) -> None:
    result = run([back_on(version)], [announced("back")], max_failed_reboots=1)
    assert not recorded(result) and not of(result, PauseRoll)
    assert of(result, ResetRebootOk)


def test_a_holder_that_announced_no_version_is_not_compared() -> None:
    result = run([back_on(OLD)], [announced("back", "0.0.0")], max_failed_reboots=1)
    assert not recorded(result)


def test_a_holder_late_before_its_grant_is_stuck_but_no_failed_reboot() -> None:
    waiting = node("slow", needed=True, before_label=True)  # before-reboot hooks not done
    result = run([waiting], [slot(0, "slow")], now=LATE, max_failed_reboots=1,
                 before_reboot_annotations=("hooks.example.com/x",))
    assert of(result, MarkStuck) and not recorded(result) and not of(result, PauseRoll)


def test_the_roll_pauses_itself_at_the_limit_and_grants_nothing() -> None:
    result = run([gone(), node("next", needed=True)], [slot(0, "lost")], now=LATE,
                 max_concurrent=2, max_failed_reboots=1)
    pause = of(result, PauseRoll)
    assert len(pause) == 1 and pause[0].at == LATE
    assert "1 node(s) failed the reboot proof, the limit is 1" in pause[0].reason
    assert "lost" in pause[0].reason
    assert Reason.ROLL_PAUSED in reasons(result)
    assert acquired(result) == []  # slot 1 is free, but the roll is paused
    assert result.holds and result.holds[0].startswith("paused: the brake paused the roll")
    assert kinds(result).index("RecordFailedReboot") < kinds(result).index("PauseRoll")


def test_below_the_limit_the_roll_goes_on() -> None:
    result = run([gone(), node("next", needed=True)], [slot(0, "lost")], now=LATE,
                 max_concurrent=2, max_failed_reboots=2)
    assert recorded(result) and not of(result, PauseRoll)
    assert acquired(result) == [(1, "next")]


def test_failures_on_the_record_count_toward_the_limit() -> None:
    result = run([gone(), node("next", needed=True)], [slot(0, "lost")], now=LATE,
                 max_concurrent=2, max_failed_reboots=2, failed_reboots=frozenset({"earlier"}))
    assert len(of(result, PauseRoll)) == 1
    assert "earlier, lost" in of(result, PauseRoll)[0].reason


def test_a_node_on_the_record_is_not_recorded_again() -> None:
    result = run([gone()], [slot(0, "lost")], now=LATE, max_failed_reboots=3,
                 failed_reboots=frozenset({"lost"}))
    assert not recorded(result) and of(result, MarkStuck)


def test_a_record_at_the_limit_without_a_pause_pauses_after_a_crash() -> None:
    """The record was written, the pause was not (a crash in between): pause now."""
    result = run([node("next", needed=True)], now=LATE, max_failed_reboots=1,
                 failed_reboots=frozenset({"lost"}))
    assert len(of(result, PauseRoll)) == 1 and acquired(result) == []


def test_a_roll_already_paused_is_not_paused_again() -> None:
    result = run([gone()], [slot(0, "lost")], now=LATE, max_failed_reboots=1, paused=True)
    assert recorded(result) and not of(result, PauseRoll)


def test_a_stuck_slot_is_not_counted_again_after_a_resume() -> None:
    """Resume cleared the record; the holder is still out, but marked stuck already."""
    result = run([gone(), node("next", needed=True)], [slot(0, "lost", stuck=True)],
                 now=LATE, max_concurrent=2, max_failed_reboots=1)
    assert not recorded(result) and not of(result, PauseRoll)
    assert acquired(result) == [(1, "next")]


def test_zero_turns_the_brake_off() -> None:
    result = run([gone(), node("next", needed=True)], [slot(0, "lost")], now=LATE,
                 max_concurrent=2, max_failed_reboots=0)
    assert not recorded(result) and not of(result, PauseRoll)
    assert acquired(result) == [(1, "next")]


def test_the_slot_records_the_version_the_node_announced() -> None:
    view = node("a", needed=True, extra={KEYS.new_version: NEW})
    assert of(run([view]), AcquireSlot)[0].announced_version == NEW


# --------------------------------------------------------------------------- the flag


def test_the_flag_defaults_to_two_and_zero_turns_the_brake_off() -> None:
    assert load_settings([], {}).policy.max_failed_reboots == 2
    assert load_settings(["--max-failed-reboots", "0"], {}).policy.max_failed_reboots == 0
    env = {"CLUO_COORD_MAX_FAILED_REBOOTS": "3"}
    assert load_settings([], env).policy.max_failed_reboots == 3
    with pytest.raises(ConfigError, match="--max-failed-reboots: '-1'"):
        load_settings(["--max-failed-reboots", "-1"], {})


def test_resume_says_in_its_help_that_it_clears_the_record() -> None:
    with pytest.raises(CommandLineExit) as done:
        load_admin_settings(["resume", "--help"], {})
    assert "clears the brake's record" in " ".join(done.value.output.split())
