"""Provision a stopped `NspawnHost` root from an Ignition 3.x config, and check the result.

Two appliers, one result:

- `apply_with_ignition` runs the real Ignition (Debian's package ``ignition`` ships the
  binary at /usr/lib/dracut/modules.d/30ignition/ignition, 2.14, which reads spec 3.3.0):
  stage ``fetch`` with the ``file`` platform, then stage ``files`` with ``-root`` pointed
  at the host's root. Remote sources (the sysext image) are fetched over HTTP, checked
  against their ``verification.hash`` by Ignition itself: serve them with `serve_directory`.
- `apply_with_python` is a small stand-in for machines without that binary: files (``data:``
  URLs, ``http(s)``/``file`` URLs or a local-path mapping, sha512-verified), directories,
  symlinks and units, written as Ignition writes them.

Both leave enabled units as Ignition does: a line ``enable NAME`` in
/etc/systemd/system-preset/20-ignition.preset, which systemd applies on a machine's first
boot (empty /etc/machine-id). Test hosts have their machine id already, so
`apply_first_boot_presets` does that step (`NspawnHost.enable_unit`). Masked units are
symlinks to /dev/null, whether the unit exists in the root or not (locksmithd has none in a
Debian root).

`check_root` compares a root with the config (each file's content hash and mode, each
directory, link and unit state) and returns the differences: a test asserts it is empty.

Gotchas (Ignition 2.14 from Debian, verified on this machine):

- It is built with SELinux relabelling: after writing everything, stage ``files`` reads
  ROOT/etc/selinux/config and runs ``setfiles``. Debian has neither, so the stage "fails"
  after having written every file. `apply_with_ignition` gives it a disabled
  /etc/selinux/config and a no-op ``setfiles`` for the run, and removes the config after.
- ``-config-cache``, ``-state-file`` and ``-neednet`` default to /run: they are pointed at a
  scratch folder so nothing of this machine's /run is touched.
- It logs to the journal by default; ``-log-to-stdout`` keeps its log with the test.
- ``data:`` URLs with percent-encoding (the generator's agent.env) and base64 are both
  read. The generated config holds no credential: the test bed puts the kubelet's
  kubeconfig and client certificate on a host itself (testbed/roll.py), where kubeadm's
  kubelet would have them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.nspawn import NspawnHost

IGNITION_CANDIDATES = (
    os.environ.get("CLUO_IGNITION", ""),
    "/usr/lib/dracut/modules.d/30ignition/ignition",
)
PRESET_FILE = "/etc/systemd/system-preset/20-ignition.preset"
SELINUX_CONFIG = "/etc/selinux/config"
RESULT_FILE = "/etc/.ignition-result.json"
UNITS_DIR = "/etc/systemd/system"
DEFAULT_FILE_MODE = 0o644  # Ignition's defaults when a config gives no mode
DEFAULT_DIR_MODE = 0o755
IGNITION_TIMEOUT = 300.0  # fetching a 40 MB image from loopback takes well under a second
FETCH_TIMEOUT = 60.0

Config = Mapping[str, Any]


class ProvisioningError(RuntimeError):
    """The config could not be applied (bad source, hash mismatch, Ignition failed)."""


@dataclass
class ApplySummary:
    """What an applier did, in the config's own terms (paths as seen inside the host)."""

    applier: str  # Ignition's -version ("Ignition Debian 2.14.0+ds1-1+b6") or "python"
    files: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    units_written: list[str] = field(default_factory=list)
    units_masked: list[str] = field(default_factory=list)
    units_preset_enabled: list[str] = field(default_factory=list)
    log: str = ""


# --- sources -----------------------------------------------------------------------------


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:`` URL (RFC 2397), percent-encoded or base64."""
    if not url.startswith("data:") or "," not in url:
        raise ProvisioningError(f"not a data URL: {url[:60]!r}")
    header, _, payload = url[len("data:"):].partition(",")
    if header.split(";")[-1] == "base64":
        return base64.b64decode(urllib.parse.unquote(payload), validate=True)
    return urllib.parse.unquote_to_bytes(payload)


def fetch_source(source: str, local_sources: Mapping[str, Path] | None = None) -> bytes:
    """The contents a file's ``contents.source`` names.

    `local_sources` maps URLs to local files (a stand-in for an artifact server); otherwise
    ``data:``, ``file:`` and ``http(s):`` URLs are read directly.
    """
    if local_sources and source in local_sources:
        return Path(local_sources[source]).read_bytes()
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme == "data":
        return decode_data_url(source)
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path)).read_bytes()
    if scheme in ("http", "https"):
        with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT) as response:
            return bytes(response.read())
    raise ProvisioningError(f"cannot fetch {source[:80]!r}: no local mapping for {scheme}:")


def _sha512_of(data: bytes) -> str:
    return "sha512-" + hashlib.sha512(data).hexdigest()


def verified(path: str, data: bytes, contents: Mapping[str, Any]) -> bytes:
    """`data` if it matches ``contents.verification.hash``; ProvisioningError otherwise."""
    expected = (contents.get("verification") or {}).get("hash")
    if expected is None:
        return data
    algorithm = expected.split("-", 1)[0]
    if algorithm != "sha512":
        raise ProvisioningError(f"{path}: unsupported verification hash {expected[:20]!r}")
    actual = _sha512_of(data)
    if actual != expected.lower():
        raise ProvisioningError(
            f"{path}: the contents of {contents.get('source', '')[:80]!r} do not match the "
            f"config's hash: expected {expected[:30]}..., got {actual[:30]}..."
        )
    return data


@contextlib.contextmanager
def serve_directory(folder: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `folder` over HTTP on a free loopback port; yields the base URL (no slash).

    nspawn hosts and Ignition on this machine both reach it (hosts share the network).
    """
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="artifact-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# --- the real Ignition --------------------------------------------------------------------


def find_ignition() -> Path | None:
    """The Ignition binary (CLUO_IGNITION, or Debian's package), or None."""
    for candidate in IGNITION_CANDIDATES:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("ignition")
    return Path(found) if found else None


def ignition_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "-version"], capture_output=True, text=True,
                            timeout=30, check=False)
    return (result.stdout or result.stderr).strip()


def apply_with_ignition(
    host: NspawnHost, config_path: Path, scratch: Path, binary: Path | None = None
) -> ApplySummary:
    """Run Ignition's ``fetch`` and ``files`` stages for `config_path` into the host's root."""
    _require_stopped(host)
    binary = binary or find_ignition()
    if binary is None:
        raise ProvisioningError("no Ignition binary (Debian package ignition, or CLUO_IGNITION)")
    scratch.mkdir(parents=True, exist_ok=True)
    # No SELinux on Debian: let the final relabel step find nothing to do (see module doc).
    stub_dir = scratch / "bin"
    stub_dir.mkdir(exist_ok=True)
    setfiles = stub_dir / "setfiles"
    setfiles.write_text("#!/bin/sh\n# cluo testbed: no SELinux in a Debian test host\n"
                        "cat >/dev/null\n")
    setfiles.chmod(0o755)
    selinux_config = host.path(SELINUX_CONFIG)
    had_selinux_config = selinux_config.exists() or selinux_config.is_symlink()
    if not had_selinux_config:
        host.add_file(SELINUX_CONFIG, "SELINUX=disabled\nSELINUXTYPE=targeted\n")
    common = [
        "-platform", "file",
        "-config-cache", str(scratch / "ignition.json"),
        "-state-file", str(scratch / "state"),
        "-log-to-stdout",
        "-root", str(host.root),
    ]
    env = {
        "PATH": f"{stub_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "LANG": "C.UTF-8",
        "IGNITION_CONFIG_FILE": str(config_path),
    }
    log_parts = []
    try:
        for stage in ("fetch", "files"):
            extra = ["-neednet", str(scratch / "neednet")] if stage == "fetch" else []
            result = subprocess.run(
                [str(binary), *common, *extra, "-stage", stage],
                capture_output=True, text=True, env=env, timeout=IGNITION_TIMEOUT, check=False,
            )
            output = _without_journal_noise(result.stdout + result.stderr)
            log_parts.append(f"--- ignition -stage {stage} (status {result.returncode})\n{output}")
            if result.returncode != 0:
                raise ProvisioningError(
                    f"ignition stage {stage} failed with status {result.returncode}:\n"
                    + "\n".join(line for line in output.splitlines()
                                if "CRITICAL" in line or "ERROR" in line)[-4000:]
                )
    finally:
        if not had_selinux_config:
            selinux_config.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                selinux_config.parent.rmdir()
    config = json.loads(config_path.read_text())
    summary = _summary_from_config(config, ignition_version(binary))
    summary.log = "\n".join(log_parts)
    return summary


def _without_journal_noise(text: str) -> str:
    # Ignition tries the journal first for every line; on this machine there is none.
    return "\n".join(line for line in text.splitlines()
                     if "failed to log systemd journal entry" not in line)


# --- the small Python applier -------------------------------------------------------------


def apply_with_python(
    host: NspawnHost, config: Config, local_sources: Mapping[str, Path] | None = None
) -> ApplySummary:
    """Apply `config` as Ignition's ``files`` stage would, for machines without Ignition."""
    _require_stopped(host)
    storage = config.get("storage") or {}
    for directory in storage.get("directories") or []:
        target = host.path(directory["path"])
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(directory.get("mode", DEFAULT_DIR_MODE))
    for entry in storage.get("files") or []:
        path = entry["path"]
        contents = entry.get("contents") or {}
        if contents.get("compression"):
            raise ProvisioningError(f"{path}: compressed contents are not supported here")
        source = contents.get("source")
        data = verified(path, fetch_source(source, local_sources), contents) if source else b""
        if entry.get("append"):
            raise ProvisioningError(f"{path}: append is not supported here")
        host.add_file(path, data, entry.get("mode", DEFAULT_FILE_MODE))
    for link in storage.get("links") or []:
        if link.get("hard"):
            raise ProvisioningError(f"{link['path']}: hard links are not supported here")
        target = host.path(link["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            if not link.get("overwrite"):
                raise ProvisioningError(f"{link['path']} exists and overwrite is not set")
            target.unlink()
        target.symlink_to(link["target"])
    presets: list[str] = []
    for unit in (config.get("systemd") or {}).get("units") or []:
        name = unit["name"]
        if unit.get("contents") is not None:
            host.add_file(f"{UNITS_DIR}/{name}", unit["contents"])
        for dropin in unit.get("dropins") or []:
            host.add_file(f"{UNITS_DIR}/{name}.d/{dropin['name']}", dropin.get("contents", ""))
        if unit.get("mask"):
            host.mask_unit(name)
        if unit.get("enabled") is True:
            presets.append(f"enable {name}")
        elif unit.get("enabled") is False:
            presets.append(f"disable {name}")
    if presets:
        host.add_file(PRESET_FILE, "\n".join(presets) + "\n")
    return _summary_from_config(config, "python")


def _summary_from_config(config: Config, applier: str) -> ApplySummary:
    storage = config.get("storage") or {}
    units = (config.get("systemd") or {}).get("units") or []
    return ApplySummary(
        applier=applier,
        files=[f["path"] for f in storage.get("files") or []],
        directories=[d["path"] for d in storage.get("directories") or []],
        links=[link["path"] for link in storage.get("links") or []],
        units_written=[u["name"] for u in units if u.get("contents") is not None],
        units_masked=[u["name"] for u in units if u.get("mask")],
        units_preset_enabled=[u["name"] for u in units if u.get("enabled") is True],
    )


# --- after either applier -----------------------------------------------------------------


def preset_entries(host: NspawnHost) -> list[tuple[str, str]]:
    """(verb, unit) lines of Ignition's preset file in the host's root."""
    path = host.path(PRESET_FILE)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and not line.startswith("#"):
            entries.append((words[0], words[1]))
    return entries


def apply_first_boot_presets(host: NspawnHost) -> list[str]:
    """Enable the units Ignition's preset file enables, as a first boot would; returns them.

    Every such unit must exist in the root by now (e.g. a stand-in update-engine.service).
    """
    enabled = []
    for verb, unit in preset_entries(host):
        if verb == "enable":
            host.enable_unit(unit)
            enabled.append(unit)
    return enabled


def check_root(
    host: NspawnHost, config: Config, local_sources: Mapping[str, Path] | None = None
) -> list[str]:
    """Differences between the host's root and `config`; empty when the root matches.

    Files: regular, with the config's mode, and content whose sha512 is the verification
    hash (or that of the decoded ``data:`` URL, or of the mapped local file). Directories:
    present with their mode. Links: symlinks to their target. Units: written contents,
    masked (-> /dev/null), enabled (`systemctl --root is-enabled`).
    """
    problems: list[str] = []
    storage = config.get("storage") or {}
    for directory in storage.get("directories") or []:
        path = host.path(directory["path"])
        if not path.is_dir():
            problems.append(f"directory {directory['path']} is missing")
            continue
        _check_mode(problems, directory["path"], path,
                    directory.get("mode", DEFAULT_DIR_MODE))
    for entry in storage.get("files") or []:
        path = host.path(entry["path"])
        if path.is_symlink() or not path.is_file():
            problems.append(f"file {entry['path']} is missing or not a regular file")
            continue
        _check_mode(problems, entry["path"], path, entry.get("mode", DEFAULT_FILE_MODE))
        expected = _expected_hash(entry, local_sources)
        actual = _sha512_of(path.read_bytes())
        if expected != actual:
            problems.append(f"file {entry['path']}: content {actual[:20]}... "
                            f"is not the config's {expected[:20]}...")
    for link in storage.get("links") or []:
        path = host.path(link["path"])
        if not path.is_symlink():
            problems.append(f"link {link['path']} is not a symlink")
        elif os.readlink(path) != link["target"]:
            problems.append(f"link {link['path']} -> {os.readlink(path)}, "
                            f"not {link['target']}")
    for unit in (config.get("systemd") or {}).get("units") or []:
        name = unit["name"]
        unit_path = host.path(f"{UNITS_DIR}/{name}")
        if unit.get("contents") is not None and (
            unit_path.is_symlink() or not unit_path.is_file()
            or unit_path.read_text() != unit["contents"]
        ):
            problems.append(f"unit {name}: {UNITS_DIR}/{name} lacks the config's contents")
        masked = unit_path.is_symlink() and os.readlink(unit_path) == "/dev/null"
        if unit.get("mask") and not masked:
            problems.append(f"unit {name} is not masked")
        if unit.get("enabled") is True:
            state = _is_enabled(host, name)
            if state != "enabled":
                problems.append(f"unit {name} is {state!r}, not enabled")
    return problems


def _expected_hash(entry: Mapping[str, Any], local_sources: Mapping[str, Path] | None) -> str:
    contents = entry.get("contents") or {}
    declared = (contents.get("verification") or {}).get("hash")
    if declared:
        return str(declared).lower()
    source = contents.get("source")
    return _sha512_of(fetch_source(source, local_sources) if source else b"")


def _check_mode(problems: list[str], name: str, path: Path, mode: int) -> None:
    actual = stat.S_IMODE(path.stat().st_mode)
    if actual != mode:
        problems.append(f"{name}: mode {actual:o}, not {mode:o}")


def _is_enabled(host: NspawnHost, unit: str) -> str:
    result = subprocess.run(["systemctl", f"--root={host.root}", "is-enabled", unit],
                            capture_output=True, text=True, timeout=30, check=False)
    return (result.stdout.strip() or result.stderr.strip()) or f"status {result.returncode}"


def _require_stopped(host: NspawnHost) -> None:
    if host.running:
        raise ProvisioningError(f"provisioning host {host.name} needs it stopped")
