"""ignition/cluo_ignition.py: the Ignition config (and Butane) that installs cluo-agent."""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import importlib.util
import io
import json
import re
import shutil
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

# What would give a credential away, in any config or Butane text the tool writes.
CREDENTIAL_MARKERS = ("-----BEGIN", "token:", "tokenFile", "client-key", "client-certificate",
                      "certificate-authority-data", "password")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cluo_ignition", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tool = _load()


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


def test_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--artifact-url", URL, "--artifact-sha512", SHA],
        capture_output=True, text=True, check=False, timeout=60, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ignition"]["version"] == "3.3.0"


def config_for(*extra: str) -> dict[str, Any]:
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA, *extra)
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


def test_downloads_the_sysext_image_checked_by_its_sha512() -> None:
    config = config_for()

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


def agent_env_lines(config: dict[str, Any]) -> list[str]:
    entry = files_by_path(config)["/etc/cluo/agent.env"]
    assert entry["mode"] == 420
    return [line for line in decode_data_url(entry["contents"]["source"]).splitlines()
            if not line.startswith("#")]


def test_points_the_agent_at_the_kubelets_kubeconfig_and_writes_no_other() -> None:
    config = config_for()

    assert agent_env_lines(config) == ["CLUO_AGENT_KUBECONFIG=/etc/kubernetes/kubelet.conf"]
    assert set(files_by_path(config)) == {
        "/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw", "/etc/cluo/agent.env"}


def test_another_kubeconfig_on_the_node_can_be_named() -> None:
    config = config_for("--node-setting", "kubeconfig=/etc/kubernetes/cluo-agent.conf")

    assert agent_env_lines(config) == ["CLUO_AGENT_KUBECONFIG=/etc/kubernetes/cluo-agent.conf"]


@pytest.mark.parametrize("output", ["ignition", "butane"])
def test_the_config_carries_no_credential(output: str) -> None:
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA, "--format", output,
                      "--node-setting", "drain-timeout=15m", "--node-setting", "node-name=n1")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    if output == "ignition":
        config = json.loads(text)
        text = "\n".join([text, *(decode_data_url(entry["contents"]["source"])
                                  for entry in config["storage"]["files"]
                                  if entry["contents"]["source"].startswith("data:"))])
    found = [marker for marker in CREDENTIAL_MARKERS if marker in text]
    assert found == [], f"the generated {output} config holds {found}"


@pytest.mark.parametrize("option", ["--kubeconfig", "--kubeconfig-url", "--kubeconfig-sha512"])
def test_the_former_credential_options_are_refused_saying_why(option: str) -> None:
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA, option, "x")

    assert result.returncode == 2
    assert f"{option}: the config carries no credential" in result.stderr
    assert "/etc/kubernetes/kubelet.conf" in result.stderr
    assert result.stdout == ""


def test_installs_the_repository_unit_and_masks_locksmithd() -> None:
    units = units_by_name(config_for())

    assert units["cluo-agent.service"] == {
        "name": "cluo-agent.service",
        "enabled": True,
        "contents": (ROOT / "units/cluo-agent.service").read_text(),
    }
    assert units["locksmithd.service"] == {"name": "locksmithd.service", "mask": True}
    assert units["update-engine.service"] == {"name": "update-engine.service", "enabled": True}


def test_node_settings_become_agent_variables() -> None:
    config = config_for(
        "--node-setting", "drain-timeout=15m",
        "--node-setting", "CLUO_AGENT_LOG_LEVEL=debug",
        "--node-setting=--annotation-prefix=flatcar-linux-update.v1.flatcar-linux.net/",
        "--node-setting", "node_name=worker-1.example.com",
    )
    assert agent_env_lines(config) == [
        "CLUO_AGENT_KUBECONFIG=/etc/kubernetes/kubelet.conf",
        "CLUO_AGENT_DRAIN_TIMEOUT=15m",
        "CLUO_AGENT_LOG_LEVEL=debug",
        "CLUO_AGENT_ANNOTATION_PREFIX=flatcar-linux-update.v1.flatcar-linux.net/",
        "CLUO_AGENT_NODE_NAME=worker-1.example.com",
    ]


def test_env_values_with_spaces_or_quotes_are_quoted_for_systemd() -> None:
    assert tool.agent_env({"CLUO_AGENT_X": 'a "b" \\c'}).splitlines()[-1] == (
        'CLUO_AGENT_X="a \\"b\\" \\\\c"'
    )


def test_spec_340_changes_only_the_version() -> None:
    old = config_for()
    new = config_for("--spec", "3.4.0")

    assert new["ignition"]["version"] == "3.4.0"
    assert {**new, "ignition": old["ignition"]} == old


def test_artifact_path_gives_its_sha512(tmp_path: Path) -> None:
    image = tmp_path / "cluo-agent-1.2.3-x86-64.raw"
    image.write_bytes(b"squashfs stand-in")
    result = generate("--artifact-url", URL, "--artifact", image)
    assert result.returncode == 0, result.stderr

    entry = files_by_path(json.loads(result.stdout))[
        "/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw"
    ]
    expected = hashlib.sha512(b"squashfs stand-in").hexdigest()
    assert entry["contents"]["verification"]["hash"] == f"sha512-{expected}"


def test_a_sha512_file_line_is_accepted() -> None:
    line = f"{SHA}  cluo-agent-1.2.3-x86-64.raw"
    config = config_for_sha(line)
    image = files_by_path(config)["/opt/extensions/cluo-agent/cluo-agent-1.2.3-x86-64.raw"]
    assert image["contents"]["verification"]["hash"] == f"sha512-{SHA}"


def config_for_sha(sha: str) -> dict[str, Any]:
    result = generate("--artifact-url", URL, "--artifact-sha512", sha)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_output_file(tmp_path: Path) -> None:
    out = tmp_path / "node.ign"
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert json.loads(out.read_text())["ignition"]["version"] == "3.3.0"


# --- sysext updates (--sysupdate-url) ------------------------------------------------------

STORE = "https://artifacts.example.com/cluo"
TRANSFER = "/etc/sysupdate.cluo-agent.d/cluo-agent.conf"
SYSUPDATE_UNITS = ("cluo-sysupdate.service", "cluo-sysupdate.timer")
# The keys of systemd 257's sysupdate.d(5) that the transfer file may use, per section.
SYSUPDATE_KEYS = {
    "Transfer": {"MinVersion", "ProtectVersion", "Verify", "Features", "RequisiteFeatures"},
    "Source": {"Type", "Path", "PathRelativeTo", "MatchPattern"},
    "Target": {"Type", "Path", "PathRelativeTo", "MatchPattern", "MatchPartitionType",
               "PartitionUUID", "PartitionFlags", "PartitionNoAuto", "PartitionGrowFileSystem",
               "Mode", "TriesDone", "TriesLeft", "InstancesMax", "RemoveTemporary",
               "CurrentSymlink"},
}


def transfer_of(config: dict[str, Any]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(decode_data_url(files_by_path(config)[TRANSFER]["contents"]["source"]))
    return parser


def test_without_sysupdate_url_nothing_of_sysupdate_is_installed() -> None:
    config = config_for()

    assert TRANSFER not in files_by_path(config)
    assert not set(SYSUPDATE_UNITS) & set(units_by_name(config))


def test_sysupdate_url_adds_the_transfer_file_and_the_enabled_timer() -> None:
    config = config_for("--sysupdate-url", STORE + "/")

    transfer = transfer_of(config)
    assert files_by_path(config)[TRANSFER]["mode"] == 420
    assert dict(transfer["Source"]) == {
        "Type": "url-file", "Path": STORE, "MatchPattern": "cluo-agent-@v-%a.raw"}
    assert transfer["Transfer"]["Verify"] == "false"
    units = units_by_name(config)
    assert units["cluo-sysupdate.timer"] == {
        "name": "cluo-sysupdate.timer", "enabled": True,
        "contents": (ROOT / "units/cluo-sysupdate.timer").read_text()}
    # Started by the timer only: not enabled itself.
    assert units["cluo-sysupdate.service"] == {
        "name": "cluo-sysupdate.service",
        "contents": (ROOT / "units/cluo-sysupdate.service").read_text()}
    service = units["cluo-sysupdate.service"]["contents"]
    exec_start = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    # Downloads only: the reboot is the agent's, after /run/reboot-required asked for it.
    assert exec_start == [
        "ExecStart=/usr/lib/systemd/systemd-sysupdate --component=cluo-agent update"]
    assert "touch /run/reboot-required" in service


def test_transfer_file_uses_only_sysupdate_keys() -> None:
    transfer = transfer_of(config_for("--sysupdate-url", STORE))

    assert set(transfer.sections()) == set(SYSUPDATE_KEYS)
    for section, keys in SYSUPDATE_KEYS.items():
        assert set(transfer[section]) <= keys, section


def test_the_first_image_is_an_installed_version_of_the_transfer_target() -> None:
    config = config_for("--sysupdate-url", STORE)

    target = transfer_of(config)["Target"]
    pattern = re.escape(target["MatchPattern"]).replace("@v", r"[^/]+").replace("%a", "x86-64")
    (link,) = config["storage"]["links"]
    assert link["path"] == target["CurrentSymlink"] == "/etc/extensions/cluo-agent.raw"
    assert re.fullmatch(re.escape(target["Path"]) + "/" + pattern, link["target"]), link
    assert link["target"] in files_by_path(config)
    assert target["Type"] == "regular-file"
    assert int(target["InstancesMax"]) >= 2  # the merged image and the next one


@pytest.mark.skipif(shutil.which("ignition-validate") is None,
                    reason="ignition-validate is missing (Debian package ignition)")
def test_ignition_validate_accepts_the_config_with_sysupdate(tmp_path: Path) -> None:
    # Spec 3.3.0: Debian's ignition-validate 2.14 knows no newer spec.
    out = tmp_path / "node.ign"
    result = generate("--artifact-url", URL, "--artifact-sha512", SHA,
                      "--sysupdate-url", STORE, "-o", out)
    assert result.returncode == 0, result.stderr

    validated = subprocess.run(["ignition-validate", str(out)], capture_output=True,
                               text=True, timeout=60, check=False)
    assert validated.returncode == 0, validated.stdout + validated.stderr


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
def test_butane_template_says_the_same_as_the_ignition_config(spec: str) -> None:
    args = ["--artifact-url", URL, "--artifact-sha512", SHA,
            "--node-setting", "drain-timeout=15m", "--node-setting", "log-level=debug",
            "--spec", spec]
    ignition = config_for(*args[4:])
    result = generate(*args, "--format", "butane")
    assert result.returncode == 0, result.stderr

    assert re.search(r"@[A-Z0-9_]+@", result.stdout) is None, "a placeholder was left unfilled"
    # YAML 1.1 reads 0644 as octal, as butane does.
    assert comparable(butane_to_ignition(yaml.safe_load(result.stdout))) == comparable(ignition)


@pytest.mark.parametrize("spec", ["3.3.0", "3.4.0"])
def test_butane_with_sysupdate_says_the_same_as_the_ignition_config(spec: str) -> None:
    args = ["--artifact-url", URL, "--artifact-sha512", SHA,
            "--sysupdate-url", STORE, "--spec", spec]
    ignition = config_for(*args[4:])
    result = generate(*args, "--format", "butane")
    assert result.returncode == 0, result.stderr

    assert re.search(r"@[A-Z0-9_]+@", result.stdout) is None, "a placeholder was left unfilled"
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
        (["--artifact-url", URL, "--artifact-sha512", SHA,
          "--node-setting", "log-level=info", "--node-setting", "LOG_LEVEL=debug"],
         "--node-setting: 'LOG_LEVEL' is given twice"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--sysupdate-url", "ftp://x/cluo"],
         "--sysupdate-url: 'ftp://x/cluo' is not a URL systemd-sysupdate can fetch"),
        (["--artifact-url", URL, "--artifact-sha512", SHA, "--sysupdate-url", "https://x/a b"],
         "--sysupdate-url: 'https://x/a b' has white space"),
        (["--artifact-url", "https://x/cluo-agent-1.2.3-x86-64-_any.raw",
          "--artifact-sha512", SHA, "--sysupdate-url", STORE],
         "--sysupdate-url: the first image 'cluo-agent-1.2.3-x86-64-_any.raw' is not named "
         "cluo-agent-VERSION-x86-64.raw"),
    ],
)
def test_bad_input_exits_2_naming_it(args: list[str], message: str) -> None:
    result = generate(*args)

    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_node_setting_keys_are_the_agents_flags() -> None:
    flags = tool.agent_flags()

    assert {"drain-timeout", "node-name", "log-level", "annotation-prefix"} <= flags
    assert "help" not in flags
