"""cluo-agent's configuration: every flag, its CLUO_AGENT_* twin, defaults and bad values."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from cluo.cycle.agent_core import DrainTimeoutPolicy
from cluo.errors import ConfigError
from cluo.protocol import CLUO_PREFIX, FLUO_PREFIX
from cluo.settings import AliasUse
from cluo_host.config import DEFAULT_KUBECONFIG, load_settings
from tests.fixtures import fluo_examples

NODE = ["--node-name", "n1"]


def settings_of(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_settings(argv, env or {})


# -- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = settings_of(NODE)
    assert settings.kubeconfig == Path(DEFAULT_KUBECONFIG) == Path("/etc/cluo/kubeconfig")
    assert settings.keys.prefix == CLUO_PREFIX
    assert settings.core.drain_timeout == 600.0
    assert settings.core.drain_timeout_policy is DrainTimeoutPolicy.ABORT
    assert settings.core.drain_pods_without_controller is False
    assert settings.core.reboot_retry_base == 10.0
    assert settings.core.reboot_retry_max == 600.0
    assert settings.core.reboot_timeout == 300.0
    assert settings.drain.concurrency == 8
    assert settings.bus_address is None
    assert settings.host_root == Path("/")
    assert settings.log_level == "info"
    assert settings.log_target == "auto"


def test_node_name_defaults_to_the_lowercased_hostname_like_the_kubelet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Worker-7.Example.COM")
    assert settings_of([]).node_name == "worker-7.example.com"


def test_system_bus_defaults_to_dbus_system_bus_address() -> None:
    address = "unix:path=/run/other/system_bus_socket"
    assert settings_of(NODE, {"DBUS_SYSTEM_BUS_ADDRESS": address}).bus_address == address


# -- every flag and its environment twin ----------------------------------------------------

# (flag, value, environment variable, how to read the result, expected)
CASES = [
    ("--node-name", "worker-1", "CLUO_AGENT_NODE_NAME", lambda s: s.node_name, "worker-1"),
    ("--kubeconfig", "/etc/k/config", "CLUO_AGENT_KUBECONFIG",
     lambda s: s.kubeconfig, Path("/etc/k/config")),
    ("--annotation-prefix", FLUO_PREFIX, "CLUO_AGENT_ANNOTATION_PREFIX",
     lambda s: s.keys.reboot_needed, FLUO_PREFIX + "reboot-needed"),
    ("--drain-timeout", "15m", "CLUO_AGENT_DRAIN_TIMEOUT",
     lambda s: s.core.drain_timeout, 900.0),
    ("--drain-timeout-policy", "force", "CLUO_AGENT_DRAIN_TIMEOUT_POLICY",
     lambda s: s.core.drain_timeout_policy, DrainTimeoutPolicy.FORCE),
    ("--eviction-concurrency", "3", "CLUO_AGENT_EVICTION_CONCURRENCY",
     lambda s: s.drain.concurrency, 3),
    ("--reboot-retry-base", "30s", "CLUO_AGENT_REBOOT_RETRY_BASE",
     lambda s: s.core.reboot_retry_base, 30.0),
    ("--reboot-retry-max", "1h", "CLUO_AGENT_REBOOT_RETRY_MAX",
     lambda s: s.core.reboot_retry_max, 3600.0),
    ("--reboot-timeout", "2m", "CLUO_AGENT_REBOOT_TIMEOUT",
     lambda s: s.core.reboot_timeout, 120.0),
    ("--system-bus-address", "unix:path=/tmp/bus", "CLUO_AGENT_SYSTEM_BUS_ADDRESS",
     lambda s: s.bus_address, "unix:path=/tmp/bus"),
    ("--host-root", "/host", "CLUO_AGENT_HOST_ROOT", lambda s: s.host_root, Path("/host")),
    ("--log-level", "debug", "CLUO_AGENT_LOG_LEVEL", lambda s: s.log_level, "debug"),
    ("--log-target", "journal", "CLUO_AGENT_LOG_TARGET", lambda s: s.log_target, "journal"),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("flag", "value", "variable", "read", "expected"), CASES, ids=IDS)
def test_flag_sets_the_setting(flag, value, variable, read, expected) -> None:  # type: ignore[no-untyped-def]
    argv = [flag, value] if flag == "--node-name" else [*NODE, flag, value]
    assert read(settings_of(argv)) == expected


@pytest.mark.parametrize(("flag", "value", "variable", "read", "expected"), CASES, ids=IDS)
def test_environment_twin_sets_the_setting(flag, value, variable, read, expected) -> None:  # type: ignore[no-untyped-def]
    env = {variable: value} if flag == "--node-name" else {"CLUO_AGENT_NODE_NAME": "n1",
                                                           variable: value}
    assert read(settings_of([], env)) == expected


@pytest.mark.parametrize(("flag", "value", "variable", "read", "expected"), CASES, ids=IDS)
def test_flag_beats_the_environment(flag, value, variable, read, expected) -> None:  # type: ignore[no-untyped-def]
    other = {
        "--node-name": "from-env",
        "--kubeconfig": "/from/env",
        "--annotation-prefix": CLUO_PREFIX,
        "--drain-timeout": "1s",
        "--drain-timeout-policy": "abort",
        "--eviction-concurrency": "40",
        "--reboot-retry-base": "1s",
        "--reboot-retry-max": "15s",
        "--reboot-timeout": "1s",
        "--system-bus-address": "unix:path=/from/env",
        "--host-root": "/from/env",
        "--log-level": "error",
        "--log-target": "stderr",
    }[flag]
    argv = [flag, value] if flag == "--node-name" else [*NODE, flag, value]
    assert read(settings_of(argv, {variable: other})) == expected
    if flag != "--node-name":  # the environment alone gives the other value
        assert read(settings_of(NODE, {variable: other})) != expected


def test_drain_pods_without_controller_flag_and_twin() -> None:
    assert settings_of([*NODE, "--drain-pods-without-controller"]).core \
        .drain_pods_without_controller is True
    assert settings_of([*NODE, "--drain-pods-without-controller=off"]).core \
        .drain_pods_without_controller is False
    for text in ("true", "1", "yes", "on", "TRUE"):
        env = {"CLUO_AGENT_DRAIN_PODS_WITHOUT_CONTROLLER": text}
        assert settings_of(NODE, env).core.drain_pods_without_controller is True
    for text in ("false", "0", "no", "off", ""):
        env = {"CLUO_AGENT_DRAIN_PODS_WITHOUT_CONTROLLER": text}
        assert settings_of(NODE, env).core.drain_pods_without_controller is False
    # The flag wins over the environment.
    env = {"CLUO_AGENT_DRAIN_PODS_WITHOUT_CONTROLLER": "false"}
    assert settings_of([*NODE, "--drain-pods-without-controller"], env).core \
        .drain_pods_without_controller is True


def test_an_empty_environment_variable_counts_as_unset() -> None:
    settings = settings_of(NODE, {"CLUO_AGENT_DRAIN_TIMEOUT": "", "CLUO_AGENT_LOG_LEVEL": ""})
    assert settings.core.drain_timeout == 600.0
    assert settings.log_level == "info"


# -- bad values: a ConfigError naming where the value came from, and the value ---------------

BAD = [
    ("--drain-timeout", "CLUO_AGENT_DRAIN_TIMEOUT", "ten minutes"),
    ("--drain-timeout", "CLUO_AGENT_DRAIN_TIMEOUT", "0s"),
    ("--drain-timeout", "CLUO_AGENT_DRAIN_TIMEOUT", "inf"),
    ("--drain-timeout", "CLUO_AGENT_DRAIN_TIMEOUT", "-5"),
    ("--reboot-retry-base", "CLUO_AGENT_REBOOT_RETRY_BASE", "1d"),
    ("--reboot-retry-max", "CLUO_AGENT_REBOOT_RETRY_MAX", "0"),
    ("--reboot-timeout", "CLUO_AGENT_REBOOT_TIMEOUT", "nan"),
    ("--drain-timeout-policy", "CLUO_AGENT_DRAIN_TIMEOUT_POLICY", "ignore"),
    ("--eviction-concurrency", "CLUO_AGENT_EVICTION_CONCURRENCY", "many"),
    ("--eviction-concurrency", "CLUO_AGENT_EVICTION_CONCURRENCY", "0"),
    ("--annotation-prefix", "CLUO_AGENT_ANNOTATION_PREFIX", "no-slash.example.com"),
    ("--log-level", "CLUO_AGENT_LOG_LEVEL", "loud"),
    ("--log-target", "CLUO_AGENT_LOG_TARGET", "syslog"),
    ("--node-name", "CLUO_AGENT_NODE_NAME", "Bad_Name"),
]


def names_value(message: str, value: str) -> bool:
    """The message quotes the value, or ends with it ("must be at least 1, not 0")."""
    return repr(value) in message or message.endswith(f" {value}")


@pytest.mark.parametrize(("flag", "variable", "value"), BAD)
def test_bad_flag_value_is_a_config_error_naming_the_flag_and_value(
    flag: str, variable: str, value: str
) -> None:
    argv = [flag, value] if flag == "--node-name" else [*NODE, flag, value]
    with pytest.raises(ConfigError) as caught:
        settings_of(argv)
    assert flag in str(caught.value)
    assert names_value(str(caught.value), value)


@pytest.mark.parametrize(("flag", "variable", "value"), BAD)
def test_bad_environment_value_is_a_config_error_naming_the_variable_and_value(
    flag: str, variable: str, value: str
) -> None:
    argv = [] if flag == "--node-name" else NODE
    with pytest.raises(ConfigError) as caught:
        settings_of(argv, {variable: value})
    assert variable in str(caught.value)
    assert names_value(str(caught.value), value)


def test_bad_boolean_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"CLUO_AGENT_DRAIN_PODS_WITHOUT_CONTROLLER: 'maybe'"):
        settings_of(NODE, {"CLUO_AGENT_DRAIN_PODS_WITHOUT_CONTROLLER": "maybe"})


def test_bad_hostname_default_says_it_came_from_the_hostname(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "under_score")
    with pytest.raises(ConfigError, match=r"hostname.*'under_score'"):
        settings_of([])


def test_retry_max_below_retry_base_is_a_config_error_naming_both() -> None:
    with pytest.raises(ConfigError, match="--reboot-retry-max '10m' is below "
                       "--reboot-retry-base '20m'"):
        settings_of([*NODE, "--reboot-retry-base", "20m", "--reboot-retry-max", "10m"])
    with pytest.raises(ConfigError, match="the default of --reboot-retry-max '10m' is below "
                       "CLUO_AGENT_REBOOT_RETRY_BASE '20m'"):
        settings_of(NODE, {"CLUO_AGENT_REBOOT_RETRY_BASE": "20m"})


# -- FLUO's and CLUO's update-agent spellings --------------------------------------------------


def test_fluos_example_daemonset_environment_names_the_node() -> None:
    example = fluo_examples.FLUO_AGENT_DAEMONSET
    settings = settings_of(list(example.argv), example.environ)
    assert (settings.node_name, settings.node_name_source) == ("worker-1", "UPDATE_AGENT_NODE")
    assert settings.aliases_used == (AliasUse("UPDATE_AGENT_NODE", "CLUO_AGENT_NODE_NAME"),)
    assert settings == replace(settings_of([], {"CLUO_AGENT_NODE_NAME": "worker-1"}),
                               node_name_source="UPDATE_AGENT_NODE",
                               aliases_used=settings.aliases_used)


# (argv, environment, how to read the result, expected, cluo's spelling)
AGENT_ALIASES = [
    (["-node", "worker-1"], {}, lambda s: s.node_name, "worker-1", "--node-name"),
    (["--node=worker-1"], {}, lambda s: s.node_name, "worker-1", "--node-name"),
    ([*NODE, "-grace-period", "900"], {}, lambda s: s.core.drain_timeout, 900.0,
     "--drain-timeout"),
    (NODE, {"UPDATE_AGENT_GRACE_PERIOD": "300"}, lambda s: s.core.drain_timeout, 300.0,
     "CLUO_AGENT_DRAIN_TIMEOUT"),
    ([*NODE, "-force-drain"], {}, lambda s: s.core.drain_pods_without_controller, True,
     "--drain-pods-without-controller"),
    ([*NODE, "-force-drain=false"], {}, lambda s: s.core.drain_pods_without_controller, False,
     "--drain-pods-without-controller"),
    (NODE, {"UPDATE_AGENT_FORCE_DRAIN": "true"},
     lambda s: s.core.drain_pods_without_controller, True,
     "CLUO_AGENT_DRAIN_PODS_WITHOUT_CONTROLLER"),
]


@pytest.mark.parametrize(("argv", "env", "read", "expected", "cluo"), AGENT_ALIASES)
def test_each_update_agent_spelling_is_read_and_reported(  # type: ignore[no-untyped-def]
    argv, env, read, expected, cluo
) -> None:
    settings = settings_of(argv, env)
    assert read(settings) == expected
    assert [use.cluo for use in settings.aliases_used] == [cluo]


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["-node", "Worker_1"], {}, "-node: 'Worker_1': not a valid Kubernetes node name"),
    ([*NODE, "-grace-period", "0"], {}, "-grace-period: '0': must be a positive duration"),
    (NODE, {"UPDATE_AGENT_FORCE_DRAIN": "T"}, "UPDATE_AGENT_FORCE_DRAIN: 'T': not a boolean"),
    (["-node", "n1", "--node-name", "n2"], {}, "--node-name 'n2' and -node 'n1' disagree"),
    ([], {"CLUO_AGENT_NODE_NAME": "n1", "UPDATE_AGENT_NODE": "n2"},
     "CLUO_AGENT_NODE_NAME 'n1' and UPDATE_AGENT_NODE 'n2' disagree"),
    ([*NODE, "-version"], {}, "-version: not supported: cluo-agent has no version flag"),
    ([*NODE, "-v", "4"], {}, "-v: not supported: a klog logging flag"),
    (NODE, {"UPDATE_AGENT_ALSOLOGTOSTDERR": "true"},
     "UPDATE_AGENT_ALSOLOGTOSTDERR='true': not supported"),
])
def test_update_agent_values_and_flags_cluo_cannot_take_are_refused_naming_them(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_of(argv, env)
    assert str(caught.value).startswith(message)
