"""The settings loader both programs share (cluo/settings.py), on a small made-up program."""

from __future__ import annotations

import io
import logging

import pytest

from cluo.errors import ConfigError
from cluo.settings import (
    EXIT_HELP,
    EXIT_USAGE,
    Alias,
    AliasUse,
    CommandLineExit,
    Refusal,
    Setting,
    SettingsLoader,
    Values,
    boolean,
    choice,
    go_aliases,
    go_refusals,
    go_spellings,
    log_aliases_used,
    parse_boolean,
    parse_duration,
    positive_duration,
    positive_int,
    verbatim,
)

NAME = Setting("--name", verbatim, "a name", default="from-default",
               also_from=("FALLBACK_NAME", "OTHER_NAME"))
TIMEOUT = Setting("--timeout", positive_duration, "a timeout", default="10m")
COLOUR = Setting("--colour", choice("red", "green"), "a colour", default="red")
COUNT = Setting("--count", positive_int, "a count", default="1", also_from=("LEGACY_COUNT",))
LOUD = boolean("--loud", "a switch")
TOY = SettingsLoader(prog="toy", env_prefix="TOY_", description="A toy program.",
                     settings=(NAME, TIMEOUT, COLOUR, COUNT, LOUD))


def load(argv: list[str], env: dict[str, str] | None = None) -> Values:
    return TOY.load(argv, env or {})


# TOY that also takes a Go program's spellings (prefix GOTOY): -label for --name, -timeout
# for --timeout, -color for --colour, -verbose for --loud; it refuses -version and -log_dir.
GO = SettingsLoader(
    prog="toy", env_prefix="TOY_", settings=(NAME, TIMEOUT, COLOUR, COUNT, LOUD),
    aliases=(*go_aliases(NAME, "label", "GOTOY"), *go_aliases(TIMEOUT, "timeout", "GOTOY"),
             *go_aliases(COLOUR, "color", "GOTOY"), *go_aliases(LOUD, "verbose", "GOTOY")),
    refused=go_refusals(("version", "log_dir"), "GOTOY", "no such thing here"),
)


def load_go(argv: list[str], env: dict[str, str] | None = None) -> Values:
    return GO.load(argv, env or {})


# -- where a value comes from ----------------------------------------------------------------

# (argv, environment, the value of --name, its source)
PRECEDENCE = [
    ([], {}, "from-default", "the default of --name"),
    ([], {"FALLBACK_NAME": "f"}, "f", "FALLBACK_NAME"),
    ([], {"OTHER_NAME": "o"}, "o", "OTHER_NAME"),
    ([], {"FALLBACK_NAME": "f", "OTHER_NAME": "o"}, "f", "FALLBACK_NAME"),
    ([], {"TOY_NAME": "t", "FALLBACK_NAME": "f"}, "t", "TOY_NAME"),
    (["--name", "flag"], {"TOY_NAME": "t", "FALLBACK_NAME": "f"}, "flag", "--name"),
    (["--name=flag"], {"TOY_NAME": "t"}, "flag", "--name"),
    # An empty or blank variable is not set: the next source decides.
    ([], {"TOY_NAME": "", "FALLBACK_NAME": "f"}, "f", "FALLBACK_NAME"),
    ([], {"TOY_NAME": "  ", "FALLBACK_NAME": "", "OTHER_NAME": ""}, "from-default",
     "the default of --name"),
    # An empty flag value is a value; the parser decides what it means.
    (["--name", ""], {"TOY_NAME": "t"}, "", "--name"),
    # Surrounding whitespace is not part of the value.
    (["--name", " padded "], {}, "padded", "--name"),
    ([], {"TOY_NAME": "\tpadded\n"}, "padded", "TOY_NAME"),
    # An alias is read at its setting's level: a flag beside the flag (in either Go
    # spelling), a variable beside the program's variable, before the further ones.
    (["-label", "flag"], {"TOY_NAME": "t", "GOTOY_LABEL": "g"}, "flag", "-label"),
    (["--label=flag"], {}, "flag", "--label"),
    ([], {"GOTOY_LABEL": "g", "FALLBACK_NAME": "f"}, "g", "GOTOY_LABEL"),
    (["--name", "flag"], {"GOTOY_LABEL": "g"}, "flag", "--name"),
    # Both spellings at one level, agreeing: cluo's spelling is the source.
    (["-label", "x", "--name", " x "], {}, "x", "--name"),
    ([], {"TOY_NAME": "t", "GOTOY_LABEL": "t"}, "t", "TOY_NAME"),
    # An empty alias variable is not set, like any other.
    ([], {"GOTOY_LABEL": " ", "FALLBACK_NAME": "f"}, "f", "FALLBACK_NAME"),
]


@pytest.mark.parametrize(("argv", "env", "value", "source"), PRECEDENCE)
def test_flag_beats_own_variable_beats_further_variables_beats_default(
    argv: list[str], env: dict[str, str], value: str, source: str
) -> None:
    values = load_go(argv, env)  # GO is TOY with aliases: TOY's rules are GO's
    assert values[NAME] == value
    assert values.source(NAME) == source
    assert values.from_default(NAME) == (source == "the default of --name")


def test_the_environment_twin_is_the_prefix_and_the_flag_in_upper_case() -> None:
    assert TOY.variable(TIMEOUT) == "TOY_TIMEOUT"
    assert load([], {"TOY_TIMEOUT": "90s"})[TIMEOUT] == 90.0


def test_a_default_may_be_computed_and_is_parsed_like_a_given_value() -> None:
    computed = Setting("--when", positive_duration, "", default=lambda: "2m")
    assert SettingsLoader("p", "P_", (computed,)).load([], {})[computed] == 120.0


def test_a_positional_argument_has_no_environment_twin() -> None:
    node = Setting("node", verbatim, "a node")
    loader = SettingsLoader("p", "P_", (node, NAME))
    assert loader.variable(node) is None
    assert loader.flags() == ("--name",)
    values = loader.load(["n1"], {"P_NODE": "from-env"})
    assert (values[node], values.source(node)) == ("n1", "NODE")
    with pytest.raises(CommandLineExit) as done:
        loader.load([], {"P_NODE": "from-env"})
    assert done.value.status == EXIT_USAGE
    assert "NODE" in done.value.output


# -- booleans -----------------------------------------------------------------------------

BOOLEANS = [
    *((text, True) for text in ("true", "TRUE", "True", "yes", "YES", "on", "On", "1")),
    *((text, False) for text in ("false", "FALSE", "no", "No", "off", "OFF", "0")),
]


@pytest.mark.parametrize(("text", "value"), BOOLEANS)
def test_booleans_read_every_usual_spelling_in_any_case(text: str, value: bool) -> None:
    assert parse_boolean(text) is value
    assert load([f"--loud={text}"])[LOUD] is value
    assert load([], {"TOY_LOUD": text})[LOUD] is value


@pytest.mark.parametrize("text", ["maybe", "2", "y", "t", "enabled", "tru e"])
def test_anything_else_is_not_a_boolean(text: str) -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        parse_boolean(text)


def test_a_boolean_flag_alone_means_true_and_may_take_a_value() -> None:
    assert load([])[LOUD] is False
    assert load(["--loud"])[LOUD] is True
    assert load(["--loud", "no"])[LOUD] is False
    assert load(["--loud", "--name", "x"])[LOUD] is True
    assert load(["--loud=off"], {"TOY_LOUD": "on"})[LOUD] is False
    assert load([], {"TOY_LOUD": ""})[LOUD] is False  # empty: not set, the default


# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0),
    ("0", 0.0),
    ("90s", 90.0),
    ("1.5s", 1.5),
    ("10m", 600.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("1h30m15s", 5415.0),
    ("2m30s", 150.0),
    (" 45s ", 45.0),
])
def test_durations_are_seconds_or_go_style(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "reason"), [
    ("", "not a duration"),
    ("s", "not a duration"),
    ("h", "not a duration"),
    ("10x", "not a duration"),
    ("1m30", "not a duration"),
    ("10ms", "not a duration"),
    ("ten", "not a duration"),
    ("1d", "not a duration"),
    ("-5s", "not a duration"),
    ("-5", "negative"),
    ("inf", "not a finite duration"),
    ("nan", "not a finite duration"),
])
def test_what_is_not_a_duration_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "0m0s"])
def test_a_positive_duration_is_not_zero(text: str) -> None:
    with pytest.raises(ValueError, match="must be a positive duration"):
        positive_duration(text)


# -- errors name their source and the value ------------------------------------------------

# (argv, environment, the start of the error)
ERRORS = [
    (["--timeout", "soon"], {}, "--timeout: 'soon': not a duration (examples: 30s, 10m, 1h30m)"),
    ([], {"TOY_TIMEOUT": "soon"}, "TOY_TIMEOUT: 'soon': not a duration"),
    (["--timeout=0s"], {"TOY_TIMEOUT": "1m"}, "--timeout: '0s': must be a positive duration"),
    ([], {"TOY_COLOUR": "blue"}, "TOY_COLOUR: 'blue': not one of red, green"),
    (["--count", "0"], {}, "--count: '0': must be at least 1"),
    ([], {"LEGACY_COUNT": "zero"}, "LEGACY_COUNT: 'zero': not a whole number"),
    ([], {"TOY_LOUD": "maybe"}, "TOY_LOUD: 'maybe': not a boolean"),
    (["--loud", "maybe"], {}, "--loud: 'maybe': not a boolean"),
]


# The same for another program's spellings (GO's aliases and refusals).
ALIAS_ERRORS = [
    # An alias's bad value, named by the spelling given.
    (["-timeout", "soon"], {}, "-timeout: 'soon': not a duration"),
    ([], {"GOTOY_TIMEOUT": "0s"}, "GOTOY_TIMEOUT: '0s': must be a positive duration"),
    ([], {"GOTOY_COLOR": "blue"}, "GOTOY_COLOR: 'blue': not one of red, green"),
    (["-verbose=maybe"], {}, "-verbose: 'maybe': not a boolean"),
    # Two spellings of one setting at one level that disagree.
    (["--timeout", "90s", "-timeout", "5s"], {},
     "--timeout '90s' and -timeout '5s' disagree: both set --timeout; give one of them"),
    ([], {"TOY_COLOUR": "red", "GOTOY_COLOR": "green"},
     "TOY_COLOUR 'red' and GOTOY_COLOR 'green' disagree"),
    (["--timeout", "90s", "-timeout", "91"], {}, "--timeout '90s' and -timeout '91' disagree"),
    (["-timeout", "90s", "--timeout=5s"], {}, "--timeout '5s' and -timeout '90s' disagree"),
    # A refused flag or variable, with or without a value, before any value is read.
    (["-version"], {}, "-version: not supported: no such thing here"),
    (["--version"], {}, "--version: not supported: no such thing here"),
    (["-log_dir", "/var/log"], {}, "-log_dir: not supported"),
    (["-log_dir=/var/log"], {}, "-log_dir: not supported"),
    (["-timeout", "soon", "-version"], {}, "-version: not supported"),
    ([], {"GOTOY_LOG_DIR": "/var/log", "TOY_COUNT": "zero"},
     "GOTOY_LOG_DIR='/var/log': not supported: no such thing here"),
]


@pytest.mark.parametrize(("argv", "env", "message"), ERRORS + ALIAS_ERRORS)
def test_a_bad_value_is_a_config_error_naming_its_source_and_the_value(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_go(argv, env)  # GO is TOY with aliases: TOY's errors are GO's
    assert str(caught.value).startswith(message)


def test_a_bad_default_names_where_the_default_came_from() -> None:
    plain = Setting("--limit", positive_int, "", default="none")
    described = Setting("--host", positive_int, "", default=lambda: "h",
                        default_source="the hostname")
    with pytest.raises(ConfigError, match=r"^the default of --limit: 'none': not a whole"):
        SettingsLoader("p", "P_", (plain,)).load([], {})
    with pytest.raises(ConfigError, match=r"^the hostname: 'h': not a whole number"):
        SettingsLoader("p", "P_", (described,)).load([], {})


def test_choices_are_read_in_any_case() -> None:
    assert load([], {"TOY_COLOUR": "GREEN"})[COLOUR] == "green"


def test_errors_across_settings_name_each_source() -> None:
    values = load(["--timeout", "5m"], {"TOY_COUNT": "3"})
    assert values.describe(TIMEOUT) == "--timeout '5m'"
    assert values.describe(COUNT) == "TOY_COUNT '3'"
    assert str(values.error(COUNT, "too many")) == "TOY_COUNT: '3': too many"


# -- argparse's own endings -----------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h", "-help"])  # -help: Go's spelling
def test_help_ends_the_run_with_status_0_and_the_help_for_stdout(flag: str) -> None:
    with pytest.raises(CommandLineExit) as done:
        load(["--timeout", "soon", flag], {"TOY_COUNT": "bad"})  # no value is read
    assert done.value.status == EXIT_HELP == 0
    assert done.value.output.startswith("usage: toy")
    assert "A toy program." in done.value.output
    for flag_name in TOY.flags():
        assert flag_name in done.value.output
    stdout, stderr = io.StringIO(), io.StringIO()
    assert done.value.show(stdout, stderr) == 0
    assert stdout.getvalue() == done.value.output
    assert stderr.getvalue() == ""


@pytest.mark.parametrize(("argv", "named"), [
    (["--bogus"], "--bogus"),
    (["--name", "x", "stray"], "stray"),
    (["--timeout"], "--timeout"),
    (["--nam", "x"], "--nam"),  # an abbreviation is not the flag: a typo is named, not guessed
])
def test_a_bad_command_line_ends_the_run_with_status_2_naming_the_flag(
    argv: list[str], named: str
) -> None:
    with pytest.raises(CommandLineExit) as done:
        load(argv)
    assert done.value.status == EXIT_USAGE == 2
    assert done.value.output.startswith("usage: toy")
    assert "toy: error: " in done.value.output
    assert named in done.value.output.splitlines()[-1]
    stdout, stderr = io.StringIO(), io.StringIO()
    assert done.value.show(stdout, stderr) == 2
    assert (stdout.getvalue(), stderr.getvalue()) == ("", done.value.output)


# -- another program's spellings: aliases and refusals ---------------------------------------

def test_go_spells_a_flag_with_one_or_two_dashes_and_its_variable_in_upper_case() -> None:
    assert go_spellings("reboot-window-start", "UPDATE_OPERATOR") == (
        "-reboot-window-start", "--reboot-window-start", "UPDATE_OPERATOR_REBOOT_WINDOW_START")
    assert go_spellings("log_dir", "UPDATE_AGENT")[2] == "UPDATE_AGENT_LOG_DIR"
    # The spelling that is the setting's own flag is no alias of it.
    assert [a.spelling for a in go_aliases(TIMEOUT, "timeout", "GOTOY")] == [
        "-timeout", "GOTOY_TIMEOUT"]


def test_spellings_that_agree_once_parsed_agree() -> None:
    values = load_go(["--timeout", "90s", "-timeout", "90"], {"GOTOY_TIMEOUT": "5s"})
    assert (values[TIMEOUT], values.source(TIMEOUT)) == (90.0, "--timeout")
    assert values.aliases_used == (AliasUse("-timeout", "--timeout"),)


def test_an_alias_of_a_switch_is_a_switch() -> None:
    assert load_go(["-verbose"])[LOUD] is True
    assert load_go(["-verbose=false"])[LOUD] is False
    assert load_go([], {"GOTOY_VERBOSE": "true"})[LOUD] is True


def test_each_alias_read_is_reported_with_cluos_spelling() -> None:
    values = load_go(["-timeout", "90s", "--verbose"], {"GOTOY_COLOR": "green"})
    assert values.aliases_used == (
        AliasUse("-timeout", "--timeout"), AliasUse("GOTOY_COLOR", "TOY_COLOUR"),
        AliasUse("--verbose", "--loud"))
    assert load_go(["--timeout", "90s"], {"GOTOY_TIMEOUT": "5s"}).aliases_used == ()


def test_the_aliases_read_are_logged_once_each_naming_cluos_spelling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("toy")
    with caplog.at_level(logging.INFO, logger="toy"):
        log_aliases_used(log, load_go(["-timeout", "90s"], {"GOTOY_COLOR": "green"})
                         .aliases_used)
    assert [(r.levelno, vars(r)["GIVEN"], vars(r)["CLUO_SPELLING"]) for r in caplog.records] == [
        (logging.INFO, "-timeout", "--timeout"), (logging.INFO, "GOTOY_COLOR", "TOY_COLOUR")]




def test_an_empty_refused_variable_is_not_set() -> None:
    assert load_go([], {"GOTOY_VERSION": ""})[TIMEOUT] == 600.0


def test_aliases_and_refusals_stay_out_of_the_help() -> None:
    with pytest.raises(CommandLineExit) as done:
        load_go(["--help"])
    words = done.value.output.replace("[", " ").replace("]", " ").split()
    assert "--timeout" in words
    for hidden in ("-timeout", "-verbose", "--verbose", "-color", "-version", "-log_dir"):
        assert hidden not in words


def test_an_alias_or_refusal_is_known_by_its_kind() -> None:
    assert Alias("-node", NAME).is_flag and not Alias("UPDATE_AGENT_NODE", NAME).is_flag
    assert Refusal("--v", "").is_flag and not Refusal("UPDATE_AGENT_V", "").is_flag


def test_a_repeated_flag_gives_its_parser_every_value_one_a_line() -> None:
    tags = Setting("--tag", lambda text: tuple(text.splitlines()), "tags", repeated=True)
    toy = SettingsLoader(prog="toy", env_prefix="TOY_", settings=(tags,))
    assert toy.load(["--tag", "a b", "--tag=c"], {"TOY_TAG": "x"})[tags] == ("a b", "c")
    assert toy.load([], {"TOY_TAG": "x\ny"})[tags] == ("x", "y")
    assert toy.load([], {})[tags] == ()
