"""The installed console scripts: --help exits 0, a bad flag exits 2 naming it, no traceback.

These run `.venv/bin/cluo-agent` and `.venv/bin/cluo-coord` as processes, since the exit
status and where the text goes are what a user (or systemd, or a Deployment) sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
RUN_TIMEOUT = 60.0  # a start that hangs fails the test instead of the run

# (script, arguments before --help, what its usage line starts with, a flag the help lists)
HELPS = [
    ("cluo-agent", [], "usage: cluo-agent", "--drain-timeout"),
    ("cluo-coord", [], "usage: cluo-coord", "--max-concurrent"),
    ("cluo-coord", ["release"], "usage: cluo-coord release", "NODE"),
    ("cluo-coord", ["slots"], "usage: cluo-coord slots", "--free"),
    ("cluo-coord", ["retry"], "usage: cluo-coord retry", "NODE"),
    ("cluo-coord", ["pause"], "usage: cluo-coord pause", "--kubeconfig"),
    ("cluo-coord", ["resume"], "usage: cluo-coord resume", "--namespace"),
]

# (script, arguments, what stderr must name)
BAD_FLAGS = [
    ("cluo-agent", ["--bogus"], "--bogus"),
    ("cluo-agent", ["--node-name", "n1", "--drain-timeout"], "--drain-timeout"),
    ("cluo-coord", ["--bogus"], "--bogus"),
    ("cluo-coord", ["--max-concurrent"], "--max-concurrent"),
    ("cluo-coord", ["release", "n1", "--bogus"], "--bogus"),
    ("cluo-coord", ["release"], "NODE"),
    ("cluo-coord", ["slots", "--bogus"], "--bogus"),
    ("cluo-coord", ["retry"], "NODE"),
    ("cluo-coord", ["pause", "--bogus"], "--bogus"),
    ("cluo-coord", ["resume", "--bogus"], "--bogus"),
]

# (script, arguments, environment, what stderr must say): values, not the command line
BAD_VALUES = [
    ("cluo-agent", ["--node-name", "n1", "--drain-timeout", "soon"], {},
     "cluo-agent: --drain-timeout: 'soon': not a duration"),
    ("cluo-agent", ["--node-name", "n1"], {"CLUO_AGENT_LOG_LEVEL": "loud"},
     "cluo-agent: CLUO_AGENT_LOG_LEVEL: 'loud': not one of"),
    ("cluo-coord", ["--max-concurrent", "0"], {},
     "cluo-coord: --max-concurrent: '0': must be at least 1"),
    ("cluo-coord", ["pause", "--annotation-prefix", "nope"], {},
     "cluo-coord pause: --annotation-prefix: 'nope':"),
]


def run(script: str, args: list[str], env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CLUO_")}
    environment.update(env or {})
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True,
                          env=environment, timeout=RUN_TIMEOUT, check=False)


@pytest.mark.parametrize(("script", "args", "usage", "listed"), HELPS,
                         ids=[" ".join([s, *a]) for s, a, _, _ in HELPS])
def test_help_prints_the_usage_and_exits_0(
    script: str, args: list[str], usage: str, listed: str
) -> None:
    # A bad variable does not matter: --help reads no value.
    result = run(script, [*args, "--help"], {"CLUO_AGENT_DRAIN_TIMEOUT": "soon",
                                              "CLUO_COORD_MAX_CONCURRENT": "zero"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)
    assert listed in result.stdout
    assert result.stderr == ""


def test_the_coordinators_help_names_the_admin_commands() -> None:
    result = run("cluo-coord", ["--help"])
    for command in ("release NODE", "slots", "retry NODE", "pause", "resume"):
        assert f"cluo-coord {command}" in " ".join(result.stdout.split())


@pytest.mark.parametrize(("script", "args", "named"), BAD_FLAGS,
                         ids=[" ".join([s, *a]) for s, a, _ in BAD_FLAGS])
def test_a_bad_or_unknown_flag_exits_2_naming_it(script: str, args: list[str],
                                                 named: str) -> None:
    result = run(script, args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "usage: " + script in result.stderr
    assert named in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("script", "args", "env", "message"), BAD_VALUES,
                         ids=[" ".join([s, *a, *e]) for s, a, e, _ in BAD_VALUES])
def test_a_bad_value_exits_2_naming_its_source_and_the_value(
    script: str, args: list[str], env: dict[str, str], message: str
) -> None:
    result = run(script, args, env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# (script, arguments, what stderr must name): FLUO's and CLUO's flags that cluo does not take
REFUSED_FLAGS = [
    ("cluo-coord", ["-auto-label-container-linux"], "-auto-label-container-linux"),
    ("cluo-coord", ["-reboot-window-start=14:00", "-v=4"], "-v"),
    ("cluo-agent", ["-node", "n1", "-version"], "-version"),
]


@pytest.mark.parametrize(("script", "args", "named"), REFUSED_FLAGS,
                         ids=[" ".join([s, *a]) for s, a, _ in REFUSED_FLAGS])
def test_a_fluo_flag_without_a_cluo_equivalent_exits_2_naming_it(
    script: str, args: list[str], named: str
) -> None:
    result = run(script, args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"{script}: {named}: not supported: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_fluos_window_flags_start_the_coordinator_and_log_cluos_spelling() -> None:
    # Outside a pod and without a kubeconfig it stops at the client, after the settings.
    result = run("cluo-coord", ["-reboot-window-start", "Thu 23:00", "-reboot-window-length=1h30m",
                                "--metrics-address", "off"],
                 {"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["given"], line["cluo_spelling"]) for line in lines if "given" in line] == [
        ("-reboot-window-start", "--reboot-window-start"),
        ("-reboot-window-length", "--reboot-window-length")]
    assert lines[-1]["msg"] == "cannot configure the kubernetes client"
