"""The installed console scripts: --help exits 0, a bad flag exits 2 naming it, no traceback.

These run `.venv/bin/cluo-agent` and `.venv/bin/cluo-coord` as processes, since the exit
status and where the text goes are what a user (or systemd, or a Deployment) sees.
"""

from __future__ import annotations

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
    for command in ("release NODE", "slots", "pause", "resume"):
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
