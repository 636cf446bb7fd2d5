"""Reboot windows: when the coordinator may hand out new reboot slots.

The syntax is CLUO's and locksmith's, extended to several windows and a time zone:

- a window *start* is ``"Mon 14:00"`` (weekly: a day name and a wall-clock time) or
  ``"14:00"`` (daily). Day names are English, case-insensitive, three letters or full
  (``mon``, ``Monday``). Times are ``H:MM`` or ``HH:MM``, 24-hour.
- a window *length* is a Go-style duration: ``"1h"``, ``"90m"``, ``"1h30m"``, ``"45s"``,
  ``"1.5h"``. It must be positive and shorter than the period (a day for daily windows,
  a week for weekly ones), as locksmith requires.
- several windows are written as one string, entries separated by commas or semicolons,
  each entry ``[DAY] HH:MM LENGTH``: ``"Mon 14:00 1h, Sat 02:00 1h30m, 03:00 30m"``.
- the zone is an IANA name (``"Europe/Berlin"``); start times are wall-clock times there.

A window is open from its start (inclusive) to start + length (exclusive). Several
windows are open when any of them is. No window at all means "always open" (no
restriction), which is the default.

Daylight saving time: the length is elapsed time, not wall-clock time. A start that falls
into a spring-forward gap is read with the offset in force before the gap (02:30 in
Europe/Berlin on the changeover day starts at 03:30 CEST); a start that occurs twice
(fall-back) means its first occurrence. Both follow ``zoneinfo``'s ``fold=0``.

This module is pure: ``now`` is always passed in. ``zoneinfo`` reads tzdata files, which
is the only I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAYS = {
    "mon": 0, "monday": 0,
    "tue": 1, "tuesday": 1,
    "wed": 2, "wednesday": 2,
    "thu": 3, "thursday": 3,
    "fri": 4, "friday": 4,
    "sat": 5, "saturday": 5,
    "sun": 6, "sunday": 6,
}
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_LENGTH_PART_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(h|m|s)")
_LENGTH_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}

DAY = timedelta(days=1)
WEEK = timedelta(days=7)


class WindowError(ValueError):
    """A reboot window, its length or its time zone cannot be parsed."""


def parse_length(text: str) -> timedelta:
    """Parse a Go-style duration made of h, m and s parts ("1h30m", "90m", "1.5h")."""
    raw = text.strip()
    position = 0
    seconds = 0.0
    for match in _LENGTH_PART_RE.finditer(raw):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _LENGTH_UNITS[match.group(2)]
        position = match.end()
    if not raw or position != len(raw):
        raise WindowError(
            f"reboot window length {text!r} is not a duration like '1h', '90m' or '1h30m'"
        )
    return timedelta(seconds=seconds)


def parse_zone(name: str) -> ZoneInfo:
    """Load an IANA time zone ("UTC", "Europe/Berlin")."""
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise WindowError(f"time zone {name!r} is not a known IANA time zone name") from err


@dataclass(frozen=True)
class Window:
    """One repeating window: weekly on ``weekday`` (0 = Monday) or daily when None."""

    weekday: int | None
    start: time
    length: timedelta

    def __post_init__(self) -> None:
        if self.weekday is not None and not 0 <= self.weekday <= 6:
            raise WindowError(f"weekday must be 0 (Monday) to 6 (Sunday), not {self.weekday}")
        period = DAY if self.weekday is None else WEEK
        if not timedelta(0) < self.length < period:
            raise WindowError(
                f"reboot window {self}: the length must be positive and shorter than "
                f"{'a day' if self.weekday is None else 'a week'}"
            )

    @classmethod
    def parse(cls, start: str, length: str) -> Window:
        """Parse CLUO's pair of flags: ``--reboot-window-start``, ``--reboot-window-length``."""
        fields = start.split()
        if len(fields) == 2:
            day_text, time_text = fields
            weekday = _DAYS.get(day_text.lower())
            if weekday is None:
                raise WindowError(
                    f"reboot window start {start!r}: {day_text!r} is not a day name "
                    f"(Mon, Tue, Wed, Thu, Fri, Sat, Sun)"
                )
        elif len(fields) == 1:
            weekday, time_text = None, fields[0]
        else:
            raise WindowError(
                f"reboot window start {start!r} is not '[DAY] HH:MM' (e.g. 'Mon 14:00')"
            )
        match = _TIME_RE.match(time_text)
        if not match:
            raise WindowError(f"reboot window start {start!r}: {time_text!r} is not HH:MM")
        hour, minute = int(match.group(1)), int(match.group(2))
        if hour > 23 or minute > 59:
            raise WindowError(
                f"reboot window start {start!r}: hour must be 0-23 and minute 0-59"
            )
        window_length = parse_length(length)
        period_name = "a day" if weekday is None else "a week"
        if window_length <= timedelta(0) or window_length >= (DAY if weekday is None else WEEK):
            raise WindowError(
                f"reboot window {start!r} with length {length!r}: the length must be "
                f"positive and shorter than {period_name}"
            )
        return cls(weekday=weekday, start=time(hour, minute), length=window_length)

    def __str__(self) -> str:
        day = "" if self.weekday is None else _DAY_NAMES[self.weekday] + " "
        return f"{day}{self.start:%H:%M} +{self.length}"

    def occurrences(
        self, zone: tzinfo, first_day: date, days: int
    ) -> list[tuple[datetime, datetime]]:
        """The (start, end) instants, in UTC, of the occurrences starting on these local days."""
        found: list[tuple[datetime, datetime]] = []
        for offset in range(days):
            day = first_day + timedelta(days=offset)
            if self.weekday is not None and day.weekday() != self.weekday:
                continue
            start = datetime.combine(day, self.start, tzinfo=zone).astimezone(UTC)
            found.append((start, start + self.length))
        return found


@dataclass(frozen=True)
class RebootWindows:
    """Several windows in one time zone. No window means always open."""

    windows: tuple[Window, ...] = ()
    zone: tzinfo = UTC

    @property
    def always_open(self) -> bool:
        return not self.windows

    def is_open(self, now: datetime) -> bool:
        """Whether a new reboot slot may be handed out at ``now`` (an aware datetime)."""
        _require_aware(now)
        if self.always_open:
            return True
        return any(start <= now < end for start, end in self._around(now))

    def next_change(self, now: datetime) -> datetime | None:
        """The first instant after ``now`` at which ``is_open`` changes; None if it never does."""
        _require_aware(now)
        if self.always_open:
            return None
        open_now = self.is_open(now)
        boundaries = sorted({b for pair in self._around(now) for b in pair if b > now})
        for boundary in boundaries:
            if self.is_open(boundary) != open_now:
                return boundary
        return None

    def _around(self, now: datetime) -> list[tuple[datetime, datetime]]:
        # A window is shorter than a week, so every occurrence that is open at ``now`` started
        # at most 8 local days earlier (one extra day absorbs UTC offsets), and the next
        # change is at most 8 days ahead.
        today = now.astimezone(self.zone).date()
        first_day = today - timedelta(days=8)
        return [
            pair
            for window in self.windows
            for pair in window.occurrences(self.zone, first_day, days=17)
        ]

    def __str__(self) -> str:
        if self.always_open:
            return "always"
        return ", ".join(str(window) for window in self.windows) + f" ({self.zone})"


def parse_windows(spec: str, zone: str = "UTC") -> RebootWindows:
    """Parse ``"Mon 14:00 1h, Sat 02:00 1h30m"`` in the IANA zone ``zone``.

    An empty or blank ``spec`` means no restriction (always open).
    """
    tz = parse_zone(zone)
    windows = []
    for entry in re.split(r"[,;]", spec):
        if not entry.strip():
            continue
        fields = entry.split()
        if len(fields) not in (2, 3):
            raise WindowError(
                f"reboot window {entry.strip()!r} is not '[DAY] HH:MM LENGTH' "
                f"(e.g. 'Mon 14:00 1h' or '03:00 90m')"
            )
        windows.append(Window.parse(" ".join(fields[:-1]), fields[-1]))
    return RebootWindows(windows=tuple(windows), zone=tz)


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be a timezone-aware datetime, got naive {now!r}")
