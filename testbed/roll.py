"""A rolling reboot of real systemd hosts, end to end: shared by tests/e2e and `make demo`.

Hosts are provisioned the way a Flatcar node is: `ignition/cluo_ignition.py` generates the
Ignition config (sysext image by URL + sha512, the link in /etc/extensions, agent.env,
the unit, masks and enables: no credential), and the real Ignition applies it into the
host's root (`testbed/ignition_apply.py`). What a Debian root lacks is then added:

- the kubelet's credential, where a kubeadm-built node has it (`install_kubelet_credential`):
  /etc/kubernetes/kubelet.conf naming /var/lib/kubelet/pki/kubelet-client-current.pem, a
  client certificate of system:node:<host name> signed by the test bed's CA. The agent
  uses it (agent.env points it there), confined to its own node (docs/security.md);

- the host is Flatcar-shaped (`testbed/flatcar.py`: Flatcar's os-release with
  ``SYSEXT_LEVEL=1.0`` and its update group), so systemd-sysext merges the release image
  (``ID=flatcar``), served over HTTP from loopback to Ignition, as a Flatcar node does;
- each boot of the host gets loop device nodes that work for any device the kernel hands
  out (`NspawnHost(loop_devices=True)`), and systemd-sysext.service is enabled (the base
  root has it disabled); after every boot the merge is checked (`sysext_problem`), so a
  host whose extension did not merge is reported at once, with systemd-sysext's journal;
- ``update-engine.service`` is a stand-in: the update_engine dbusmock template run by the
  host's own python3 (bookworm's python3-dbusmock 0.28.7) on the host's real system bus,
  with a D-Bus policy that, like Flatcar's, lets only root own and call com.coreos.update1;
- the agent is given the nspawn boot's id (see `BOOT_ID_UNIT`): its hardening would show it
  the machine kernel's, which does not change when an nspawn host reboots.

`Roll` then runs N such hosts against a real control plane, the kubelet
emulator following each host's up and down (`HostFollower`), the real ``cluo-coord`` with
the deploy/ RBAC and admission policy, update_engine reporting NEED_REBOOT on every host,
and the roll watched until every node rebooted once for real and was uncordoned. `InFlightRecorder`
(testbed/recorder.py) keeps the history (Node and slot Lease watches, ordered by
resourceVersion) that proves "never two in flight"; `Roll.snapshot()` is what the demo's
progress display shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client import (
    CoordinationV1Api,
    CoreV1Api,
    V1Container,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodSpec,
)
from kubernetes.client.exceptions import ApiException

from cluo.protocol import LEADER_LEASE_NAME, SLOT_LEASE_LABEL, Keys
from testbed import flatcar, ignition_apply
from testbed.controlplane import ControlPlane, node_credential_path
from testbed.coordinator import CoordProcess
from testbed.dbus_bus import UPDATE_ENGINE_TEMPLATE, mock_command
from testbed.kubelet import EmulatedNode, KubeletEmulator
from testbed.nspawn import (
    EXIT_REBOOT,
    HostError,
    NspawnHost,
    build_base_root,
)
from testbed.recorder import InFlightRecorder
from testbed.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "hack" / "build-agent-artifact.sh"
GENERATOR = ROOT / "ignition" / "cluo_ignition.py"
DEPLOY = ROOT / "deploy"
NAMESPACE = "cluo-system"  # the coordinator's (deploy/namespace.yaml)
COORD_SERVICE_ACCOUNT = "cluo-coord"
ARTIFACT_BUILD_TIMEOUT = 900
# Where kubeadm's kubelet keeps its kubeconfig and its (rotated) client certificate; the
# generated agent.env points the agent at the first (ignition/cluo_ignition.py).
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"
KUBELET_PEM = "/var/lib/kubelet/pki/kubelet-client-current.pem"
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
AGENT_UNIT = "cluo-agent.service"
UPDATE_ENGINE = ("com.coreos.update1", "/com/coreos/update1", "org.freedesktop.DBus.Mock")
NEED_REBOOT_STATUS = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
NEW_VERSION = "4152.2.0"
KEYS = Keys()


# --- provisioning one host ----------------------------------------------------------------


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


class RollError(RuntimeError):
    """The test bed could not be set up, or the roll did not finish as it should."""


@dataclass(frozen=True)
class AgentImage:
    """cluo-agent's release sysext image, its sha512 and the tree it was packed from."""

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


def cache_dir() -> Path:
    return Path(os.environ.get("CLUO_CACHE", "/var/cache/cluo"))


def build_agent_image(out: Path) -> AgentImage:
    """hack/build-agent-artifact.sh into `out`: the release image, as `make artifact` builds it.

    PyInstaller's work tree is cached beside the other test-bed caches, so a warm build
    takes about 10 s.
    """
    work = cache_dir() / "agent-artifact-work"
    work.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "OUT_DIR": str(out), "WORK_DIR": str(work),
             "VENV": str(Path(sys.executable).parent.parent)},
        capture_output=True, text=True, timeout=ARTIFACT_BUILD_TIMEOUT, check=False,
    )
    if result.returncode != 0:
        raise RollError(f"building the agent image failed:\n{result.stderr[-4000:]}")
    image = Path(result.stdout.strip().splitlines()[-1])
    sha512, name = image.with_name(image.name + ".sha512").read_text().split()
    if name != image.name:
        raise RollError(f"{image}.sha512 names {name}, not the image")
    return AgentImage(image=image, sha512=sha512, tree=image.with_suffix(""))


def _image_inputs_key() -> str:
    """A hash of what the image is built from: the agent's sources and the shared package
    it bundles, the build script, pyproject.toml and the virtualenv's installed
    distributions."""
    digest = hashlib.sha256()
    sources = sorted([*(ROOT / "cluo_host").rglob("*.py"), *(ROOT / "cluo").rglob("*.py")])
    for path in [*sources, BUILD, ROOT / "pyproject.toml"]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    site = sorted(Path(sys.executable).parent.parent.glob("lib/python*/site-packages/*.dist-info"))
    digest.update("\n".join(p.name for p in site).encode())
    return digest.hexdigest()[:16]


def cached_agent_image() -> AgentImage:
    """The release image from `$CLUO_CACHE/agent-image/KEY`, built there on first use.

    KEY hashes the image's inputs (`_image_inputs_key`), so a change to the agent builds a
    new one. Built into a temporary folder and renamed into place: a killed build leaves no
    half-made image behind."""
    cache = cache_dir() / "agent-image"
    final = cache / _image_inputs_key()
    if not final.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=cache))
        try:
            build_agent_image(building)
            building.rename(final)
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
            if not final.is_dir():  # not another process winning the rename
                raise
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    images = sorted(final.glob("cluo-agent-*.raw"))
    if len(images) != 1:
        raise RollError(f"{final} holds {len(images)} images, not one: remove the folder")
    image = images[0]
    sha512, _name = image.with_name(image.name + ".sha512").read_text().split()
    return AgentImage(image=image, sha512=sha512, tree=image.with_suffix(""))


def install_kubelet_credential(host: NspawnHost, control_plane: ControlPlane,
                               workdir: Path) -> None:
    """Put the credential of node ``host.name`` on the stopped ``host`` where kubeadm's
    kubelet keeps it: KUBELET_CONF (server, CA) naming KUBELET_PEM (certificate and key of
    system:node:<name>), both root-only."""
    kubeconfig = control_plane.node_kubeconfig(host.name, workdir / "kubelet.conf",
                                               credential_path=Path(KUBELET_PEM))
    host.add_file(KUBELET_CONF, kubeconfig.read_text(), 0o600)
    host.add_file(KUBELET_PEM, node_credential_path(kubeconfig).read_bytes(), 0o600)


def generate_config(
    image: AgentImage, url_base: str, out: Path, settings: Sequence[str],
    generator_args: Sequence[str] = (),
) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(GENERATOR),
         "--artifact-url", f"{url_base}/{image.image.name}", "--artifact", str(image.image),
         *(arg for setting in settings for arg in ("--node-setting", setting)),
         *generator_args, "-o", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        raise RollError(f"cluo_ignition.py failed: {result.stderr}")
    config: dict[str, Any] = json.loads(out.read_text())
    return config


def add_update_engine_stand_in(host: NspawnHost) -> None:
    host.add_file(TEMPLATE_IN_HOST, UPDATE_ENGINE_TEMPLATE.read_text())
    host.add_file(UPDATE_ENGINE_POLICY, UPDATE_ENGINE_POLICY_XML)
    host.add_file(f"/etc/systemd/system/{UPDATE_ENGINE_UNIT}", update_engine_unit())


def provision_host(
    name: str,
    *,
    base_root: Path,
    image: AgentImage,
    url_base: str,
    control_plane: ControlPlane,
    workdir: Path,
    settings: Sequence[str] = (),
    generator_args: Sequence[str] = (),
    on_made: Callable[[NspawnHost], None] = lambda _host: None,
) -> ProvisionedHost:
    """Provision host `name` in `workdir` from its Ignition config and start its first boot;
    return as soon as the boot id can be read.

    Not later: the boot does not finish (`wait_until_running`) before the agent is ready,
    and the agent is ready only once its Node exists, which the caller registers with this
    boot id. `on_made` gets the host as soon as it exists (for the caller's teardown);
    `generator_args` are more options of ignition/cluo_ignition.py (e.g. --sysupdate-url)."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    workdir.mkdir(parents=True)
    config_path = workdir / "node.ign"
    config = generate_config(image, url_base, config_path, settings, generator_args)
    host = NspawnHost(name, base_root, workdir / "host", loop_devices=True)
    on_made(host)
    flatcar.make_flatcar_shaped(host)
    if ignition_apply.find_ignition() is not None:
        summary = ignition_apply.apply_with_ignition(host, config_path, workdir / "ignition")
    else:
        summary = ignition_apply.apply_with_python(host, config)
    add_update_engine_stand_in(host)
    install_kubelet_credential(host, control_plane, workdir)
    host.add_file(f"/etc/systemd/system/{BOOT_ID_UNIT}", BOOT_ID_UNIT_TEXT)
    host.add_file(AGENT_BOOT_ID_DROPIN, AGENT_BOOT_ID_DROPIN_TEXT)
    host.enable_unit(BOOT_ID_UNIT)
    ignition_apply.apply_first_boot_presets(host)
    host.enable_unit("systemd-sysext.service")
    problems = ignition_apply.check_root(host, config)
    timings["provision"] = time.monotonic() - started
    booting = time.monotonic()
    host.boot()
    boot_id = wait_for(lambda: boot_id_or_none(host), BOOT_TIMEOUT,
                       f"host {name} to start booting (its boot id readable)")
    timings["boot id"] = time.monotonic() - booting
    problem = sysext_problem(host)
    if problem is not None:
        raise RollError(f"{name}, first boot: {problem}")
    return ProvisionedHost(host, config, summary, problems, timings, boot_id, booting)


SYSEXT_UNIT = "systemd-sysext.service"
SYSEXT_RELEASE = "/usr/lib/extension-release.d/extension-release.cluo-agent"
SYSEXT_TIMEOUT = 60.0


def sysext_problem(host: NspawnHost, timeout: float = SYSEXT_TIMEOUT) -> str | None:
    """None once systemd-sysext has merged cluo-agent's image in the host's current boot;
    else why not, with systemd-sysext's journal of this boot.

    systemd-sysext.service runs early in the boot (before sysinit.target): this waits until
    it has finished, one way or the other, so a host whose extension did not merge is
    reported within seconds of its boot, not when a roll times out.
    """

    def finished() -> str | None:
        try:
            state = host.run("systemctl", "show", "-p", "ActiveState", "--value", SYSEXT_UNIT,
                             check=False, timeout=5).stdout.strip()
        except HostError:  # the boot is not that far yet
            return None
        return state if state in ("active", "failed") else None

    state = wait_for(finished, timeout, f"{SYSEXT_UNIT} in host {host.name} to finish")
    merged = host.run("test", "-e", SYSEXT_RELEASE, check=False, timeout=5).returncode == 0
    if state == "active" and merged:
        return None
    journal = host.run("journalctl", "--boot", "--unit", SYSEXT_UNIT, "--no-pager",
                       "--output=short-monotonic", check=False, timeout=10).stdout
    return (f"systemd-sysext did not merge cluo-agent's image ({SYSEXT_UNIT} {state}, "
            f"{SYSEXT_RELEASE} {'present' if merged else 'missing'}); "
            f"journalctl -u {SYSEXT_UNIT} of this boot:\n{journal.strip()[-3000:]}")


def boot_id_or_none(host: NspawnHost) -> str | None:
    try:
        return host.boot_id()
    except HostError:  # no PID 1 yet, or not yet answering
        return None


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- following a host's boots -------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    boot_id: str
    started: float  # time.monotonic() when nspawn started it
    node_up: float  # when the emulated Node was booted with this id


class HostFollower:
    """Boots a host again whenever it reboots, and takes its emulated Node down and up with it.

    nspawn exits 133 -> the Node goes down (the emulator stops heartbeating, Ready=Unknown)
    -> the next boot starts -> once its boot id can be read the Node comes back with it, as
    a kubelet starting in the new boot would report. Stops at the first exit that is not a
    reboot; `error` holds what went wrong, if anything.
    """

    def __init__(self, host: NspawnHost, node: EmulatedNode, first_boot: Boot, *,
                 interval: float = 0.05) -> None:
        self.host = host
        self.node = node
        self.interval = interval
        self.boots: list[Boot] = [first_boot]
        self.exits: list[tuple[float, int]] = []  # (time.monotonic(), nspawn's status)
        self.error: BaseException | None = None
        # The OS version update_engine installed: the next boot runs it (flatcar.boot_into).
        self.installed_version: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"follow-{host.name}",
                                        daemon=True)

    def start(self) -> HostFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise HostError(f"the follower of host {self.host.name} did not stop")

    @property
    def down(self) -> bool:
        """Between nspawn's exit and the Node's return."""
        return bool(self.exits) and self.exits[-1][0] > self.boots[-1].node_up

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                code = self.host.poll()
                if code is None:
                    continue
                self.exits.append((time.monotonic(), code))
                self.node.shutdown()
                if code != EXIT_REBOOT:
                    return
                if self.installed_version is not None:
                    flatcar.boot_into(self.host, self.installed_version)
                started = time.monotonic()
                self.host.boot()
                old = self.boots[-1].boot_id
                new = wait_for(lambda old=old: _new_boot_id(self.host, old), BOOT_TIMEOUT,
                               f"host {self.host.name} to boot again after boot {old}")
                self.node.boot(new)
                self.boots.append(Boot(new, started, time.monotonic()))
                problem = sysext_problem(self.host)
                if problem is not None:
                    raise HostError(f"boot {len(self.boots)} of host {self.host.name}: "
                                    f"{problem}")
            except BaseException as err:  # reported by the roll
                self.error = err
                return


def _new_boot_id(host: NspawnHost, old: str) -> str | None:
    current = boot_id_or_none(host)
    return current if current and current != old else None


# --- the history ------------------------------------------------------------------------


# --- the roll -----------------------------------------------------------------------------


@dataclass
class RollSettings:
    hosts: int = 3
    prefix: str = "cluo-roll"  # nodes are PREFIX-1..N (PREFIX-RUNID-1.. with unique_names)
    unique_names: bool = True
    pods_per_node: int = 2
    pod_grace_seconds: int = 30  # x grace_period_scale
    grace_period_scale: float = 0.05
    roll_timeout: float = 300.0
    coord_flags: tuple[str, ...] = ("--reboot-timeout", "3m", "--resync-period", "1m")
    agent_settings: tuple[str, ...] = ()


@dataclass
class NodeView:
    """One node as the progress display shows it."""

    name: str
    phase: str
    agent_status: str
    pods_left: int
    pods_evicted: int
    boots: int
    cordoned: bool


@dataclass
class Snapshot:
    elapsed: float
    slot_holder: str | None
    nodes: list[NodeView]
    evicted: int


@dataclass
class NodeResult:
    name: str
    old_boot_id: str
    new_boot_ids: list[str]
    exits: list[int]
    granted_at: float | None
    rebooted_at: float | None  # nspawn's exit
    back_at: float | None  # the Node up with its new boot id
    released_at: float | None  # reboot-ok back to false


@dataclass
class RollResult:
    started: float  # time.monotonic() when NEED_REBOOT was announced
    finished: float
    nodes: list[NodeResult]
    max_in_flight: int
    grant_order: list[str]


class RollFailed(RollError):
    pass


@dataclass
class _Member:
    provisioned: ProvisionedHost
    node: EmulatedNode
    follower: HostFollower
    pods: list[str] = field(default_factory=list)

    @property
    def host(self) -> NspawnHost:
        return self.provisioned.host

    @property
    def name(self) -> str:
        return self.provisioned.name


class Roll:
    """The test bed of one rolling reboot: `setup()`, `run()`, `close()` (or `with`).

    Takes a running control plane; `Roll.own_control_plane()` starts one and stops it with
    the roll.
    """

    def __init__(self, control_plane: ControlPlane, workdir: Path,
                 settings: RollSettings | None = None,
                 log: Callable[[str], None] = lambda _line: None, *,
                 base_root: Path | None = None, image: AgentImage | None = None,
                 url_base: str | None = None) -> None:
        """`base_root`, `image` and `url_base` (where `image` is served) are built and
        served by `setup` unless given (pytest's session fixtures give them)."""
        self.control_plane = control_plane
        self._base_root = base_root
        self._image = image
        self._url_base = url_base
        self.workdir = workdir
        self.settings = settings or RollSettings()
        self.log = log
        self.run_id = uuid.uuid4().hex[:6]
        self.selector = f"cluo-roll={self.run_id}"
        self.namespace = f"roll-{self.run_id}"
        self.members: list[_Member] = []
        self.coord: CoordProcess | None = None
        self.recorder: InFlightRecorder | None = None
        self._hosts: list[NspawnHost] = []
        self._admin = control_plane.admin_api_client()
        self._core = CoreV1Api(self._admin)
        self._emulator: KubeletEmulator | None = None
        self._closers: list[Callable[[], None]] = []
        self._started: float | None = None
        self.timings: dict[str, float] = {}

    # -- set up ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        middle = f"-{self.run_id}" if self.settings.unique_names else ""
        return [f"{self.settings.prefix}{middle}-{i}" for i in range(1, self.settings.hosts + 1)]

    def setup(self) -> None:
        """Everything up to hosts whose agents are ready and a ready coordinator."""
        t0 = time.monotonic()
        self.log("applying deploy/ (namespace, coordinator RBAC, the agents' admission policy)")
        self.control_plane.kubectl(
            "apply", "-f", str(DEPLOY / "namespace.yaml"),
            "-f", str(DEPLOY / "coordinator-rbac.yaml"))
        self.control_plane.apply_agent_policy()
        self._clean_leases()
        base_root = self._base_root
        if base_root is None:
            self.log("building (or taking from the cache) the base root of the hosts")
            base_root = build_base_root()
        image = self._image
        if image is None:
            self.log("building cluo-agent's sysext image (or taking it from the cache)")
            image = cached_agent_image()
        self.timings["base root + image"] = time.monotonic() - t0
        url_base = self._url_base
        if url_base is None:
            server = ignition_apply.serve_directory(image.image.parent)
            url_base = server.__enter__()
            self._closers.append(lambda: server.__exit__(None, None, None))
        self._core.create_namespace(kubernetes.client.V1Namespace(
            metadata=V1ObjectMeta(name=self.namespace)))
        emulator = KubeletEmulator(self._admin, heartbeat_interval=2.0,
                                   grace_period_scale=self.settings.grace_period_scale)
        emulator.start()
        self._emulator = emulator
        t1 = time.monotonic()
        for name in self.names():
            self.log(f"provisioning {name} with Ignition and booting it")
            provisioned = provision_host(
                name, base_root=base_root, image=image, url_base=url_base,
                control_plane=self.control_plane, workdir=self.workdir / name,
                settings=self.settings.agent_settings, on_made=self._hosts.append)
            if provisioned.root_problems:
                raise RollError(f"{name}: the root does not match its Ignition config: "
                                f"{provisioned.root_problems}")
            node = emulator.add_node(name, boot_id=provisioned.boot_id,
                                     labels={"cluo-roll": self.run_id})
            first = Boot(provisioned.boot_id, provisioned.boot_started, time.monotonic())
            follower = HostFollower(provisioned.host, node, first)
            self.members.append(_Member(provisioned, node, follower))
        for member in self.members:
            state = member.provisioned.wait_until_running()
            if state != "running":
                failed = member.host.run("systemctl", "--failed", "--no-pager", check=False)
                raise RollError(f"{member.name} booted {state}:\n{failed.stdout}")
            member.follower.start()
        self.timings["hosts up"] = time.monotonic() - t1
        for index, member in enumerate(self.members):
            for number in range(self.settings.pods_per_node):
                pod = f"web-{index + 1}-{number + 1}"
                self._add_pod(member.name, pod)
                member.pods.append(pod)
        for member in self.members:
            self._wait_member(member, lambda m=member: self._agent_active(m)
                              and self.annotation(m.name, "status") == "UPDATE_STATUS_IDLE",
                              "cluo-agent.service active and mirroring update_engine's idle "
                              "status", 60)
        self.log("starting cluo-coord (deploy/ RBAC token, --max-concurrent 1)")
        coord_kubeconfig = self.control_plane.service_account_kubeconfig(
            NAMESPACE, COORD_SERVICE_ACCOUNT, self.workdir / "coord.kubeconfig")
        self.recorder = InFlightRecorder(self._admin, self.selector, NAMESPACE, KEYS).start()
        self.coord = CoordProcess.start(
            coord_kubeconfig, self.selector, self.workdir / "cluo-coord.log",
            identity="cluo-coord-roll", leader_elect=True, namespace=NAMESPACE,
            flags=("--max-concurrent", "1", *self.settings.coord_flags))
        self.timings["setup"] = time.monotonic() - t0

    def _add_pod(self, node: str, name: str) -> None:
        owner = V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web",
                                 uid="00000000-0000-0000-0000-0000000000aa", controller=True)
        self._core.create_namespaced_pod(self.namespace, V1Pod(
            metadata=V1ObjectMeta(name=name, labels={"app": "web"}, owner_references=[owner]),
            spec=V1PodSpec(node_name=node,
                           termination_grace_period_seconds=self.settings.pod_grace_seconds,
                           containers=[V1Container(name="c", image="pause")]),
        ))
        wait_for(lambda: self._core.read_namespaced_pod(name, self.namespace).status.phase
                 == "Running", 30, f"pod {name} Running on {node}")

    def _clean_leases(self) -> None:
        coordination = CoordinationV1Api(self._admin)
        coordination.delete_collection_namespaced_lease(NAMESPACE,
                                                        label_selector=SLOT_LEASE_LABEL)
        with contextlib.suppress(ApiException):
            coordination.delete_namespaced_lease(LEADER_LEASE_NAME, NAMESPACE)

    # -- observing -------------------------------------------------------------------------

    def annotation(self, node: str, key: str) -> str | None:
        annotations = self._core.read_node(node).metadata.annotations or {}
        return annotations.get(KEYS.prefix + key)

    def _agent_active(self, member: _Member) -> bool:
        return self.agent_property(member, "ActiveState") == "active"

    def agent_property(self, member: _Member, name: str) -> str:
        try:
            result = member.host.run("systemctl", "show", "-p", name, "--value", AGENT_UNIT,
                                     check=False, timeout=5)
        except HostError:  # between boots
            return ""
        return result.stdout.strip()

    def agent_journal(self, member: _Member, boot_id: str | None = None) -> list[dict[str, Any]]:
        text = member.host.journal(AGENT_UNIT, boot_id=boot_id, output="json")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _wait_member(self, member: _Member, predicate: Callable[[], Any], what: str,
                     timeout: float) -> None:
        try:
            wait_for(predicate, timeout, f"{member.name}: {what}", interval=0.2)
        except TimeoutError as err:
            journal = member.host.journal(AGENT_UNIT, output="short-monotonic")
            raise RollError(f"{err}\n--- journalctl -u {AGENT_UNIT} on {member.name}:\n"
                            f"{journal[-4000:]}") from None

    def snapshot(self) -> Snapshot:
        """What the progress display shows: who holds the slot, each node's phase, pods."""
        nodes = {n.metadata.name: n for n in self._core.list_node(
            label_selector=self.selector).items}
        leases = CoordinationV1Api(self._admin).list_namespaced_lease(
            NAMESPACE, label_selector=SLOT_LEASE_LABEL).items
        holders = [lease.spec.holder_identity for lease in leases
                   if lease.spec.holder_identity]
        pods = self._core.list_namespaced_pod(self.namespace).items
        live = {p.metadata.name for p in pods if not p.metadata.deletion_timestamp}
        views = []
        for member in self.members:
            node = nodes.get(member.name)
            annotations = (node.metadata.annotations or {}) if node else {}
            left = sum(1 for pod in member.pods if pod in live)
            cordoned = bool(node and node.spec.unschedulable)
            phase = self._phase(member, annotations, cordoned, member.name in holders)
            status = "" if member.follower.down else self.agent_property(member, "StatusText")
            views.append(NodeView(member.name, phase, status, left, len(member.pods) - left,
                                  len(member.follower.boots), cordoned))
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return Snapshot(elapsed, holders[0] if holders else None, views,
                        sum(v.pods_evicted for v in views))

    @staticmethod
    def _phase(member: _Member, annotations: dict[str, str], cordoned: bool,
               holds_slot: bool) -> str:
        def value(key: str) -> str | None:
            return annotations.get(KEYS.prefix + key)

        rebooted = len(member.follower.boots) > 1
        if member.follower.down:
            return "rebooting"
        if value("reboot-needed") != "true" and not rebooted:
            return "up to date"
        if not rebooted:
            if value("reboot-ok") != "true":
                return "slot acquired" if holds_slot else "waiting for slot"
            if value("reboot-in-progress") == "true":
                return "draining" if cordoned else "granted"
            return "granted"
        if value("reboot-needed") == "true" or value("reboot-in-progress") == "true":
            return "back, verifying"
        if value("reboot-ok") == "true" or holds_slot:
            return "releasing slot"
        if cordoned:
            return "uncordoning"
        return "done"

    # -- the roll ------------------------------------------------------------------------

    def announce_reboot_needed(self) -> None:
        """update_engine reports NEED_REBOOT on every host (busctl on each host's bus); the
        last-checked times order the coordinator's queue: host 1 first."""
        self._started = time.monotonic()
        for index, member in enumerate(self.members):
            member.follower.installed_version = NEW_VERSION
            member.host.run("busctl", "call", *UPDATE_ENGINE, "SetStatus", "xdssx",
                            str(1_700_000_000 + index), "1.0", NEED_REBOOT_STATUS, NEW_VERSION,
                            "300000000")

    def finished(self) -> bool:
        for member in self.members:
            if member.follower.error is not None:
                raise RollFailed(f"{member.name}: following its reboots failed: "
                                 f"{member.follower.error}")
            bad_exits = [code for _, code in member.follower.exits if code != EXIT_REBOOT]
            if bad_exits:
                raise RollFailed(f"{member.name}: systemd-nspawn exited with {bad_exits}, "
                                 "not 133 (reboot)")
            if len(member.follower.exits) > 1:
                raise RollFailed(f"{member.name} rebooted {len(member.follower.exits)} times")
        if self.coord is not None and self.coord.process.poll() is not None:
            raise RollFailed(f"cluo-coord exited with {self.coord.process.returncode}:\n"
                             f"{self.coord.log_tail()}")
        if self.recorder is not None and self.recorder.max_in_flight() > 1:
            raise RollFailed("two nodes were in flight at once")
        holders = CoordinationV1Api(self._admin).list_namespaced_lease(
            NAMESPACE, label_selector=SLOT_LEASE_LABEL).items
        if any(lease.spec.holder_identity for lease in holders):
            return False
        for member in self.members:
            node = self._core.read_node(member.name)
            annotations = node.metadata.annotations or {}
            if not (len(member.follower.boots) == 2 and not member.follower.down
                    and annotations.get(KEYS.reboot_needed) == "false"
                    and annotations.get(KEYS.reboot_ok) == "false"
                    and annotations.get(KEYS.reboot_in_progress) == "false"
                    and annotations.get(KEYS.agent_made_unschedulable) in (None, "false")
                    and not node.spec.unschedulable):
                return False
        return True

    def run(self, on_tick: Callable[[Snapshot], None] = lambda _s: None,
            tick: float = 0.5) -> RollResult:
        """Announce NEED_REBOOT everywhere and follow the roll until every node is done."""
        self.announce_reboot_needed()
        assert self._started is not None
        deadline = self._started + self.settings.roll_timeout
        last_tick = 0.0
        while not self.finished():
            now = time.monotonic()
            if now > deadline:
                raise RollFailed(
                    f"timed out after {self.settings.roll_timeout:g}s waiting for every node "
                    "to reboot once and be uncordoned (reboot-needed=false, reboot-ok=false, "
                    f"schedulable, slot free); last state:\n{self.describe()}")
            if now - last_tick >= tick:
                on_tick(self.snapshot())
                last_tick = now
            time.sleep(0.1)
        finished = time.monotonic()
        on_tick(self.snapshot())
        return self.result(finished)

    def result(self, finished: float) -> RollResult:
        assert self._started is not None and self.recorder is not None
        spans = self.recorder.grant_spans()
        nodes = []
        for member in self.members:
            follower = member.follower
            span = spans.get(member.name, [(None, None)])[0]
            nodes.append(NodeResult(
                name=member.name, old_boot_id=follower.boots[0].boot_id,
                new_boot_ids=[b.boot_id for b in follower.boots[1:]],
                exits=[code for _, code in follower.exits],
                granted_at=span[0], rebooted_at=follower.exits[0][0] if follower.exits else None,
                back_at=follower.boots[1].node_up if len(follower.boots) > 1 else None,
                released_at=span[1]))
        return RollResult(self._started, finished, nodes, self.recorder.max_in_flight(),
                          self.recorder.grant_order())

    def describe(self) -> str:
        """A plain account of the current state, for failure messages."""
        lines = []
        with contextlib.suppress(Exception):
            snap = self.snapshot()
            lines.append(f"slot holder: {snap.slot_holder}")
            for view in snap.nodes:
                lines.append(f"  {view.name}: {view.phase}; agent: {view.agent_status!r}; "
                             f"boots {view.boots}; pods left {view.pods_left}")
        for member in self.members:
            with contextlib.suppress(Exception):
                annotations = self._core.read_node(member.name).metadata.annotations or {}
                ours = {k.removeprefix(KEYS.prefix): v for k, v in annotations.items()
                        if k.startswith(KEYS.prefix)}
                lines.append(f"  {member.name} annotations: {ours}")
        if self.coord is not None:
            lines.append("--- cluo-coord log (tail):\n" + self.coord.log_tail(3000))
        return "\n".join(lines)

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the coordinator, the followers, the hosts, the emulator; delete what we made."""
        errors: list[str] = []

        def attempt(what: str, action: Callable[[], None]) -> None:
            try:
                action()
            except Exception as err:
                errors.append(f"{what}: {err!r}")

        if self.coord is not None:
            attempt("stopping cluo-coord", self.coord.stop)
        if self.recorder is not None:
            attempt("stopping the recorder", self.recorder.stop)
        for member in self.members:
            attempt(f"stopping the follower of {member.name}", member.follower.stop)
        for host in self._hosts:
            attempt(f"destroying host {host.name}", host.destroy)
        if self._emulator is not None:
            attempt("stopping the kubelet emulator",
                    lambda: self._emulator.stop(delete_nodes=True) if self._emulator else None)
        attempt("deleting the pods' namespace",
                lambda: self._core.delete_namespace(self.namespace))
        attempt("deleting slot leases", self._clean_leases)
        for closer in reversed(self._closers):
            attempt("closing", closer)
        self._admin.close()
        if errors:
            raise RollError("teardown failed: " + "; ".join(errors))

    def __enter__(self) -> Roll:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def own_control_plane() -> Iterator[ControlPlane]:
    """A control plane started for the roll, in /dev/shm, removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    plane = ControlPlane.start(Path(tempfile.mkdtemp(prefix="cluo-roll-cp-", dir=base)))
    try:
        yield plane
    finally:
        plane.cleanup()
