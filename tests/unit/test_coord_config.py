"""cluo-coord's flags and CLUO_COORD_* environment."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from cluo.errors import ConfigError
from cluo.protocol import FLUO_PREFIX
from cluo_coord.config import load_admin_settings, load_settings
from cluo_coord.main import main
from tests.fixtures import fluo_examples


def test_defaults_match_cluo_and_the_deployment() -> None:
    settings = load_settings([], {"POD_NAMESPACE": "ops", "POD_NAME": "coord-abc",
                                  "NODE_NAME": "n1"})
    policy = settings.policy
    assert settings.kubeconfig is None  # in-cluster
    assert settings.namespace == "ops"
    assert settings.identity == "coord-abc"
    assert settings.node_name == "n1"
    assert (settings.metrics_host, settings.metrics_port) == ("", 8080)
    assert settings.leader_elect is False  # deploy/ runs one replica
    assert policy.max_concurrent == 1
    assert policy.reboot_timeout == timedelta(hours=1)
    assert policy.min_ready == timedelta(0)
    assert policy.delay_between_reboots == timedelta(0)
    assert policy.paused is False
    assert policy.windows.always_open
    assert policy.drain_backoff == timedelta(minutes=10)
    assert policy.drain_backoff_max == timedelta(hours=2)
    assert policy.max_drain_attempts == 5
    assert settings.resync_period == 0  # never: the watches resume and re-list on 410


def test_drain_backoff_flags_are_read_and_a_base_over_its_maximum_is_refused() -> None:
    policy = load_settings(["--drain-backoff", "30s", "--drain-backoff-max", "5m",
                            "--max-drain-attempts", "2"], {}).policy
    assert (policy.drain_backoff, policy.drain_backoff_max, policy.max_drain_attempts) == (
        timedelta(seconds=30), timedelta(minutes=5), 2)
    with pytest.raises(ConfigError, match="--drain-backoff '3h': longer than "
                                          "the default of --drain-backoff-max '2h'"):
        load_settings(["--drain-backoff", "3h"], {})


def test_resync_period_0_means_never_and_a_period_keeps_the_safety_net() -> None:
    assert load_settings(["--resync-period", "0"], {}).resync_period == 0
    assert load_settings(["--resync-period", "10m"], {}).resync_period == 600
    with pytest.raises(ConfigError, match="at least 1s \\(or 0: never\\)"):
        load_settings(["--resync-period", "0.5s"], {})


def test_namespace_defaults_to_cluo_system_without_pod_namespace() -> None:
    assert load_settings([], {}).namespace == "cluo-system"


def test_flags_win_over_environment() -> None:
    settings = load_settings(
        ["--max-concurrent", "3"],
        {"CLUO_COORD_MAX_CONCURRENT": "2", "CLUO_COORD_REBOOT_TIMEOUT": "30m"},
    )
    assert settings.policy.max_concurrent == 3
    assert settings.policy.reboot_timeout == timedelta(minutes=30)


def test_every_policy_flag_is_read() -> None:
    settings = load_settings(
        [
            "--annotation-prefix", FLUO_PREFIX,
            "--before-reboot-annotations", "a.example.com/x, b.example.com/y",
            "--after-reboot-annotations", "c.example.com/z",
            "--min-ready", "30s", "--delay-between-reboots", "2m", "--pause", "true",
            "--node-selector", "pool=workers", "--metrics-address", "127.0.0.1:9000",
            "--leader-elect", "false", "--identity", "me", "--kubeconfig", "/k",
        ],
        {},
    )
    policy = settings.policy
    assert policy.keys.prefix == FLUO_PREFIX
    assert policy.before_reboot_annotations == ("a.example.com/x", "b.example.com/y")
    assert policy.after_reboot_annotations == ("c.example.com/z",)
    assert policy.min_ready == timedelta(seconds=30)
    assert policy.delay_between_reboots == timedelta(minutes=2)
    assert policy.paused is True
    assert settings.node_selector == "pool=workers"
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9000)
    assert settings.leader_elect is False
    assert settings.identity == "me"
    assert settings.kubeconfig == "/k"


def test_cluo_window_and_several_windows_combine_in_the_time_zone() -> None:
    settings = load_settings(
        ["--reboot-window-start", "Mon 14:00", "--reboot-window-length", "1h",
         "--reboot-windows", "Sat 02:00 1h30m", "--time-zone", "Europe/Berlin"],
        {},
    )
    windows = settings.policy.windows
    assert len(windows.windows) == 2
    # Monday 2026-11-23 14:30 in Berlin (CET, UTC+1) is 13:30 UTC.
    assert windows.is_open(datetime(2026, 11, 23, 13, 30, tzinfo=UTC))
    assert not windows.is_open(datetime(2026, 11, 23, 15, 30, tzinfo=UTC))
    assert windows.is_open(datetime(2026, 11, 28, 2, 0, tzinfo=UTC))


@pytest.mark.parametrize(
    ("argv", "environ", "names"),
    [
        (["--max-concurrent", "0"], {}, "--max-concurrent"),
        ([], {"CLUO_COORD_MAX_CONCURRENT": "two"}, "CLUO_COORD_MAX_CONCURRENT"),
        (["--reboot-timeout", "0s"], {}, "--reboot-timeout"),
        (["--reboot-timeout", "soon"], {}, "soon"),
        (["--min-ready=-5s"], {}, "--min-ready: '-5s'"),
        (["--reboot-window-start", "Mon 14:00"], {}, "--reboot-window-length"),
        (["--reboot-window-start", "Someday 14:00", "--reboot-window-length", "1h"], {},
         "Someday"),
        (["--reboot-windows", "Mon 25:00 1h"], {}, "--reboot-windows"),
        (["--time-zone", "Mars/Olympus"], {}, "Mars/Olympus"),
        (["--annotation-prefix", "not a prefix"], {}, "--annotation-prefix"),
        (["--before-reboot-annotations", "bad key!"], {}, "--before-reboot-annotations"),
        (["--pause", "maybe"], {}, "--pause"),
        (["--leader-elect", "perhaps"], {}, "--leader-elect: 'perhaps'"),
        ([], {"CLUO_COORD_LEADER_ELECT": "perhaps"}, "CLUO_COORD_LEADER_ELECT: 'perhaps'"),
        ([], {"POD_NAMESPACE": "Bad_NS"}, "POD_NAMESPACE: 'Bad_NS'"),
        (["--metrics-address", "8080"], {}, "--metrics-address"),
        (["--namespace", "Bad_NS"], {}, "Bad_NS"),
        (["--log-level", "loud"], {}, "--log-level"),
        # Durations too long for a timedelta are bad input, not a crash.
        (["--reboot-timeout", "1e20"], {}, "--reboot-timeout: '1e20': too long a duration"),
        (["--canary-group", "a", "--canary-soak", "1e20"], {},
         "--canary-soak: '1e20': too long a duration"),
        (["--blocker-interval", "1e20"], {}, "--blocker-interval: '1e20': too long a duration"),
        (["--blocker-interval", "0.5"], {}, "--blocker-interval: '0.5': must be at least 1s"),
        # FLUO's and CLUO's update-operator spellings: errors name the spelling given.
        # FLUO took a lone start or length as no window at all; cluo refuses it.
        (["-reboot-window-start", "Thu 23:00"], {},
         "-reboot-window-start 'Thu 23:00': --reboot-window-start and --reboot-window-length "
         "go together"),
        # Go durations below a second, and FLUO's zero-length window (never open).
        (["-reboot-window-start", "14:00", "-reboot-window-length", "1h500ms"], {},
         "-reboot-window-start '14:00', -reboot-window-length '1h500ms': reboot window length"),
        ([], {"UPDATE_OPERATOR_REBOOT_WINDOW_START": "14:00",
              "UPDATE_OPERATOR_REBOOT_WINDOW_LENGTH": "0s"},
         "UPDATE_OPERATOR_REBOOT_WINDOW_START '14:00', UPDATE_OPERATOR_REBOOT_WINDOW_LENGTH '0s'"),
        (["-reboot-window-start", "9:5", "-reboot-window-length", "1h"], {}, "'9:5' is not HH:MM"),
        (["-before-reboot-annotations", "bad key!"], {}, "-before-reboot-annotations: 'bad key!'"),
        (["--reboot-window-start", "Thu 23:00", "-reboot-window-start", "Fri 23:00"], {},
         "--reboot-window-start 'Thu 23:00' and -reboot-window-start 'Fri 23:00' disagree"),
        ([], {"CLUO_COORD_REBOOT_WINDOW_LENGTH": "1h",
              "UPDATE_OPERATOR_REBOOT_WINDOW_LENGTH": "2h"},
         "CLUO_COORD_REBOOT_WINDOW_LENGTH '1h' and UPDATE_OPERATOR_REBOOT_WINDOW_LENGTH '2h' "
         "disagree"),
    ],
)
def test_bad_values_name_the_flag_variable_and_value(
    argv: list[str], environ: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(argv, environ)
    assert names in str(err.value)


def test_bad_value_exits_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-concurrent", "-1"]) == 2
    assert "--max-concurrent" in capsys.readouterr().err


def test_empty_metrics_address_turns_the_server_off() -> None:
    assert load_settings(["--metrics-address", ""], {}).metrics_port == -1


def test_metrics_off_also_from_the_environment() -> None:
    assert load_settings(["--metrics-address", "off"], {}).metrics_port == -1
    assert load_settings([], {"CLUO_COORD_METRICS_ADDRESS": "OFF"}).metrics_port == -1


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("yes", True), ("on", True), ("1", True), ("ON", True),
    ("false", False), ("no", False), ("off", False), ("0", False), ("Off", False),
])
def test_booleans_read_the_same_spellings_as_the_agent(text: str, value: bool) -> None:
    assert load_settings(["--pause", text], {}).policy.paused is value
    assert load_settings([], {"CLUO_COORD_LEADER_ELECT": text}).leader_elect is value


def test_a_boolean_flag_alone_means_true() -> None:
    settings = load_settings(["--pause", "--leader-elect"], {})
    assert settings.policy.paused is True
    assert settings.leader_elect is True


def test_an_empty_environment_variable_counts_as_unset() -> None:
    settings = load_settings([], {
        "CLUO_COORD_MAX_CONCURRENT": "", "CLUO_COORD_METRICS_ADDRESS": "",
        "CLUO_COORD_NAMESPACE": " ", "POD_NAMESPACE": "ops", "CLUO_COORD_PAUSE": "",
        "CLUO_COORD_IDENTITY": "", "POD_NAME": "", "NODE_NAME": "",
    })
    assert settings.policy.max_concurrent == 1
    assert (settings.metrics_host, settings.metrics_port) == ("", 8080)
    assert settings.namespace == "ops"
    assert settings.policy.paused is False
    assert settings.identity  # the hostname
    assert settings.node_name == ""


def test_the_coordinators_own_variable_beats_the_downward_api() -> None:
    settings = load_settings([], {"CLUO_COORD_NAMESPACE": "mine", "POD_NAMESPACE": "ops",
                                  "CLUO_COORD_IDENTITY": "me", "POD_NAME": "pod-1"})
    assert (settings.namespace, settings.identity) == ("mine", "me")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: cluo-coord")
    assert out.err == ""


@pytest.mark.parametrize("command", ["release", "retry", "pause", "resume"])
def test_admin_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: cluo-coord {command}")


def test_unknown_flag_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-concurent", "2"]) == 2
    assert "--max-concurent" in capsys.readouterr().err


def test_admin_settings_read_flags_then_variables_then_kubeconfig() -> None:
    environ = {"KUBECONFIG": "/home/k", "CLUO_COORD_NAMESPACE": "ops"}
    release = load_admin_settings(["release", "n1"], environ)
    assert (release.command, release.node, release.kubeconfig, release.namespace) == (
        "release", "n1", "/home/k", "ops")
    pause = load_admin_settings(["pause", "--kubeconfig", "/k", "--annotation-prefix",
                                 FLUO_PREFIX], environ)
    assert (pause.kubeconfig, pause.keys.prefix, pause.node) == ("/k", FLUO_PREFIX, "")
    retry = load_admin_settings(["retry", "n2"], environ)
    assert (retry.command, retry.node) == ("retry", "n2")


# -- FLUO's and CLUO's update-operator spellings ---------------------------------------------


@pytest.mark.parametrize(("invocation", "cluo"), [
    (fluo_examples.FLUO_OPERATOR_DOCUMENTED_FLAGS,
     fluo_examples.CLUO_SPELLING_OF_THE_DOCUMENTED_FLAGS),
    (fluo_examples.CLUO_OPERATOR_WINDOW_VARIABLES,
     fluo_examples.CLUO_SPELLING_OF_THE_WINDOW_VARIABLES),
], ids=["FLUO's documented flags", "CLUO's window variables"])
def test_fluo_and_cluo_examples_give_the_settings_of_cluos_spelling(
    invocation: fluo_examples.Invocation, cluo: fluo_examples.Invocation,
) -> None:
    expected = load_settings(list(cluo.argv), cluo.environ)
    settings = load_settings(list(invocation.argv), invocation.environ)
    assert settings.aliases_used  # the one difference: what to log
    assert replace(settings, aliases_used=()) == expected
    policy = settings.policy
    # Thursday 23:00 for 1h30m, in UTC: FLUO's own reading of its doc's example.
    assert policy.windows.is_open(datetime(2026, 11, 27, 0, 29, tzinfo=UTC))
    assert not policy.windows.is_open(datetime(2026, 11, 27, 0, 30, tzinfo=UTC))
    if invocation is fluo_examples.FLUO_OPERATOR_DOCUMENTED_FLAGS:
        assert policy.before_reboot_annotations == ("anno1", "anno2")
        assert policy.after_reboot_annotations == ("anno3", "anno4")


def test_fluos_example_deployment_starts_with_its_namespace() -> None:
    example = fluo_examples.FLUO_OPERATOR_DEPLOYMENT
    settings = load_settings(list(example.argv), example.environ)
    assert settings.namespace == "reboot-coordinator"
    assert settings.kubeconfig is None  # in-cluster, as FLUO's
    assert settings.policy.windows.always_open
    assert settings.aliases_used == ()


@pytest.mark.parametrize(("argv", "environ", "setting"), [
    (["-kubeconfig", "/k"], {}, "--kubeconfig"),
    (["-kubeconfig=/k"], {}, "--kubeconfig"),
    ([], {"UPDATE_OPERATOR_KUBECONFIG": "/k"}, "CLUO_COORD_KUBECONFIG"),
    (["-before-reboot-annotations", "a.example.com/x"], {}, "--before-reboot-annotations"),
    ([], {"UPDATE_OPERATOR_AFTER_REBOOT_ANNOTATIONS": "a.example.com/x"},
     "CLUO_COORD_AFTER_REBOOT_ANNOTATIONS"),
])
def test_each_update_operator_spelling_is_read_and_reported(
    argv: list[str], environ: dict[str, str], setting: str
) -> None:
    settings = load_settings(argv, environ)
    assert [use.cluo for use in settings.aliases_used] == [setting]
    assert settings.kubeconfig == ("/k" if "kubeconfig" in setting.lower() else None)


def test_kubeconfig_falls_back_to_kubeconfig_as_fluo_did() -> None:
    assert load_settings([], {"KUBECONFIG": "/home/k"}).kubeconfig == "/home/k"
    assert load_settings([], {"KUBECONFIG": "/home/k",
                              "UPDATE_OPERATOR_KUBECONFIG": "/k"}).kubeconfig == "/k"
    assert load_settings(["--kubeconfig", "/f"], {"KUBECONFIG": "/home/k"}).kubeconfig == "/f"


@pytest.mark.parametrize(("argv", "environ", "named", "why"), [
    (["-auto-label-container-linux"], {}, "-auto-label-container-linux", "labelling"),
    (["-manage-agent=false"], {}, "-manage-agent", "host service"),
    (["--agent-image-repo", "quay.io/x"], {}, "--agent-image-repo", "host service"),
    (["-analytics=false"], {}, "-analytics", "analytics"),
    (["-version"], {}, "-version", "no version flag"),
    (["-v=4"], {}, "-v", "--log-level"),
    (["-logtostderr"], {}, "-logtostderr", "--log-level"),
    ([], {"UPDATE_OPERATOR_V": "4"}, "UPDATE_OPERATOR_V='4'", "--log-level"),
    ([], {"UPDATE_OPERATOR_MANAGE_AGENT": "true"}, "UPDATE_OPERATOR_MANAGE_AGENT='true'",
     "Ignition"),
])
def test_update_operator_flags_without_an_equivalent_are_refused_naming_them(
    argv: list[str], environ: dict[str, str], named: str, why: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(argv, environ)
    assert str(err.value).startswith(f"{named}: not supported: ")
    assert why in str(err.value)


def test_a_refused_update_operator_flag_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["-reboot-window-start", "14:00", "-auto-label-container-linux"]) == 2
    assert "cluo-coord: -auto-label-container-linux: not supported" in capsys.readouterr().err
