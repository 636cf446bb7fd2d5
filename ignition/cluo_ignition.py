#!/usr/bin/env python3
"""Generate the Ignition config (or its Butane source) that installs cluo-agent on Flatcar.

    python ignition/cluo_ignition.py \\
        --artifact-url https://example.com/cluo-agent-0.1.0-x86-64.raw \\
        --artifact build/cluo-agent-0.1.0-x86-64.raw \\
        --node-setting drain-timeout=15m -o node.ign

What the config does on the node's first boot (docs/install.md):

- downloads the systemd-sysext image to /opt/extensions/cluo-agent/NAME.raw, checked by its
  sha512, and links /etc/extensions/cluo-agent.raw to it (systemd-sysext merges it into /usr);
- writes /etc/cluo/agent.env (CLUO_AGENT_* settings), which points the agent at the kubelet's
  own kubeconfig, /etc/kubernetes/kubelet.conf unless ``--node-setting kubeconfig=PATH``
  names another file on the node;
- installs units/cluo-agent.service and enables it, enables update-engine.service and masks
  locksmithd.service;
- with ``--sysupdate-url BASE_URL`` (opt-in), also the systemd-sysupdate transfer file
  /etc/sysupdate.cluo-agent.d/cluo-agent.conf (ignition/sysupdate/, images from BASE_URL)
  and units/cluo-sysupdate.service with its timer, enabled: a newer image is downloaded
  and announced by /run/reboot-required, so cluo-agent reboots into it once the
  coordinator grants a slot (docs/install.md "Sysext updates").

The config holds no credential: the agent acts as its node, with the kubelet's credential,
which the kubelet renews itself (docs/security.md).

`--format ignition` (the default) writes Ignition JSON, spec 3.3.0 (`--spec 3.4.0` for the
newer spec, which every Flatcar channel accepts). `--format butane` fills the placeholders
of ignition/cluo-agent.bu instead. Bad input exits with status 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout: the agent's config module
    sys.path.insert(0, str(ROOT))

from cluo.errors import ConfigError  # noqa: E402
from cluo_host import config as agent_config  # noqa: E402

UNIT_FILE = ROOT / "units" / "cluo-agent.service"
BUTANE_TEMPLATE = HERE / "cluo-agent.bu"
TRANSFER_TEMPLATE = HERE / "sysupdate" / "cluo-agent.conf"
SYSUPDATE_UNITS = ("cluo-sysupdate.service", "cluo-sysupdate.timer")  # the timer is enabled

EXTENSIONS_DIR = "/opt/extensions/cluo-agent"
EXTENSION_LINK = "/etc/extensions/cluo-agent.raw"
CONFIG_DIR = "/etc/cluo"
# kubeadm's kubeconfig of the kubelet; its client certificate is the kubelet's own,
# /var/lib/kubelet/pki/kubelet-client-current.pem, rotated by the kubelet.
KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
AGENT_ENV_PATH = "/etc/cluo/agent.env"
# systemd-sysupdate's component cluo-agent: `systemd-sysupdate --component=cluo-agent`.
TRANSFER_PATH = "/etc/sysupdate.cluo-agent.d/cluo-agent.conf"
SYSUPDATE_URL_SCHEMES = ("http", "https")  # what systemd-sysupdate's url-file source fetches

# Ignition spec -> the Butane flatcar variant version that produces it.
SPECS = {"3.3.0": "1.0.0", "3.4.0": "1.1.0"}
DEFAULT_SPEC = "3.3.0"
URL_SCHEMES = ("http", "https", "s3", "gs", "tftp")
# File modes; Ignition JSON wants them in decimal.
MODE_FILE = 0o644  # 420
MODE_DIR = 0o755  # 493

ARTIFACT_NAME_RE = re.compile(r"^cluo-agent-[A-Za-z0-9][A-Za-z0-9._+~-]*\.raw$")
# The transfer file's MatchPattern=cluo-agent-@v-%a.raw on x86-64: the first image must
# match it too, or systemd-sysupdate would not know it as an installed version.
SYSUPDATE_NAME_RE = re.compile(r"^cluo-agent-[A-Za-z0-9][A-Za-z0-9._+~]*-x86-64\.raw$")
SHA512_RE = re.compile(r"^[0-9a-f]{128}$")
# Environment values written without quotes; anything else is double-quoted.
PLAIN_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/@%+,=-]*$")
KUBECONFIG_VARIABLE = agent_config.ENV_PREFIX + "KUBECONFIG"
# Options of earlier versions that put a credential into the config.
NO_CREDENTIAL = (
    "the config carries no credential: cluo-agent uses its node's kubelet credential "
    f"({KUBELET_KUBECONFIG}; docs/security.md). To name another kubeconfig on the node: "
    "--node-setting kubeconfig=PATH"
)


class InputError(ValueError):
    """Input the config cannot be made from; the message names the input and the problem."""


@dataclass(frozen=True)
class Inputs:
    artifact_url: str
    artifact_sha512: str
    settings: Mapping[str, str] = field(default_factory=dict)  # CLUO_AGENT_* -> value
    spec: str = DEFAULT_SPEC
    sysupdate_url: str | None = None  # where systemd-sysupdate finds newer images, if at all

    @property
    def artifact_name(self) -> str:
        return artifact_name(self.artifact_url)

    @property
    def artifact_path(self) -> str:
        return f"{EXTENSIONS_DIR}/{self.artifact_name}"


# --- checking the input -------------------------------------------------------------------


def check_url(url: str, what: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in URL_SCHEMES or not (parsed.netloc or parsed.scheme == "tftp"):
        raise InputError(
            f"{what}: {url!r} is not a URL Ignition can fetch "
            f"(schemes: {', '.join(URL_SCHEMES)})"
        )
    return url


def artifact_name(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not ARTIFACT_NAME_RE.match(name):
        raise InputError(
            f"--artifact-url: the file name {name!r} is not an artifact name like "
            "cluo-agent-0.1.0-x86-64.raw (hack/build-agent-artifact.sh makes it)"
        )
    return name


def check_sha512(text: str, what: str) -> str:
    value = text.strip().lower()
    if value.startswith("sha512-"):
        value = value[len("sha512-"):]
    if not SHA512_RE.match(value):
        raise InputError(f"{what}: {text!r} is not a sha512 (128 hex digits)")
    return value


def check_sysupdate_url(url: str, artifact: str) -> str:
    """The folder URL for the transfer file's [Source] Path=, without a trailing slash."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in SYSUPDATE_URL_SCHEMES or not parsed.netloc:
        raise InputError(
            f"--sysupdate-url: {url!r} is not a URL systemd-sysupdate can fetch "
            f"(schemes: {', '.join(SYSUPDATE_URL_SCHEMES)})"
        )
    if any(char.isspace() or ord(char) < 32 for char in url):
        raise InputError(f"--sysupdate-url: {url!r} has white space or control characters")
    if not SYSUPDATE_NAME_RE.match(artifact):
        raise InputError(
            f"--sysupdate-url: the first image {artifact!r} is not named "
            "cluo-agent-VERSION-x86-64.raw, so systemd-sysupdate would not see it installed"
        )
    return url.rstrip("/")


def raise_if_other_file(named: str, artifact: str) -> None:
    if named.lstrip("*") != artifact:
        raise InputError(
            f"--artifact-sha512: the sum is for {named!r}, not for {artifact!r}"
        )


def file_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    try:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise InputError(f"--artifact: cannot read {str(path)!r}: {err.strerror}") from None
    return digest.hexdigest()


def settings_from(pairs: Sequence[str]) -> dict[str, str]:
    """CLUO_AGENT_* variables from KEY=VALUE pairs, checked as the agent itself would.

    KEY is a flag of cluo-agent (`drain-timeout`, `--drain-timeout`, `drain_timeout`) or its
    variable (`CLUO_AGENT_DRAIN_TIMEOUT`). The kubeconfig is the kubelet's unless a setting
    names another.
    """
    flags = agent_flags()
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--node-setting: {pair!r} is not KEY=VALUE")
        flag = key.strip()
        if flag.upper().startswith(agent_config.ENV_PREFIX):
            flag = flag[len(agent_config.ENV_PREFIX):]
        flag = flag.lstrip("-").lower().replace("_", "-")
        if flag not in flags:
            raise InputError(
                f"--node-setting: {key!r} is not a cluo-agent flag "
                f"(known: {', '.join(sorted(flags))})"
            )
        if any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise InputError(f"--node-setting: the value of {key!r} has control characters")
        variable = agent_config.ENV_PREFIX + flag.upper().replace("-", "_")
        if variable in given:
            raise InputError(f"--node-setting: {key!r} is given twice")
        given[variable] = value
    settings = {KUBECONFIG_VARIABLE: KUBELET_KUBECONFIG, **given}
    # The agent's own checks, on the values as it will read them. The node name defaults to
    # the node's hostname, which this machine does not know: a stand-in when it is not set.
    environment = {agent_config.ENV_PREFIX + "NODE_NAME": "node", **settings}
    try:
        agent_config.load_settings([], environment)
    except ConfigError as err:
        raise InputError(f"--node-setting: {err}") from None
    return settings


def agent_flags() -> set[str]:
    """cluo-agent's flags without the dashes (`drain-timeout`), from its own declarations."""
    return {flag.removeprefix("--") for flag in agent_config.LOADER.flags()}


# --- the config ------------------------------------------------------------------------


def data_url(content: str) -> str:
    return "data:," + urllib.parse.quote(content, safe="")


def agent_env(settings: Mapping[str, str]) -> str:
    lines = [
        "# cluo-agent's settings (CLUO_AGENT_<FLAG>=value), read through the unit's",
        "# EnvironmentFile=. See docs/agent.md.",
    ]
    for variable, value in settings.items():
        if PLAIN_VALUE_RE.match(value):
            lines.append(f"{variable}={value}")
        else:
            quoted = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{variable}="{quoted}"')
    return "\n".join(lines) + "\n"


def unit_text(name: str = UNIT_FILE.name) -> str:
    return (UNIT_FILE.parent / name).read_text()


def transfer_text(source_url: str) -> str:
    """ignition/sysupdate/cluo-agent.conf with its [Source] Path= filled in."""
    return TRANSFER_TEMPLATE.read_text().replace("@SOURCE_URL@", source_url)


def sysupdate_units() -> list[dict[str, Any]]:
    return [{"name": name, **({"enabled": True} if name.endswith(".timer") else {}),
             "contents": unit_text(name)} for name in SYSUPDATE_UNITS]


def build_config(inputs: Inputs) -> dict[str, Any]:
    """The Ignition config, as the dict that becomes its JSON."""
    if inputs.spec not in SPECS:
        raise InputError(f"--spec: {inputs.spec!r} is not one of {', '.join(SPECS)}")
    sysupdate_files: list[dict[str, Any]] = []
    sysupdate_unit_entries: list[dict[str, Any]] = []
    if inputs.sysupdate_url is not None:
        sysupdate_files = [{
            "path": TRANSFER_PATH,
            "mode": MODE_FILE,
            "contents": {"source": data_url(transfer_text(inputs.sysupdate_url))},
        }]
        sysupdate_unit_entries = sysupdate_units()
    return {
        "ignition": {"version": inputs.spec},
        "storage": {
            "directories": [
                {"path": EXTENSIONS_DIR, "mode": MODE_DIR},
                {"path": CONFIG_DIR, "mode": MODE_DIR},
            ],
            "files": [
                {
                    "path": inputs.artifact_path,
                    "mode": MODE_FILE,
                    "contents": {
                        "source": inputs.artifact_url,
                        "verification": {"hash": f"sha512-{inputs.artifact_sha512}"},
                    },
                },
                {
                    "path": AGENT_ENV_PATH,
                    "mode": MODE_FILE,
                    "contents": {"source": data_url(agent_env(inputs.settings))},
                },
                *sysupdate_files,
            ],
            "links": [{"path": EXTENSION_LINK, "target": inputs.artifact_path, "hard": False}],
        },
        "systemd": {
            "units": [
                {"name": "locksmithd.service", "mask": True},
                {"name": "update-engine.service", "enabled": True},
                {"name": "cluo-agent.service", "enabled": True, "contents": unit_text()},
                *sysupdate_unit_entries,
            ]
        },
    }


def render_butane(inputs: Inputs, template: str | None = None) -> str:
    """ignition/cluo-agent.bu with its placeholders filled."""
    if inputs.spec not in SPECS:
        raise InputError(f"--spec: {inputs.spec!r} is not one of {', '.join(SPECS)}")
    env_lines = agent_env(inputs.settings).splitlines()[2:]  # the header is in the template
    values = {
        "BUTANE_VERSION": SPECS[inputs.spec],
        "ARTIFACT_NAME": inputs.artifact_name,
        "ARTIFACT_URL": json.dumps(inputs.artifact_url),
        "ARTIFACT_SHA512": inputs.artifact_sha512,
        "AGENT_ENV": "\n".join(env_lines),
        "AGENT_UNIT": unit_text(),
        "SYSUPDATE_FILES": "",
        "SYSUPDATE_UNITS": "",
    }
    if inputs.sysupdate_url is not None:
        values["SYSUPDATE_FILES"] = butane_file(
            TRANSFER_PATH, transfer_text(inputs.sysupdate_url))
        values["SYSUPDATE_UNITS"] = "".join(
            butane_unit(unit["name"], unit["contents"], unit.get("enabled"))
            for unit in sysupdate_units())
    text = template if template is not None else BUTANE_TEMPLATE.read_text()
    # Drop the template's own header comment (it documents the placeholders).
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant:"))
    out: list[str] = ["# Generated by ignition/cluo_ignition.py from ignition/cluo-agent.bu."]
    for line in lines[start:]:
        match = re.fullmatch(r"(\s*)@([A-Z0-9_]+)@", line)
        if match:  # a placeholder alone on its line: a block, indented as the placeholder
            block = values[match.group(2)]
            out.extend(_indent(block, match.group(1)).splitlines() if block else [])
            continue
        out.append(re.sub(r"@([A-Z0-9_]+)@", lambda m: values[m.group(1)], line))
    return "\n".join(out) + "\n"


def butane_file(path: str, content: str) -> str:
    return (f"- path: {path}\n  mode: 0{MODE_FILE:o}\n  contents:\n    inline: |\n"
            + _indent(content, "      "))


def butane_unit(name: str, content: str, enabled: bool | None) -> str:
    enable = "  enabled: true\n" if enabled else ""
    return f"- name: {name}\n{enable}  contents: |\n" + _indent(content, "    ")


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


# --- the command line ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluo_ignition.py",
        description="Write the Ignition config (or Butane) that installs cluo-agent on a "
        "Flatcar node.",
    )
    add = parser.add_argument
    add("--artifact-url", required=True,
        help="where the node downloads cluo-agent-VERSION-x86-64.raw")
    add("--artifact-sha512", help="the image's sha512 (or the contents of its .sha512 file)")
    add("--artifact", type=Path, help="the built image: its sha512 is computed")
    add("--node-setting", action="append", default=[], metavar="KEY=VALUE",
        help="a cluo-agent flag for /etc/cluo/agent.env, e.g. drain-timeout=15m (repeatable); "
        f"kubeconfig=PATH: a kubeconfig on the node other than {KUBELET_KUBECONFIG}")
    for gone in ("--kubeconfig", "--kubeconfig-url", "--kubeconfig-sha512"):
        add(gone, dest=gone.removeprefix("--").replace("-", "_"), help=argparse.SUPPRESS)
    add("--sysupdate-url", metavar="BASE_URL",
        help="also install systemd-sysupdate's transfer file and cluo-sysupdate.timer: newer "
        "cluo-agent images are fetched from BASE_URL (with its SHA256SUMS) and installed for "
        "the next coordinated reboot")
    add("--spec", default=DEFAULT_SPEC, choices=list(SPECS), help="Ignition spec version")
    add("--format", default="ignition", choices=["ignition", "butane"])
    add("-o", "--output", type=Path, help="output file (default: stdout)")
    return parser


def inputs_from(args: argparse.Namespace) -> Inputs:
    url = check_url(args.artifact_url, "--artifact-url")
    artifact_name(url)
    if (args.artifact is None) == (args.artifact_sha512 is None):
        raise InputError("give exactly one of --artifact-sha512 and --artifact")
    if args.artifact is not None:
        sha512 = file_sha512(args.artifact)
        if args.artifact.name != artifact_name(url):
            raise InputError(
                f"--artifact: {args.artifact.name!r} is not the file --artifact-url names "
                f"({artifact_name(url)!r})"
            )
    else:
        # Also takes a line of the .sha512 file: "HEX  NAME".
        words = args.artifact_sha512.split()
        if len(words) > 1:
            raise_if_other_file(words[1], artifact_name(url))
        sha512 = check_sha512(words[0] if words else args.artifact_sha512, "--artifact-sha512")
    for gone in ("kubeconfig", "kubeconfig_url", "kubeconfig_sha512"):
        if getattr(args, gone) is not None:
            raise InputError(f"--{gone.replace('_', '-')}: {NO_CREDENTIAL}")
    sysupdate_url = (None if args.sysupdate_url is None
                     else check_sysupdate_url(args.sysupdate_url, artifact_name(url)))
    return Inputs(
        artifact_url=url,
        artifact_sha512=sha512,
        settings=settings_from(args.node_setting),
        spec=args.spec,
        sysupdate_url=sysupdate_url,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        inputs = inputs_from(args)
        if args.format == "butane":
            text = render_butane(inputs)
        else:
            text = json.dumps(build_config(inputs), indent=2) + "\n"
    except InputError as err:
        print(f"cluo_ignition.py: {err}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
