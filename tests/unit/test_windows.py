"""Reboot windows: CLUO/locksmith syntax, several windows, time zones, next change."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from cluo_coord.windows import (
    RebootWindows,
    Window,
    WindowError,
    parse_length,
    parse_windows,
    parse_zone,
)

# 2024-01-01 is a Monday.
MONDAY = datetime(2024, 1, 1, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """Day 0 is Monday 2024-01-01, in UTC."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", timedelta(hours=1)),
        ("90m", timedelta(minutes=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2h45m30s", timedelta(hours=2, minutes=45, seconds=30)),
    ],
)
def test_lengths_use_go_duration_syntax(text: str, expected: timedelta) -> None:
    assert parse_length(text) == expected


@pytest.mark.parametrize("text", ["", "1d", "1h30", "h", "1 h", "-1h", "1h-30m", "abc"])
def test_bad_lengths_are_refused_naming_the_input(text: str) -> None:
    with pytest.raises(WindowError, match="reboot window length") as info:
        parse_length(text)
    assert repr(text) in str(info.value)


def test_cluo_flags_parse_into_a_weekly_window() -> None:
    window = Window.parse("Tue 15:00", "2h")
    assert window == Window(weekday=1, start=time(15, 0), length=timedelta(hours=2))


@pytest.mark.parametrize(
    ("start", "weekday"),
    [("mon 14:00", 0), ("MONDAY 14:00", 0), ("Sun 14:00", 6), ("saturday 14:00", 5)],
)
def test_day_names_are_case_insensitive_short_or_long(start: str, weekday: int) -> None:
    assert Window.parse(start, "1h").weekday == weekday


def test_a_start_without_a_day_is_a_daily_window() -> None:
    window = Window.parse("9:05", "30m")
    assert window.weekday is None
    assert window.start == time(9, 5)


@pytest.mark.parametrize(
    ("start", "length", "complaint"),
    [
        ("Mon 25:00", "1h", "hour must be 0-23"),
        ("Mon 14:60", "1h", "minute 0-59"),
        ("Funday 14:00", "1h", "'Funday' is not a day name"),
        ("Mon 14h", "1h", "'14h' is not HH:MM"),
        ("Mon 14:00 extra", "1h", "is not '\\[DAY\\] HH:MM'"),
        ("", "1h", "is not '\\[DAY\\] HH:MM'"),
        ("14:00", "24h", "shorter than a day"),
        ("Mon 14:00", "168h", "shorter than a week"),
        ("Mon 14:00", "0m", "positive"),
    ],
)
def test_bad_windows_are_refused_naming_the_input(start: str, length: str, complaint: str) -> None:
    with pytest.raises(WindowError, match=complaint) as info:
        Window.parse(start, length)
    assert repr(start) in str(info.value)


def test_unknown_time_zone_is_refused_naming_it() -> None:
    with pytest.raises(WindowError, match="'Mars/Olympus_Mons' is not a known IANA"):
        parse_zone("Mars/Olympus_Mons")


def test_malformed_window_list_entry_is_refused_naming_it() -> None:
    with pytest.raises(WindowError, match="'Mon' is not"):
        parse_windows("Mon 14:00 1h, Mon")


def test_no_window_means_always_open() -> None:
    windows = parse_windows("")
    assert windows.always_open
    assert windows.is_open(at(2, 3))
    assert windows.next_change(at(2, 3)) is None


@pytest.mark.parametrize(
    ("spec", "now", "is_open"),
    [
        # weekly, Monday 14:00 for 90 minutes: start inclusive, end exclusive
        ("Mon 14:00 90m", at(0, 13, 59), False),
        ("Mon 14:00 90m", at(0, 14, 0), True),
        ("Mon 14:00 90m", at(0, 15, 29), True),
        ("Mon 14:00 90m", at(0, 15, 30), False),
        ("Mon 14:00 90m", at(1, 14, 30), False),
        ("Mon 14:00 90m", at(7, 14, 30), True),
        # daily
        ("14:00 1h", at(3, 14, 30), True),
        ("14:00 1h", at(3, 15, 30), False),
        # across midnight and across the end of the week
        ("23:00 2h", at(2, 0, 30), True),
        ("Sun 23:00 2h", at(7, 0, 30), True),
        ("Sun 23:00 2h", at(7, 1, 0), False),
        # several windows: any of them
        ("Mon 14:00 1h, Sat 02:00 1h30m", at(5, 3, 0), True),
        ("Mon 14:00 1h; Sat 02:00 1h30m", at(5, 3, 30), False),
    ],
)
def test_is_open(spec: str, now: datetime, is_open: bool) -> None:
    assert parse_windows(spec).is_open(now) is is_open


def test_start_times_are_wall_clock_times_in_the_zone() -> None:
    windows = parse_windows("Mon 14:00 1h", "Europe/Berlin")
    # Winter: Berlin is UTC+1, so 14:00 local is 13:00 UTC.
    assert windows.is_open(at(0, 13, 30))
    assert not windows.is_open(at(0, 14, 30))
    # Summer: UTC+2.
    summer_monday = datetime(2024, 7, 1, 12, 30, tzinfo=UTC)
    assert windows.is_open(summer_monday)


def test_now_in_any_zone_means_the_same_instant() -> None:
    windows = parse_windows("Mon 14:00 1h", "Europe/Berlin")
    berlin = parse_zone("Europe/Berlin")
    assert windows.is_open(datetime(2024, 1, 1, 14, 30, tzinfo=berlin))


def test_start_in_a_spring_forward_gap_begins_after_the_gap() -> None:
    # 2024-03-31 is a Sunday; Berlin skips 02:00-03:00 local. 02:30 "before the gap" is
    # 01:30 UTC, i.e. 03:30 CEST; the window lasts one hour of elapsed time.
    windows = parse_windows("Sun 02:30 1h", "Europe/Berlin")
    assert not windows.is_open(datetime(2024, 3, 31, 1, 29, tzinfo=UTC))
    assert windows.is_open(datetime(2024, 3, 31, 1, 30, tzinfo=UTC))
    assert not windows.is_open(datetime(2024, 3, 31, 2, 30, tzinfo=UTC))


@pytest.mark.parametrize(
    ("spec", "now", "expected"),
    [
        # closed: the next opening, possibly next week
        ("Mon 14:00 90m", at(0, 10), at(0, 14)),
        ("Mon 14:00 90m", at(0, 16), at(7, 14)),
        # open: the closing
        ("Mon 14:00 90m", at(0, 14, 10), at(0, 15, 30)),
        # daily, after today's window: tomorrow
        ("02:00 1h", at(3, 5), at(4, 2)),
        # overlapping windows close when the last one does
        ("Mon 14:00 2h, Mon 15:00 2h", at(0, 14, 30), at(0, 17)),
        # back-to-back windows do not close in between
        ("Mon 14:00 1h, Mon 15:00 1h", at(0, 14, 30), at(0, 16)),
    ],
)
def test_next_change(spec: str, now: datetime, expected: datetime) -> None:
    assert parse_windows(spec).next_change(now) == expected


def test_windows_covering_every_moment_never_change() -> None:
    windows = parse_windows("00:00 13h, 12:00 13h")
    assert windows.is_open(at(1, 5))
    assert windows.next_change(at(1, 5)) is None


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        RebootWindows().is_open(datetime(2024, 1, 1))


def test_windows_describe_themselves() -> None:
    assert str(parse_windows("Mon 14:00 90m", "Europe/Berlin")) == (
        "Mon 14:00 +1:30:00 (Europe/Berlin)"
    )
