"""One settings loader for both programs: a flag, else the environment, else the default.

A program declares each of its settings once (`Setting`: the flag, how a value is parsed,
its default, its help text, further environment variables it may come from) and loads
them all with `SettingsLoader.load(argv, environ)`. The rules, the same for cluo-agent
and cluo-coord:

- a flag on the command line beats the program's variable (``--drain-timeout`` has the
  twin ``CLUO_AGENT_DRAIN_TIMEOUT``), which beats the setting's further variables (the
  coordinator's ``--namespace`` also reads ``POD_NAMESPACE``), which beat the default;
- an empty or blank variable counts as not set, so ``CLUO_AGENT_DRAIN_TIMEOUT=`` in an
  environment file means the default. A flag given an empty value (``--metrics-address=``)
  is a value: its parser decides what it means;
- values are read without their surrounding whitespace;
- a boolean is ``true``/``false``, ``yes``/``no``, ``on``/``off`` or ``1``/``0``, in any
  case; a boolean flag given alone (``--pause``) means ``true``;
- a bad value is a ``ConfigError`` naming where it came from and the value:
  ``CLUO_AGENT_DRAIN_TIMEOUT: 'ten minutes': not a duration (examples: 30s, 10m, 1h30m)``;
- argparse's own endings are not errors of ours and exit nothing here: ``--help`` and a
  bad or unknown flag raise `CommandLineExit` (status 0 with the help, status 2 with the
  usage and argparse's message), which the entry point prints and returns as its status.

Value parsers (`parse_duration`, `parse_boolean`, `positive_int`, ...) raise ``ValueError``
with a reason that does not repeat the value; the loader puts the source and the value
in front of it.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TextIO, TypeVar, cast

from cluo.errors import ConfigError

T = TypeVar("T")

EXIT_HELP = 0
EXIT_USAGE = 2  # argparse's status for a bad command line, and cluo's for bad settings

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")
_HELP_WIDTH = 78
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


# --- value parsers ---------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "10m", "1h30m" or "1.5s": finite, not negative."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.match(value)
        if not value or match is None or not any(match.groups()):
            raise ValueError("not a duration (examples: 30s, 10m, 1h30m)") from None
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not math.isfinite(seconds):
        raise ValueError("not a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def positive_duration(text: str) -> float:
    """A duration (`parse_duration`) above zero."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    return seconds


def parse_boolean(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0, in any case."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("not a boolean (true/false, yes/no, on/off, 1/0)")


def positive_int(text: str) -> int:
    """A whole number, at least 1."""
    try:
        number = int(text.strip())
    except ValueError:
        raise ValueError("not a whole number") from None
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def choice(*allowed: str) -> Callable[[str], str]:
    """A parser that accepts one of ``allowed`` (lowercase), in any case."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"not one of {', '.join(allowed)}")
        return value

    return parse


def verbatim(value: str) -> str:
    """Any text, as it is."""
    return value


def optional_text(value: str) -> str | None:
    """Any text; empty means none."""
    return value or None


# --- declarations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting: its flag (or a positional argument's name), parser, default and help.

    ``default`` is text, parsed like a given value, or a function that returns it (the
    hostname). ``also_from`` names environment variables read after the program's own
    twin, in order. ``default_source`` is how errors name a bad default ("the hostname").
    A ``switch`` is a boolean flag that may be given alone, meaning true (so it would take
    a positional argument that follows it as its value: programs with positional arguments
    declare none).
    """

    flag: str
    parse: Callable[[str], T]
    help: str
    default: str | Callable[[], str] = ""
    also_from: tuple[str, ...] = ()
    default_source: str | None = None
    switch: bool = False

    @property
    def positional(self) -> bool:
        return not self.flag.startswith("--")

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def boolean(flag: str, help: str, *, default: bool = False) -> Setting[bool]:
    """A boolean flag: ``--pause``, ``--pause=true``, ``--pause no``, ..."""
    return Setting(flag, parse_boolean, help, default="true" if default else "false",
                   switch=True)


class CommandLineExit(Exception):
    """argparse ended the run: ``--help`` (status 0) or a bad command line (status 2).

    ``output`` is what argparse would have printed: the help for stdout, or the usage and
    the error (naming the flag) for stderr.
    """

    def __init__(self, status: int, output: str) -> None:
        super().__init__(output.strip())
        self.status = status
        self.output = output

    def show(self, stdout: TextIO, stderr: TextIO) -> int:
        """Print the output where argparse would have, and return the exit status."""
        (stdout if self.status == EXIT_HELP else stderr).write(self.output)
        return self.status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises `CommandLineExit` where argparse would exit."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineExit(EXIT_USAGE, f"{self.format_usage()}{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise CommandLineExit(status, message or "")


class _Help(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        raise CommandLineExit(EXIT_HELP, parser.format_help())


class Values:
    """The loaded settings: ``values[SETTING]`` is the parsed value, with its source."""

    def __init__(self) -> None:
        self._parsed: dict[str, object] = {}
        self._raw: dict[str, str] = {}
        self._source: dict[str, str] = {}
        self._defaulted: set[str] = set()

    def __getitem__(self, setting: Setting[T]) -> T:
        return cast(T, self._parsed[setting.flag])

    def source(self, setting: Setting[Any]) -> str:
        """``--flag``, a variable's name, or the default's description."""
        return self._source[setting.flag]

    def raw(self, setting: Setting[Any]) -> str:
        """The text the value was parsed from."""
        return self._raw[setting.flag]

    def from_default(self, setting: Setting[Any]) -> bool:
        return setting.flag in self._defaulted

    def describe(self, setting: Setting[Any]) -> str:
        """``--reboot-retry-max '10m'``: the source and the value, for errors about two."""
        return f"{self.source(setting)} {self.raw(setting)!r}"

    def error(self, setting: Setting[Any], reason: str) -> ConfigError:
        """The error for a bad value found after parsing (a check across settings)."""
        return ConfigError(f"{self.source(setting)}: {self.raw(setting)!r}: {reason}")

    def _set(self, setting: Setting[Any], raw: str, source: str, *, defaulted: bool) -> None:
        self._raw[setting.flag] = raw
        self._source[setting.flag] = source
        if defaulted:
            self._defaulted.add(setting.flag)
        try:
            self._parsed[setting.flag] = setting.parse(raw)
        except ValueError as err:
            raise self.error(setting, str(err)) from None


@dataclass(frozen=True)
class SettingsLoader:
    """A program's settings, its command line and their environment twins.

    The twin of ``--drain-timeout`` is ``env_prefix + "DRAIN_TIMEOUT"``; an empty prefix
    means no twins. Positional arguments have none.
    """

    prog: str
    env_prefix: str
    settings: tuple[Setting[Any], ...]
    description: str = ""
    epilog: str = ""

    def variable(self, setting: Setting[Any]) -> str | None:
        """The environment twin of ``setting``, if it has one."""
        if setting.positional or not self.env_prefix:
            return None
        return self.env_prefix + setting.dest.upper()

    def flags(self) -> tuple[str, ...]:
        """Every flag (``--drain-timeout``), in declaration order."""
        return tuple(s.flag for s in self.settings if not s.positional)

    def parser(self) -> argparse.ArgumentParser:
        parser = _Parser(prog=self.prog, description=_fill(self.description),
                         epilog=_fill(self.epilog), add_help=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("-h", "--help", action=_Help, nargs=0,
                            help="show this help and exit")
        for setting in self.settings:
            if setting.positional:
                parser.add_argument(setting.dest, metavar=setting.dest.upper(),
                                    help=setting.help)
            elif setting.switch:
                parser.add_argument(setting.flag, dest=setting.dest, nargs="?", const="true",
                                    metavar="BOOL", help=setting.help)
            else:
                parser.add_argument(setting.flag, dest=setting.dest, help=setting.help)
        return parser

    def load(self, argv: Sequence[str], environ: Mapping[str, str]) -> Values:
        """Every setting, parsed; `ConfigError` for the first bad one in declaration order.

        Raises `CommandLineExit` for ``--help`` and for a bad command line."""
        given = vars(self.parser().parse_args(list(argv)))
        values = Values()
        for setting in self.settings:
            flag_value = given.get(setting.dest)
            if flag_value is not None:
                source = setting.dest.upper() if setting.positional else setting.flag
                values._set(setting, flag_value.strip(), source, defaulted=False)
                continue
            for name in (self.variable(setting), *setting.also_from):
                if name is not None and environ.get(name, "").strip():
                    values._set(setting, environ[name].strip(), name, defaulted=False)
                    break
            else:
                default = setting.default() if callable(setting.default) else setting.default
                source = setting.default_source or f"the default of {setting.flag}"
                values._set(setting, default.strip(), source, defaulted=True)
        return values


def _fill(text: str) -> str | None:
    """Each line of ``text`` wrapped as a paragraph, never inside a hyphenated word (flag
    and program names stay whole); leading spaces kept."""
    lines = (textwrap.fill(line, _HELP_WIDTH, break_on_hyphens=False,
                           subsequent_indent=" " * (len(line) - len(line.lstrip())))
             for line in text.splitlines())
    return "\n".join(lines) or None
