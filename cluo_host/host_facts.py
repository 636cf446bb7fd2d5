"""What the agent reads from its own host: boot id, os-release and the update group.

Everything is read below ``root`` (``/`` in production, a test folder in tests), so the
parsing is testable without a Flatcar machine.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from cluo.errors import ConfigError

BOOT_ID_PATH = "proc/sys/kernel/random/boot_id"
OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
# Flatcar's update.conf: the image's defaults, overridden by the admin's file.
UPDATE_CONF_PATHS = ("usr/share/flatcar/update.conf", "etc/flatcar/update.conf")


@dataclass(frozen=True)
class HostFacts:
    boot_id: str
    os_id: str
    os_version: str
    group: str


def parse_env_file(text: str) -> dict[str, str]:
    """Parse os-release / update.conf syntax: KEY=value lines, shell quoting, # comments."""
    values: dict[str, str] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw, comments=True)
        except ValueError:
            parts = [raw.strip().strip("\"'")]
        values[key.strip()] = " ".join(parts)
    return values


def read_boot_id(root: Path) -> str:
    path = root / BOOT_ID_PATH
    try:
        boot_id = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the boot id from {path}: {err}") from err
    if not boot_id:
        raise ConfigError(f"{path} is empty")
    return boot_id


def read_host_facts(root: Path = Path("/")) -> HostFacts:
    os_release: dict[str, str] = {}
    for relative in OS_RELEASE_PATHS:
        path = root / relative
        if path.is_file():
            os_release = parse_env_file(path.read_text(errors="replace"))
            break
    group = ""
    for relative in UPDATE_CONF_PATHS:  # later files override earlier ones
        path = root / relative
        if path.is_file():
            group = parse_env_file(path.read_text(errors="replace")).get("GROUP", group)
    return HostFacts(
        boot_id=read_boot_id(root),
        os_id=os_release.get("ID", ""),
        os_version=os_release.get("VERSION", os_release.get("VERSION_ID", "")),
        group=group,
    )
