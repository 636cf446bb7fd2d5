"""Fixtures for end-to-end tests of cluo-agent on real systemd hosts.

A host is provisioned the way a Flatcar node is: `ignition/cluo_ignition.py` generates the
Ignition config (sysext image by URL + sha512, the link in /etc/extensions, kubeconfig,
agent.env, the unit, masks and enables), and the real Ignition applies it into the host's
root (`tests/testbed/ignition_apply.py`). What a Debian root lacks is then added:

- the image is the Debian-ID build of the artifact (ID=debian VERSION_ID=12; the Flatcar one
  does not merge on a Debian host), served over HTTP from loopback to Ignition;
- each boot of the host gets the machine's loop devices (`SysextHost`), so systemd-sysext
  merges the ``.raw`` that /etc/extensions/cluo-agent.raw links to, and
  systemd-sysext.service is enabled (the base root has it disabled);
- ``update-engine.service`` is a stand-in: the update_engine dbusmock template run by the
  host's own python3 (bookworm's python3-dbusmock 0.28.7) on the host's real system bus,
  with a D-Bus policy that, like Flatcar's, lets only root own and call com.coreos.update1;
- the agent is given the nspawn boot's id (see `BOOT_ID_UNIT`): its hardening would show it
  the machine kernel's, which does not change when an nspawn host reboots.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.testbed import ignition_apply
from tests.testbed.controlplane import ControlPlane
from tests.testbed.dbus_bus import UPDATE_ENGINE_TEMPLATE, mock_command
from tests.testbed.nspawn import (
    HostError,
    NspawnHost,
    build_base_root,
    loop_device_args,
)
from tests.testbed.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "hack" / "build-agent-artifact.sh"
GENERATOR = ROOT / "ignition" / "cluo_ignition.py"
DEPLOY = ROOT / "deploy"
AGENT_NAMESPACE = "cluo-system"
AGENT_SERVICE_ACCOUNT = "cluo-agent"
ARTIFACT_BUILD_TIMEOUT = 900
TOKEN_SECONDS = 3 * 3600
# Until systemd inside has finished booting: that includes cluo-agent.service's READY=1,
# which waits for the Node (the agent's start-up retries back off up to 30 s).
BOOT_TIMEOUT = 90.0

# Where the stand-in update_engine lives inside a host.
TEMPLATE_IN_HOST = "/usr/local/lib/cluo-test/update_engine.py"
UPDATE_ENGINE_UNIT = "update-engine.service"
UPDATE_ENGINE_POLICY = "/etc/dbus-1/system.d/com.coreos.update1.conf"
UPDATE_ENGINE_POLICY_XML = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- cluo test bed: as Flatcar's update_engine policy, only root owns and calls it. -->
<busconfig>
  <policy user="root">
    <allow own="com.coreos.update1"/>
    <allow send_destination="com.coreos.update1"/>
  </policy>
</busconfig>
"""


class SysextHost(NspawnHost):
    """An NspawnHost that hands the machine's loop devices to each boot, read at that boot.

    systemd-sysext inside attaches the image to a loop device, and systemd removes a loop
    device it allocated once done with it (LOOP_CTL_REMOVE, at the latest when the host
    shuts down), so /dev/loopN vanishes from the machine and a list made before the first
    boot breaks the next one ("Failed to stat /dev/loop1"). `losetup --find` first makes
    sure a free device exists: one the kernel creates later would be missing inside.
    """

    def boot(self) -> None:
        subprocess.run(["losetup", "--find"], capture_output=True, timeout=30, check=True)
        self.extra_args = tuple(loop_device_args())
        super().boot()


# nspawn gives each boot its own boot id by mounting a file over
# /proc/sys/kernel/random/boot_id. A unit with ProtectKernelTunables=yes or
# ProtectProc=invisible (cluo-agent has both) gets /proc remounted and sees the machine
# kernel's boot id instead, the same in every boot: the agent then never sees its host
# come back and reboots it again and again. On a real machine the kernel's id is the boot's.
# So the test bed copies the boot's id to /run at boot and binds it over the path for the
# agent, keeping every hardening setting of the unit as shipped.
BOOT_ID_COPY = "/run/cluo-testbed/boot_id"
BOOT_ID_UNIT = "cluo-testbed-boot-id.service"
BOOT_ID_UNIT_TEXT = f"""[Unit]
Description=Copy this boot's id (nspawn's) where hardened units can be given it (cluo test bed)
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mkdir -p /run/cluo-testbed
ExecStart=/bin/sh -c 'cat /proc/sys/kernel/random/boot_id >{BOOT_ID_COPY}'

[Install]
WantedBy=sysinit.target
"""
AGENT_BOOT_ID_DROPIN = "/etc/systemd/system/cluo-agent.service.d/50-cluo-testbed-boot-id.conf"
AGENT_BOOT_ID_DROPIN_TEXT = f"""# cluo test bed: this nspawn boot's id, not the machine kernel's.
[Unit]
Requires={BOOT_ID_UNIT}
After={BOOT_ID_UNIT}

[Service]
BindReadOnlyPaths={BOOT_ID_COPY}:/proc/sys/kernel/random/boot_id
"""


def update_engine_unit() -> str:
    command = shlex.join(mock_command(Path(TEMPLATE_IN_HOST), python="/usr/bin/python3"))
    return (
        "[Unit]\n"
        "Description=Stand-in update_engine: python-dbusmock template com.coreos.update1 "
        "(cluo test bed)\n"
        "After=dbus.service\n\n"
        "[Service]\n"
        "Type=dbus\n"
        "BusName=com.coreos.update1\n"
        f"ExecStart={command}\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


@dataclass(frozen=True)
class AgentImage:
    """The Debian-ID sysext image of cluo-agent, its sha512 and the tree it was packed from."""

    image: Path
    sha512: str
    tree: Path


@dataclass
class ProvisionedHost:
    """A booted host provisioned from its Ignition config."""

    host: NspawnHost
    config: dict[str, Any]
    summary: ignition_apply.ApplySummary
    root_problems: list[str]  # check_root right after provisioning: empty when it matched
    timings: dict[str, float]
    boot_id: str  # of the first boot
    boot_started: float  # time.monotonic() when it started

    def wait_until_running(self) -> str:
        """Wait until the first boot has finished (cluo-agent.service ready included)."""
        state = self.host.wait_until_running(BOOT_TIMEOUT)
        self.timings["boot"] = time.monotonic() - self.boot_started
        return state

    @property
    def name(self) -> str:
        return self.host.name


@pytest.fixture(scope="session")
def agent_base_root() -> Path:
    return build_base_root()


@pytest.fixture(scope="session")
def agent_image(tmp_path_factory: pytest.TempPathFactory) -> AgentImage:
    """hack/build-agent-artifact.sh with SYSEXT_ID=debian, once per session.

    PyInstaller's work tree is cached beside the other test-bed caches, so a warm build
    takes about 10 s.
    """
    work = Path(os.environ.get("CLUO_CACHE", "/var/cache/cluo")) / "agent-artifact-work"
    work.mkdir(parents=True, exist_ok=True)
    out = tmp_path_factory.mktemp("agent-image")
    result = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "OUT_DIR": str(out), "WORK_DIR": str(work),
             "VENV": str(Path(sys.executable).parent.parent), "SYSEXT_ID": "debian"},
        capture_output=True, text=True, timeout=ARTIFACT_BUILD_TIMEOUT, check=False,
    )
    assert result.returncode == 0, f"building the agent image failed:\n{result.stderr[-4000:]}"
    image = Path(result.stdout.strip().splitlines()[-1])
    sha512, name = image.with_name(image.name + ".sha512").read_text().split()
    assert name == image.name
    return AgentImage(image=image, sha512=sha512, tree=image.with_suffix(""))


@pytest.fixture(scope="session")
def artifact_url_base(agent_image: AgentImage) -> Iterator[str]:
    """An HTTP server on loopback serving the image, as an artifact store would."""
    with ignition_apply.serve_directory(agent_image.image.parent) as base:
        yield base


@pytest.fixture(scope="session")
def agent_kubeconfig_text(control_plane: ControlPlane) -> str:
    """A kubeconfig of the cluo-agent ServiceAccount (deploy/agent-rbac.yaml), self-contained:
    the CA embedded as certificate-authority-data, a real token."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "agent-rbac.yaml"))
    token = control_plane.service_account_token(
        AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, expiration_seconds=TOKEN_SECONDS
    )
    ca_data = base64.b64encode(control_plane.pki.ca_cert.read_bytes()).decode()
    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluo-test", "cluster": {
            "server": control_plane.url, "certificate-authority-data": ca_data}}],
        "users": [{"name": "cluo-agent", "user": {"token": token}}],
        "contexts": [{"name": "cluo-test",
                      "context": {"cluster": "cluo-test", "user": "cluo-agent"}}],
        "current-context": "cluo-test",
    })


def generate_config(
    image: AgentImage, url_base: str, kubeconfig: Path, out: Path, settings: Sequence[str]
) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(GENERATOR),
         "--artifact-url", f"{url_base}/{image.image.name}", "--artifact", str(image.image),
         "--kubeconfig", str(kubeconfig),
         *(arg for setting in settings for arg in ("--node-setting", setting)),
         "-o", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"cluo_ignition.py failed: {result.stderr}"
    config: dict[str, Any] = json.loads(out.read_text())
    return config


def add_update_engine_stand_in(host: NspawnHost) -> None:
    host.add_file(TEMPLATE_IN_HOST, UPDATE_ENGINE_TEMPLATE.read_text())
    host.add_file(UPDATE_ENGINE_POLICY, UPDATE_ENGINE_POLICY_XML)
    host.add_file(f"/etc/systemd/system/{UPDATE_ENGINE_UNIT}", update_engine_unit())


AgentHostFactory = Callable[..., ProvisionedHost]


@pytest.fixture
def agent_hosts(
    agent_base_root: Path,
    agent_image: AgentImage,
    artifact_url_base: str,
    agent_kubeconfig_text: str,
    tmp_path: Path,
) -> Iterator[AgentHostFactory]:
    """Factory: `make(name, settings=())` provisions a host from its Ignition config and
    starts its boot; it returns as soon as the boot id can be read.

    Not later: the boot does not finish (`wait_until_running`) before the agent is ready,
    and the agent is ready only once its Node exists, which the caller registers with this
    boot id. Hosts are destroyed afterwards."""
    hosts: list[NspawnHost] = []

    def make(name: str, settings: Sequence[str] = ()) -> ProvisionedHost:
        timings: dict[str, float] = {}
        started = time.monotonic()
        workdir = tmp_path / name
        workdir.mkdir()
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(agent_kubeconfig_text)
        kubeconfig.chmod(0o600)
        config_path = workdir / "node.ign"
        config = generate_config(agent_image, artifact_url_base, kubeconfig, config_path,
                                 settings)
        host = SysextHost(name, agent_base_root, workdir / "host")
        hosts.append(host)
        if ignition_apply.find_ignition() is not None:
            summary = ignition_apply.apply_with_ignition(host, config_path, workdir / "ignition")
        else:
            summary = ignition_apply.apply_with_python(host, config)
        add_update_engine_stand_in(host)
        host.add_file(f"/etc/systemd/system/{BOOT_ID_UNIT}", BOOT_ID_UNIT_TEXT)
        host.add_file(AGENT_BOOT_ID_DROPIN, AGENT_BOOT_ID_DROPIN_TEXT)
        host.enable_unit(BOOT_ID_UNIT)
        ignition_apply.apply_first_boot_presets(host)
        host.enable_unit("systemd-sysext.service")
        problems = ignition_apply.check_root(host, config)
        timings["provision"] = time.monotonic() - started
        booting = time.monotonic()
        host.boot()
        boot_id = wait_for(lambda: _boot_id_or_none(host), BOOT_TIMEOUT,
                           f"host {name} to start booting (its boot id readable)")
        timings["boot id"] = time.monotonic() - booting
        return ProvisionedHost(host, config, summary, problems, timings, boot_id, booting)

    yield make
    for host in hosts:
        host.destroy()


def _boot_id_or_none(host: NspawnHost) -> str | None:
    try:
        return host.boot_id()
    except HostError:  # no PID 1 yet, or not yet answering
        return None


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
