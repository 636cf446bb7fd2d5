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
  usage and argparse's message), which the entry point prints and returns as its status;
- another program's spelling of a setting (FLUO's ``-reboot-window-start``, CLUO's
  ``UPDATE_AGENT_NODE``: an `Alias`) is read as the setting itself, at its level (a flag
  beside the flag, a variable beside the program's variable), with the setting's parser,
  errors naming the spelling given; two spellings of one setting at one level that
  disagree are an error, and each alias read is reported (`Values.aliases_used`) so the
  program can log the cluo spelling once. Another program's flag or variable that cluo
  does not take (a `Refusal`) stops the start with its reason: none is ignored.

Value parsers (`parse_duration`, `parse_boolean`, `positive_int`, ...) raise ``ValueError``
with a reason that does not repeat the value; the loader puts the source and the value
in front of it.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
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


def as_timedelta(parse: Callable[[str], float]) -> Callable[[str], timedelta]:
    """``parse`` (a duration parser into seconds) giving a timedelta; a duration too long
    for one is refused as bad input."""

    def parse_timedelta(text: str) -> timedelta:
        seconds = parse(text)
        try:
            return timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError("too long a duration") from None

    return parse_timedelta


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
    declare none). A ``repeated`` flag may be given more than once: its parser gets the
    values one a line, as its variable is written.
    """

    flag: str
    parse: Callable[[str], T]
    help: str
    default: str | Callable[[], str] = ""
    also_from: tuple[str, ...] = ()
    default_source: str | None = None
    switch: bool = False
    repeated: bool = False

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


@dataclass(frozen=True)
class Alias:
    """Another program's spelling of ``setting``: a flag (``-node``) or an environment
    variable (``UPDATE_AGENT_NODE``), read as the setting itself."""

    spelling: str
    setting: Setting[Any]

    @property
    def is_flag(self) -> bool:
        return self.spelling.startswith("-")


@dataclass(frozen=True)
class Refusal:
    """Another program's flag or variable that has no equivalent here, and why: given,
    it stops the start, so that a setting the user relied on is never silently lost."""

    spelling: str
    reason: str

    @property
    def is_flag(self) -> bool:
        return self.spelling.startswith("-")


@dataclass(frozen=True)
class AliasUse:
    """An alias that was read: what the user wrote and the spelling cluo would use."""

    given: str
    cluo: str


# The logging flags that klog (FLUO) and glog (CLUO) add to a Go program's command line.
KLOG_FLAGS = ("v", "vmodule", "logtostderr", "alsologtostderr", "stderrthreshold", "log_dir",
              "log_file", "log_file_max_size", "log_backtrace_at", "add_dir_header",
              "skip_headers", "skip_log_headers", "one_output")


def go_spellings(name: str, env_prefix: str) -> tuple[str, ...]:
    """How a Go program takes its flag ``name``: ``-name`` or ``--name`` (Go's flag
    package reads both), and from the variable coreos/pkg flagutil's ``SetFlagsFromEnv``
    gives it: ``env_prefix`` + ``_`` + the name in upper case with ``_`` for ``-``."""
    return f"-{name}", f"--{name}", f"{env_prefix}_{name.upper().replace('-', '_')}"


def go_aliases(setting: Setting[Any], name: str, env_prefix: str) -> tuple[Alias, ...]:
    """The `go_spellings` of a Go program's flag ``name`` as aliases of ``setting``
    (without the one that is the setting's own flag)."""
    return tuple(Alias(spelling, setting) for spelling in go_spellings(name, env_prefix)
                 if spelling != setting.flag)


def go_refusals(names: Sequence[str], env_prefix: str, reason: str) -> tuple[Refusal, ...]:
    """The `go_spellings` of a Go program's flags ``names``, each refused for ``reason``."""
    return tuple(Refusal(spelling, reason) for name in names
                 for spelling in go_spellings(name, env_prefix))


def log_aliases_used(log: logging.Logger, used: Sequence[AliasUse]) -> None:
    """One info line per alias read, naming the cluo spelling to write instead."""
    for use in used:
        log.info("setting read from another program's spelling",
                 extra={"GIVEN": use.given, "CLUO_SPELLING": use.cluo})


class Values:
    """The loaded settings: ``values[SETTING]`` is the parsed value, with its source."""

    def __init__(self) -> None:
        self._parsed: dict[str, object] = {}
        self._raw: dict[str, str] = {}
        self._source: dict[str, str] = {}
        self._defaulted: set[str] = set()
        self._aliases_used: list[AliasUse] = []

    @property
    def aliases_used(self) -> tuple[AliasUse, ...]:
        """The aliases read, in the order of the settings."""
        return tuple(self._aliases_used)

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

    def _set_one_of(self, setting: Setting[Any], given: Sequence[tuple[str, str]],
                    aliases: Mapping[str, str]) -> None:
        """Set ``setting`` from one level's ``given`` (text, source) pairs, cluo's own
        spelling first; they must agree once parsed. ``aliases`` maps the sources that are
        aliases to cluo's spelling."""
        parsed = []
        for raw, source in given:
            self._set(setting, raw.strip(), source, defaulted=False)
            parsed.append((self[setting], raw.strip(), source))
        first_value, first_raw, first_source = parsed[0]
        for value, raw, source in parsed[1:]:
            if value != first_value:
                raise ConfigError(
                    f"{first_source} {first_raw!r} and {source} {raw!r} disagree: both set "
                    f"{setting.flag}; give one of them")
        self._set(setting, first_raw, first_source, defaulted=False)
        self._aliases_used.extend(AliasUse(source, aliases[source])
                                  for _, _, source in parsed if source in aliases)


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
    aliases: tuple[Alias, ...] = ()
    refused: tuple[Refusal, ...] = ()

    def variable(self, setting: Setting[Any]) -> str | None:
        """The environment twin of ``setting``, if it has one."""
        if setting.positional or not self.env_prefix:
            return None
        return self.env_prefix + setting.dest.upper()

    def flags(self) -> tuple[str, ...]:
        """Every flag (``--drain-timeout``), in declaration order."""
        return tuple(s.flag for s in self.settings if not s.positional)

    def parser(self) -> argparse.ArgumentParser:
        parser = _Parser(prog=self.prog, description=_fill(self.description), allow_abbrev=False,
                         epilog=_fill(self.epilog), add_help=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("-h", "-help", "--help", action=_Help, nargs=0,
                            help="show this help and exit")
        for setting in self.settings:
            if setting.positional:
                parser.add_argument(setting.dest, metavar=setting.dest.upper(),
                                    help=setting.help)
            elif setting.switch:
                parser.add_argument(setting.flag, dest=setting.dest, nargs="?", const="true",
                                    metavar="BOOL", help=setting.help)
            else:
                parser.add_argument(setting.flag, dest=setting.dest, help=setting.help,
                                    action="append" if setting.repeated else "store")
        for alias in self.aliases:
            if alias.is_flag:
                switch = alias.setting.switch
                parser.add_argument(alias.spelling, dest=_other_dest(alias.spelling),
                                    nargs="?" if switch else None,
                                    const="true" if switch else None, help=argparse.SUPPRESS)
        for refusal in self.refused:
            if refusal.is_flag:  # taken with or without a value, to be refused by name
                parser.add_argument(refusal.spelling, dest=_other_dest(refusal.spelling),
                                    nargs="?", const="", help=argparse.SUPPRESS)
        return parser

    def load(self, argv: Sequence[str], environ: Mapping[str, str]) -> Values:
        """Every setting, parsed; `ConfigError` for the first bad one in declaration order.

        Raises `CommandLineExit` for ``--help`` and for a bad command line, `ConfigError`
        first of all for a refused flag or variable."""
        given = {dest: "\n".join(value) if isinstance(value, list) else value
                 for dest, value in vars(self.parser().parse_args(list(argv))).items()}
        self._refuse(given, environ)
        values = Values()
        for setting in self.settings:
            aliases = [alias for alias in self.aliases if alias.setting is setting]
            own_flag = setting.dest.upper() if setting.positional else setting.flag
            flags = [(given[setting.dest], own_flag)] if given.get(setting.dest) is not None else []
            flags += [(given[_other_dest(alias.spelling)], alias.spelling) for alias in aliases
                      if alias.is_flag and given.get(_other_dest(alias.spelling)) is not None]
            if flags:
                values._set_one_of(setting, flags, {a.spelling: setting.flag for a in aliases})
                continue
            own_variable = self.variable(setting)
            names = [own_variable, *(alias.spelling for alias in aliases if not alias.is_flag)]
            variables = [(environ[name], name) for name in names
                         if name is not None and environ.get(name, "").strip()]
            if variables:
                values._set_one_of(setting, variables,
                                   {a.spelling: own_variable or setting.flag for a in aliases})
                continue
            for name in setting.also_from:
                if environ.get(name, "").strip():
                    values._set(setting, environ[name].strip(), name, defaulted=False)
                    break
            else:
                default = setting.default() if callable(setting.default) else setting.default
                source = setting.default_source or f"the default of {setting.flag}"
                values._set(setting, default.strip(), source, defaulted=True)
        return values

    def _refuse(self, given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
        """`ConfigError` for the first refused flag given, else the first refused variable
        set (an empty one is not set, as with every variable)."""
        for refusal in self.refused:
            if refusal.is_flag and given.get(_other_dest(refusal.spelling)) is not None:
                raise ConfigError(f"{refusal.spelling}: not supported: {refusal.reason}")
        for refusal in self.refused:
            value = environ.get(refusal.spelling, "")
            if not refusal.is_flag and value.strip():
                raise ConfigError(f"{refusal.spelling}={value.strip()!r}: not supported: "
                                  f"{refusal.reason}")


def _other_dest(spelling: str) -> str:
    """The argparse destination of an alias's or refusal's flag: apart from every setting's."""
    return "other:" + spelling


def _fill(text: str) -> str | None:
    """Each line of ``text`` wrapped as a paragraph, never inside a hyphenated word (flag
    and program names stay whole); leading spaces kept."""
    lines = (textwrap.fill(line, _HELP_WIDTH, break_on_hyphens=False,
                           subsequent_indent=" " * (len(line) - len(line.lstrip())))
             for line in text.splitlines())
    return "\n".join(lines) or None
