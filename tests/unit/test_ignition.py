"""ignition/cluo_ignition.py: the Ignition config (and Butane) that installs cluo-agent."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "ignition" / "cluo_ignition.py"
URL = "https://artifacts.example.com/cluo/cluo-agent-1.2.3-x86-64.raw"
SHA = "ab" * 64

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: LS0tLS1CRUdJTg==
users:
- name: cluo-agent
  user:
    token: eyJhbGciOiJSUzI1NiJ9.secret
contexts:
- name: cluo-agent
  context: {cluster: prod, user: cluo-agent}
current-context: cluo-agent
"""


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cluo_ignition", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tool = _load()


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "agent.kubeconfig"
    path.write_text(KUBECONFIG)
    return path


def generate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the tool's `main` in this process, as its command line would."""
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = tool.main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def test_runs_as_a_script(kubeconfig: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--artifact-url", URL, "--artifact-sha512", SHA,
         "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, check=False, timeout=60, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ignition"]["version"] == "3.3.0"


def config_for(kubeconfig: Path, *extra: str) -> dict[str, Any]:
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA,
                      "--kubeconfig", kubeconfig, *extra)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def files_by_path(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in config["storage"]["files"]}


def units_by_name(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {unit["name"]: unit for unit in config["systemd"]["units"]}


def decode_data_url(url: str) -> str:
    header, _, payload = url.partition(",")
    assert header.startswith("data:")
    if header.endswith(";base64"):
        return base64.b64decode(payload).decode()
    return urllib.parse.unquote(payload)


# --- the config ------------------------------------------------------------------------


def test_downloads_the_sysext_image_checked_by_its_sha512(kubeconfig: Path) -> None:
    config = config_for(kubeconfig)

    assert config["ignition"]["version"] == "3.3.0"
    image = files_by_path(config)["/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw"]
    assert image["contents"] == {"source": URL, "verification": {"hash": f"sha512-{SHA}"}}
    assert image["mode"] == 420
    assert config["storage"]["links"] == [
        {
            "path": "/etc/extensions/cluo-agent.raw",
            "target": "/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw",
            "hard": False,
        }
    ]
    assert {d["path"]: d["mode"] for d in config["storage"]["directories"]} == {
        "/opt/extensions/cluo-agent": 493,
        "/etc/cluo": 493,
    }


def test_embeds_the_kubeconfig_readable_by_root_only(kubeconfig: Path) -> None:
    entry = files_by_path(config_for(kubeconfig))["/etc/cluo/kubeconfig"]

    assert entry["mode"] == 384
    assert decode_data_url(entry["contents"]["source"]) == KUBECONFIG


def test_a_kubeconfig_url_is_fetched_by_the_node_with_an_optional_hash() -> None:
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA,
                      "--kubeconfig-url", "https://secrets.example.com/n1.kubeconfig",
                      "--kubeconfig-sha512", "cd" * 64)
    assert result.returncode == 0, result.stderr

    entry = files_by_path(json.loads(result.stdout))["/etc/cluo/kubeconfig"]
    assert entry["mode"] == 384
    assert entry["contents"] == {
        "source": "https://secrets.example.com/n1.kubeconfig",
        "verification": {"hash": f"sha512-{'cd' * 64}"},
    }


def test_installs_the_repository_unit_and_masks_locksmithd(kubeconfig: Path) -> None:
    units = units_by_name(config_for(kubeconfig))

    assert units["cluo-agent.service"] == {
        "name": "cluo-agent.service",
        "enabled": True,
        "contents": (ROOT / "units/cluo-agent.service").read_text(),
    }
    assert units["locksmithd.service"] == {"name": "locksmithd.service", "mask": True}
    assert units["update-engine.service"] == {"name": "update-engine.service", "enabled": True}


def test_node_settings_become_agent_variables(kubeconfig: Path) -> None:
    config = config_for(
        kubeconfig,
        "--node-setting", "drain-timeout=15m",
        "--node-setting", "CLUO_AGENT_LOG_LEVEL=debug",
        "--node-setting=--annotation-prefix=flatcar-linux-update.v1.flatcar-linux.net/",
        "--node-setting", "node_name=worker-1.example.com",
    )
    entry = files_by_path(config)["/etc/cluo/agent.env"]
    assert entry["mode"] == 420
    lines = [
        line for line in decode_data_url(entry["contents"]["source"]).splitlines()
        if not line.startswith("#")
    ]
    assert lines == [
        "CLUO_AGENT_DRAIN_TIMEOUT=15m",
        "CLUO_AGENT_LOG_LEVEL=debug",
        "CLUO_AGENT_ANNOTATION_PREFIX=flatcar-linux-update.v1.flatcar-linux.net/",
        "CLUO_AGENT_NODE_NAME=worker-1.example.com",
    ]


def test_env_values_with_spaces_or_quotes_are_quoted_for_systemd() -> None:
    assert tool.agent_env({"CLUO_AGENT_X": 'a "b" \\c'}).splitlines()[-1] == (
        'CLUO_AGENT_X="a \\"b\\" \\\\c"'
    )


def test_spec_340_changes_only_the_version(kubeconfig: Path) -> None:
    old = config_for(kubeconfig)
    new = config_for(kubeconfig, "--spec", "3.4.0")

    assert new["ignition"]["version"] == "3.4.0"
    assert {**new, "ignition": old["ignition"]} == old


def test_artifact_path_gives_its_sha512(kubeconfig: Path, tmp_path: Path) -> None:
    image = tmp_path / "cluo-agent-1.2.3-x86-64.raw"
    image.write_bytes(b"squashfs stand-in")
    result = generate("--artifact-url", URL, "--artifact", image, "--kubeconfig", kubeconfig)
    assert result.returncode == 0, result.stderr

    entry = files_by_path(json.loads(result.stdout))[
        "/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw"
    ]
    expected = hashlib.sha512(b"squashfs stand-in").hexdigest()
    assert entry["contents"]["verification"]["hash"] == f"sha512-{expected}"


def test_a_sha512_file_line_is_accepted(kubeconfig: Path) -> None:
    line = f"{SHA}  cluo-agent-1.2.3-x86-64.raw"
    config = config_for_sha(kubeconfig, line)
    image = files_by_path(config)["/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw"]
    assert image["contents"]["verification"]["hash"] == f"sha512-{SHA}"


def config_for_sha(kubeconfig: Path, sha: str) -> dict[str, Any]:
    result = generate("--artifact-url", URL, "--artifact-sha512", sha, "--kubeconfig", kubeconfig)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_output_file(kubeconfig: Path, tmp_path: Path) -> None:
    out = tmp_path / "node.ign"
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA,
                      "--kubeconfig", kubeconfig, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert json.loads(out.read_text())["ignition"]["version"] == "3.3.0"


# --- Butane ------------------------------------------------------------------------------


def butane_to_ignition(butane: dict[str, Any]) -> dict[str, Any]:
    """What butane does to this config: variant/version -> spec, inline -> data URLs."""
    spec = {"1.0.0": "3.3.0", "1.1.0": "3.4.0"}[butane.pop("version")]
    assert butane.pop("variant") == "flatcar"
    for entry in butane["storage"]["files"]:
        if "inline" in entry["contents"]:
            entry["contents"] = {"source": entry["contents"].pop("inline")}
    return {"ignition": {"version": spec}, **butane}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every data URL decoded and comment lines of agent.env dropped."""
    config = json.loads(json.dumps(config))
    for entry in config["storage"]["files"]:
        source = entry["contents"]["source"]
        if source.startswith("data:"):
            source = decode_data_url(source)
        if entry["path"] == "/etc/cluo/agent.env":
            source = [line for line in source.splitlines() if not line.startswith("#")]
        entry["contents"]["source"] = source
    return config


@pytest.mark.parametrize("spec", ["3.3.0", "3.4.0"])
def test_butane_template_says_the_same_as_the_ignition_config(
    kubeconfig: Path, spec: str
) -> None:
    args = ["--artifact-url", URL, "--artifact-sha512", SHA, "--kubeconfig", str(kubeconfig),
            "--node-setting", "drain-timeout=15m", "--node-setting", "log-level=debug",
            "--spec", spec]
    ignition = config_for(kubeconfig, *args[6:])
    result = generate(*args, "--format", "butane")
    assert result.returncode == 0, result.stderr

    assert re.search(r"@[A-Z0-9_]+@", result.stdout) is None, "a placeholder was left unfilled"
    # YAML 1.1 reads 0644 as octal, as butane does.
    assert comparable(butane_to_ignition(yaml.safe_load(result.stdout))) == comparable(ignition)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--artifact-url", "ftp://x/cluo-agent-1-x86-64.raw", "--artifact-sha512", SHA],
         "--artifact-url: 'ftp://x/cluo-agent-1-x86-64.raw' is not a URL Ignition can fetch"),
        (["--artifact-url", "https://x/agent.tar.gz", "--artifact-sha512", SHA],
         "--artifact-url: the file name 'agent.tar.gz' is not an artifact name"),
        (["--artifact-url", URL, "--artifact-sha512", "abc"],
         "--artifact-sha512: 'abc' is not a sha512 (128 hex digits)"),
        (["--artifact-url", URL, "--artifact-sha512", f"{SHA}  cluo-agent-9-x86-64.raw"],
         "the sum is for 'cluo-agent-9-x86-64.raw', not for 'cluo-agent-1.2.3-x86-64.raw'"),
        (["--artifact-url", URL],
         "give exactly one of --artifact-sha512 and --artifact"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--artifact", "/nonexistent.raw"],
         "give exactly one of --artifact-sha512 and --artifact"),
        (["--artifact-url", URL, "--artifact", "/nonexistent/cluo-agent-1.2.3-x86-64.raw"],
         "--artifact: cannot read '/nonexistent/cluo-agent-1.2.3-x86-64.raw'"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--node-setting", "drain-timeout"],
         "--node-setting: 'drain-timeout' is not KEY=VALUE"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--node-setting", "drian-timeout=1m"],
         "--node-setting: 'drian-timeout' is not a cluo-agent flag"),
        (["--artifact-url", URL, "--artifact-sha512", SHA,
          "--node-setting", "drain-timeout=ten minutes"],
         "--node-setting: CLUO_AGENT_DRAIN_TIMEOUT: 'ten minutes': not a duration"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--node-setting", "log-level=loud"],
         "--node-setting: CLUO_AGENT_LOG_LEVEL: 'loud': not one of debug"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--node-setting", "kubeconfig=/x"],
         "--node-setting: 'kubeconfig' cannot be set: the kubeconfig is always written to"),
        (["--artifact-url", URL, "--artifact-sha512", SHA,
          "--node-setting", "log-level=info", "--node-setting", "LOG_LEVEL=debug"],
         "--node-setting: 'LOG_LEVEL' is given twice"),
    ],
)
def test_bad_input_exits_2_naming_it(
    kubeconfig: Path, args: list[str], message: str
) -> None:
    result = generate(*args, "--kubeconfig", kubeconfig)

    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not: [yaml", "is not YAML"),
        ("kind: Pod\n", "is not a kubeconfig (kind: Config)"),
        ("kind: Config\nclusters: []\n", "has no clusters"),
        (KUBECONFIG.replace("certificate-authority-data: LS0tLS1CRUdJTg==",
                            "certificate-authority: /etc/kubernetes/ca.crt"),
         "refers to the file '/etc/kubernetes/ca.crt' (certificate-authority), which the node "
         "does not have: embed it as certificate-authority-data"),
    ],
)
def test_a_kubeconfig_the_node_cannot_use_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.kubeconfig"
    path.write_text(text)

    result = generate("--artifact-url", URL, "--artifact-sha512", SHA, "--kubeconfig", path)

    assert result.returncode == 2
    assert f"--kubeconfig: '{path}' " in result.stderr
    assert message in result.stderr


def test_kubeconfig_and_kubeconfig_url_are_exclusive(kubeconfig: Path) -> None:
    both = generate("--artifact-url", URL, "--artifact-sha512", SHA, "--kubeconfig", kubeconfig,
                    "--kubeconfig-url", "https://x/k")
    neither = generate("--artifact-url", URL, "--artifact-sha512", SHA)

    for result in (both, neither):
        assert result.returncode == 2
        assert "give exactly one of --kubeconfig and --kubeconfig-url" in result.stderr


def test_node_setting_keys_are_the_agents_flags() -> None:
    flags = tool.agent_flags()

    assert {"drain-timeout", "node-name", "log-level", "annotation-prefix"} <= flags
    assert "help" not in flags
