"""The agent's Flatcar artifact: the sysext image, the Ignition config that installs it,
and the image merged and run inside a real systemd host."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.flatcar import make_flatcar_shaped
from testbed.nspawn import NspawnHost, build_base_root, unavailable_reason
from testbed.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "hack" / "build-agent-artifact.sh"
GENERATOR = ROOT / "ignition" / "cluo_ignition.py"
UNIT = ROOT / "units" / "cluo-agent.service"
URL_BASE = "https://artifacts.example.com/cluo"
BUILD_TIMEOUT = 900


def _missing_tools() -> str | None:
    probe = subprocess.run(
        [sys.executable, "-c", "import PyInstaller"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return "PyInstaller is missing: pip install -e '.[build]'"
    for tool, package in (("mksquashfs", "squashfs-tools"), ("unsquashfs", "squashfs-tools"),
                          ("ignition-validate", "ignition")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package})"
    return None


MISSING = _missing_tools()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@dataclass(frozen=True)
class Artifact:
    image: Path
    sha512: str
    tree: Path

    @property
    def url(self) -> str:
        return f"{URL_BASE}/{self.image.name}"


def build_artifact(out_dir: Path, work_dir: Path, **env: str) -> Artifact:
    result = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "OUT_DIR": str(out_dir), "WORK_DIR": str(work_dir),
             "VENV": str(Path(sys.executable).parent.parent), **env},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    image = Path(result.stdout.strip().splitlines()[-1])
    line = image.with_name(image.name + ".sha512").read_text().split()
    assert line[1] == image.name
    return Artifact(image=image, sha512=line[0], tree=image.with_suffix(""))


@pytest.fixture(scope="session")
def work_dir() -> Path:
    """PyInstaller's analysis cache, shared across sessions (a warm build takes seconds)."""
    path = Path(os.environ.get("CLUO_CACHE", "/var/cache/cluo")) / "agent-artifact-work"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory, work_dir: Path) -> Artifact:
    return build_artifact(tmp_path_factory.mktemp("artifact"), work_dir)


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "agent.kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:9\n"
        "    insecure-skip-tls-verify: true\n"
        "users:\n- name: cluo-agent\n  user:\n    token: not-a-real-token\n"
        "contexts:\n- name: c\n  context: {cluster: c, user: cluo-agent}\n"
        "current-context: c\n"
    )
    path.chmod(0o600)
    return path


def generate(artifact: Artifact, out: Path, *extra: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--artifact-url", artifact.url,
         "--artifact", str(artifact.image),
         "--node-setting", "drain-timeout=15m", "-o", str(out), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, object] = json.loads(out.read_text())
    return config


def image_hash(config: dict[str, object]) -> str:
    files = config["storage"]["files"]  # type: ignore[index]
    (entry,) = [f for f in files if f["path"].startswith("/opt/extensions/cluo-agent/")]
    hash_: str = entry["contents"]["verification"]["hash"]
    return hash_


def ignition_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ignition-validate", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


# --- the image --------------------------------------------------------------------------


def test_image_is_a_flatcar_sysext_with_a_bundle_that_runs(artifact: Artifact) -> None:
    assert re.fullmatch(r"cluo-agent-[0-9.]+-x86-64\.raw", artifact.image.name)
    # sysext-bakery's manifest, as systemd-sysupdate reads it: "<sha256> *<file>" or
    # "<sha256>  <file>", one line per image of the folder.
    sums = (artifact.image.parent / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256(artifact.image.read_bytes()).hexdigest()
    assert f"{digest}  {artifact.image.name}" in sums
    listing = subprocess.run(
        ["unsquashfs", "-lls", str(artifact.image)], capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout
    entries = {line.split()[-1] if "->" not in line else line.split()[-3]: line
               for line in listing.splitlines() if "squashfs-root" in line}
    assert "squashfs-root/usr/lib/cluo-agent/cluo-agent" in entries
    link = entries["squashfs-root/usr/bin/cluo-agent"]
    assert link.startswith("l") and link.endswith("-> ../lib/cluo-agent/cluo-agent")
    assert all(" root/root " in line for line in entries.values()), "mksquashfs -all-root"
    assert not any(path.startswith("squashfs-root/etc") for path in entries), "only /usr merges"
    # cluo's own API client: the kubernetes package (a test dependency) stays out.
    bundled = {path.split("/")[5] for path in entries
               if path.startswith("squashfs-root/usr/lib/cluo-agent/_internal/")}
    assert bundled, "the bundle's _internal folder is empty"
    assert not bundled & {"kubernetes", "urllib3", "requests", "pydantic", "oauthlib"}
    release = artifact.tree / "usr/lib/extension-release.d/extension-release.cluo-agent"
    assert release.read_text().splitlines() == [
        "ID=flatcar", "SYSEXT_LEVEL=1.0", "ARCHITECTURE=x86-64"
    ]

    help_ = subprocess.run([str(artifact.tree / "usr/bin/cluo-agent"), "--help"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert help_.returncode == 0, help_.stderr
    assert "--drain-timeout" in help_.stdout


# --- the Ignition config ------------------------------------------------------------------


def test_ignition_validate_accepts_the_generated_config(
    artifact: Artifact, tmp_path: Path
) -> None:
    config = generate(artifact, tmp_path / "node.ign")

    assert image_hash(config) == f"sha512-{artifact.sha512}"
    result = ignition_validate(tmp_path / "node.ign")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_rebuilt_artifact_changes_the_sha512_in_the_config(
    artifact: Artifact, tmp_path: Path, work_dir: Path
) -> None:
    before = generate(artifact, tmp_path / "before.ign")
    extra = tmp_path / "NOTICE"
    extra.write_text("a change to the image\n")
    rebuilt = build_artifact(tmp_path / "rebuilt", work_dir, EXTRA_FILE=str(extra))
    after = generate(rebuilt, tmp_path / "after.ign")

    assert rebuilt.image.name == artifact.image.name
    assert rebuilt.sha512 != artifact.sha512
    assert image_hash(before) == f"sha512-{artifact.sha512}"
    assert image_hash(after) == f"sha512-{rebuilt.sha512}"
    validation = ignition_validate(tmp_path / "after.ign")
    assert validation.returncode == 0, validation.stdout + validation.stderr


# --- inside a real systemd host ------------------------------------------------------------

NSPAWN_UNAVAILABLE = unavailable_reason()
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
EXPOSURE_RE = re.compile(r"Overall exposure level for cluo-agent\.service: (\d+\.\d+) (\w+)")


@pytest.fixture
def agent_host(artifact: Artifact, kubeconfig: Path, tmp_path: Path) -> Iterator[NspawnHost]:
    """A Flatcar-shaped host with the release image in /etc/extensions (as Ignition links
    it), the unit and a kubeconfig; its systemd-sysext merges the image at boot."""
    host = NspawnHost("cluo-sysext", build_base_root(), tmp_path / "host", loop_devices=True)
    try:
        make_flatcar_shaped(host)
        host.add_file("/etc/extensions/cluo-agent.raw", artifact.image.read_bytes())
        host.add_file("/etc/systemd/system/cluo-agent.service", UNIT.read_text())
        host.add_file("/etc/cluo/kubeconfig", kubeconfig.read_text(), 0o600)
        host.add_file("/etc/cluo/agent.env", "CLUO_AGENT_LOG_LEVEL=debug\n")
        host.enable_unit("systemd-sysext.service")
        host.boot()
        host.wait_until_running()
        yield host
    finally:
        host.destroy()


@pytest.mark.skipif(NSPAWN_UNAVAILABLE is not None, reason=NSPAWN_UNAVAILABLE or "")
def test_merged_agent_runs_hardened_and_reaches_the_bus_and_its_kubeconfig(
    agent_host: NspawnHost,
) -> None:
    host = agent_host
    assert "--drain-timeout" in host.run("cluo-agent", "--help").stdout
    assert host.run("readlink", "-f", "/usr/bin/cluo-agent").stdout.strip() == (
        "/usr/lib/cluo-agent/cluo-agent"
    )

    # logind lets a root caller holding CAP_SYS_BOOT, the only capability the unit keeps,
    # reboot without asking polkit. (systemd 252 even says yes without the capability,
    # since dbus-daemon does not pass capabilities on; newer logind may check them.)
    def can_reboot(*properties: str) -> str:
        return host.run("systemd-run", "--quiet", "--wait", "--pipe", *properties,
                        "busctl", "call", *LOGIND, "CanReboot").stdout.strip()

    assert can_reboot("-p", "CapabilityBoundingSet=CAP_SYS_BOOT") == 's "yes"'

    # The agent itself, under every hardening setting: it reads the 0600 kubeconfig and
    # gets as far as asking update_engine on the system bus (there is none in this host).
    host.run("systemctl", "start", "--no-block", "cluo-agent.service")

    def retrying() -> str | None:
        journal = host.journal("cluo-agent.service")
        return journal if "cannot reach update_engine, retrying" in journal else None

    journal = wait_for(retrying, 30, "cluo-agent to try update_engine")
    assert journal is not None
    assert "kubernetes client configured" in journal
    verbose = host.journal("cluo-agent.service", output="verbose")
    assert "ServiceUnknown" in verbose or "com.coreos.update1" in verbose, verbose[-3000:]
    assert "Permission denied" not in verbose and "Operation not permitted" not in verbose
    # The one file it writes, for Flatcar's login message: locked while it runs (the
    # profile's own check fails to take the lock), readable by any user.
    conf = "/run/update-engine/coordinator.conf"
    assert host.run("stat", "-c", "%a", conf).stdout.strip() == "644"
    assert "NAME=cluo-agent" in host.run("cat", conf).stdout
    assert host.run("flock", "--nonblock", "--exclusive", conf, "true",
                    check=False).returncode != 0
    # Type=notify + watchdog: it is alive and not READY (update_engine never answered).
    state = host.run("systemctl", "show", "-p", "ActiveState,SubState,NRestarts",
                     "cluo-agent.service").stdout
    assert "ActiveState=activating" in state and "NRestarts=0" in state, state

    security = host.run("systemd-analyze", "security", "--no-pager", "cluo-agent.service",
                        check=False)
    match = EXPOSURE_RE.search(security.stdout)
    assert match is not None, security.stdout[-2000:] + security.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security cluo-agent.service: {score} {match.group(2)}")
    assert score <= 3.0, security.stdout
