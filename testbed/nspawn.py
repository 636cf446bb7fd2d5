"""Real systemd hosts for the end-to-end tests: Debian roots booted with systemd-nspawn.

Each host runs a real systemd as PID 1 with a real system bus, logind and journald, shares the
machine's network (so services inside reach a kube-apiserver on 127.0.0.1) and reboots like a
machine: a logind ``Reboot(false)`` inside makes ``systemd-nspawn`` exit with status 133
(`EXIT_REBOOT`), and starting it again is the next boot, with a new boot id.

    base = build_base_root()                      # once per machine, cached
    host = NspawnHost("node-1", base, tmp_path / "node-1")
    host.add_file("/etc/systemd/system/x.service", unit_text)
    host.enable_unit("x.service")                 # both only while the host is stopped
    host.boot()
    host.wait_until_running(BOOT_TIMEOUT)
    host.run("busctl", "list")
    with RebootFollower(host):                    # boots it again after each reboot
        ...
        host.wait_for_reboot(old_boot_id, BOOT_TIMEOUT)
    host.destroy()                                # kill, unmount and remove the root

Verified on this machine (Debian bookworm, systemd 252, kernel 6.18, 2 CPUs, hybrid cgroups,
no systemd on the machine itself, as root), with other work running beside it:

- `build_base_root`: mmdebstrap of bookworm minbase plus `PACKAGES` takes 85-95 s (234 MB,
  9,300 files, without docs and translations); later calls return the cached root at once.
- A host's root: an overlayfs mount over the base takes 0.01 s and stores ~8 MB per boot;
  a copy (`cp -a --reflink=auto`, ext4 has no reflinks) took 1.2-13 s depending on the
  disk load. Hence overlay by default. systemd-sysext merges a directory extension on an
  overlay root too (overlay on overlay is within the kernel's stacking depth of 2).
- Boot to `systemctl is-system-running` = ``running``: 0.5-0.7 s.
- logind ``Reboot(false)`` inside → nspawn exits 133; ``PowerOff(false)`` → 0; the container's
  PID 1 killed → 1. Reboot turnaround (the call, nspawn's exit, the next boot running):
  0.7-0.8 s; nspawn exits 0.2 s after the call.
- The caller of ``Reboot`` may get no reply: 1 call in 3 ended with "Connection reset by
  peer" (status 1) as the bus went down, though the reboot happened.
- Every boot has a new ``/proc/sys/kernel/random/boot_id`` inside; the machine id stays.
- Journald inside persists to ROOT/var/log/journal/MACHINE_ID, which `journalctl -D` reads
  from outside, also while the host runs, across boots (``--boot=ID`` works).

Gotchas this module handles:

- With ``--keep-unit`` and no systemd on the machine, nspawn puts the container in the cgroup
  it was started from, under ``payload/`` and itself under ``supervisor/``. Started from the
  root cgroup, every container would share ``/payload`` and their systemds would manage each
  other's units. So each host is started from a cgroup of its own, ``/cluo-testbed/MACHINE``,
  in the cgroup2 hierarchy and in the ``name=systemd`` one (hybrid mode).
- Killing nspawn does not kill the container (its PID 1 is reparented, and ends as a zombie
  of the machine's init): `kill` SIGKILLs the container's PID 1 so nspawn reaps it and
  exits, then kills whatever is left in the host's cgroup and waits until it is empty.
- util-linux 2.38's nsenter has no ``--kill-child``: `run` starts nsenter in a new session
  and kills that process group on timeout, which takes the forked child inside with it.
- The root directory must be 0755: services running as other users (dbus's messagebus)
  cannot start otherwise (mkdtemp makes 0700).
- mmdebstrap as root mounts /proc, /sys and /dev into its target; it runs in a private mount
  namespace so a killed build leaves no mount (and deleting its debris cannot reach /dev).
- nspawn leaves image lock files in /run/systemd/nspawn/locks (here /run is no tmpfs):
  hosts run with ``SYSTEMD_NSPAWN_LOCK=0``.
- With ``--console=read-only`` there is no getty to wait for; gettys, networkd, timesyncd and
  the apt/fstrim/e2scrub timers are masked in the base root (`MASKED_UNITS`).

Needs root, Debian's ``systemd-container`` (systemd-nspawn, and systemctl for `enable_unit`),
``mmdebstrap`` and util-linux's ``nsenter``; see `unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Literal

from testbed.waiting import wait_for

log = logging.getLogger(__name__)

SUITE = "bookworm"
# What a host needs: a real systemd, system bus and logind; python3 with dbus-python and
# python-dbusmock for mock services (update_engine) running as units inside the host; curl,
# which Flatcar has, for the in-place update of docs/install.md.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "python3",
    "python3-dbus",
    "python3-dbusmock",
    "iproute2",
    "procps",
    "curl",
)
# No documentation or translations: a smaller root, and a faster storage="copy".
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
# Bump when `_customize_base_root` changes, so cached roots made by older code are rebuilt.
BASE_ROOT_LAYOUT = 1
BUILD_TIMEOUT = 900.0

# Units that make no sense in a test host or slow it down: consoles, the network setup (the
# host shares the machine's network and must not touch it) and periodic maintenance (apt would
# go to the network).
MASKED_UNITS = (
    "console-getty.service",
    "container-getty@.service",
    "getty@.service",
    "serial-getty@.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

EXIT_REBOOT = 133  # systemd-nspawn's status when the container rebooted
EXIT_POWEROFF = 0

BOOT_TIMEOUT = 60.0  # generous: a boot takes about a second
COMMAND_TIMEOUT = 30.0
KILL_TIMEOUT = 15.0

CGROUP_PARENT = "cluo-testbed"
NSPAWN_RUN_DIR = Path("/run/systemd/nspawn")
HOST_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
RUNNING_STATES = ("running", "degraded")
# The environment of commands run inside a host: theirs, not the test runner's.
HOST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_PAGER": "",
}


class HostError(RuntimeError):
    """A test host could not be built, booted, reached or torn down."""


def unavailable_reason() -> str | None:
    """Why nspawn hosts cannot run here, or None when they can (for pytest skips)."""
    if os.geteuid() != 0:
        return "nspawn hosts need root"
    for tool, package in (
        ("systemd-nspawn", "systemd-container"),
        ("systemctl", "systemd"),
        ("mmdebstrap", "mmdebstrap"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package}; see hack/install-deps.sh)"
    return None


# --- the base root ------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLUO_CACHE", "/var/cache/cluo")) / "rootfs"


def mmdebstrap(suite: str, packages: Sequence[str], target: Path) -> None:
    """Bootstrap a minimal Debian `suite` with `packages` into the empty folder `target`.

    As root, mmdebstrap mounts /proc, /sys and /dev into the target while it works. It runs
    in a private mount namespace here, so a build that dies leaves no mount on this machine
    (and removing its half-made target cannot reach into the machine's /dev).
    """
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        f"--include={','.join(packages)}",
        suite,
    ]
    command = ["unshare", "--mount", "--propagation=private", *argv, str(target)]
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as err:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise HostError(f"mmdebstrap of {suite} took over {BUILD_TIMEOUT:g}s") from err
    if proc.returncode != 0:
        raise HostError(
            f"{' '.join(argv)} {target} failed with status {proc.returncode}:\n{output[-4000:]}"
        )


Bootstrap = Callable[[str, Sequence[str], Path], None]


def build_base_root(
    cache_dir: Path | None = None,
    *,
    suite: str = SUITE,
    packages: Sequence[str] = PACKAGES,
    bootstrap: Bootstrap = mmdebstrap,
    lock_timeout: float = BUILD_TIMEOUT,
) -> Path:
    """Return a Debian root for test hosts, building it once and caching it in `cache_dir`.

    The cache key hashes the suite, the package list, `DPKG_OPTIONS` and `BASE_ROOT_LAYOUT`
    (so a change to any of them builds a new root beside the old ones). The root is
    built in a temporary folder and renamed into place, under a lock file, so concurrent
    callers wait for one build and a failed or killed build leaves no half-made root.
    Hosts lay an overlay over it (or copy it): never boot or change the base itself.
    """
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    spec = {
        "suite": suite,
        "packages": sorted(packages),
        "dpkg": DPKG_OPTIONS,
        "layout": BASE_ROOT_LAYOUT,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_dir / f"{suite}-{key}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{final.name}.lock", lock_timeout, f"the build of {final}"):
        if final.is_dir():  # built by whoever held the lock before us
            return final
        # Leftovers of builds that died: nobody else builds this key while we hold the lock.
        for stale in cache_dir.glob(f".build-{final.name}-*"):
            _remove_tree(stale)
        building = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=cache_dir))
        started = time.monotonic()
        try:
            bootstrap(suite, packages, building)
            _customize_base_root(building)
            building.chmod(0o755)  # mkdtemp made it 0700; non-root services need to traverse /
            building.rename(final)
        except BaseException:
            _remove_tree(building)
            raise
        log.info(
            "built base root",
            extra={"ROOT": str(final), "SECONDS": round(time.monotonic() - started, 1)},
        )
        return final


@contextlib.contextmanager
def _locked(path: Path, timeout: float, what: str) -> Iterator[None]:
    with path.open("a") as lock:

        def acquired() -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        wait_for(acquired, timeout, f"the lock {path} guarding {what}", interval=0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _customize_base_root(root: Path) -> None:
    """Make a bootstrapped root fit to be the base of test hosts."""
    system = root / "etc/systemd/system"
    system.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        for wanted in system.glob(f"*.wants/{unit}"):
            wanted.unlink()
        link = system / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    # Persistent journal, readable from outside with journalctl -D.
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    _write(
        root / "etc/systemd/journald.conf.d/cluo-testbed.conf", "[Journal]\nStorage=persistent\n"
    )
    # A unit stuck while stopping should not hold a test's reboot for the default 90 s.
    _write(
        root / "etc/systemd/system.conf.d/cluo-testbed.conf",
        "[Manager]\nDefaultTimeoutStopSec=15s\n",
    )
    # No machine identity in the base: each host writes its own.
    _write(root / "etc/machine-id", "")
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # root without a password (console logins for whoever debugs a host by hand).
    shadow = root / "etc/shadow"
    if shadow.exists():
        lines = shadow.read_text().splitlines()
        lines = [re.sub(r"^root:[^:]*:", "root::", line) for line in lines]
        shadow.write_text("\n".join(lines) + "\n")


def _checked(argv: Sequence[str], doing: str) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT * 4, check=False
    )
    if result.returncode != 0:
        raise HostError(f"{doing} failed with status {result.returncode}: {result.stderr}")


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    path.chmod(mode)


LOOP_MAJOR_FALLBACK = 7  # linux/major.h, where /proc/devices does not say
# Device nodes /dev/loop0..N-1 in a host that asks for loop devices: far more than the hosts of
# one test session use at once, and at least this many above the highest device in use.
LOOP_NODES = 64


def _loop_major() -> int:
    for line in Path("/proc/devices").read_text().splitlines():
        number, _sep, name = line.strip().partition(" ")
        if name == "loop" and number.isdigit():
            return int(number)
    return LOOP_MAJOR_FALLBACK


def _loop_part_shift() -> int:
    """How many minor bits each loop device keeps for partitions (the loop module's max_part)."""
    try:
        max_part = int(Path("/sys/module/loop/parameters/max_part").read_text())
    except (OSError, ValueError):
        return 0
    return max_part.bit_length() if max_part > 0 else 0


def loop_device_args(node_dir: Path, count: int = LOOP_NODES) -> list[str]:
    """nspawn arguments that give a host working loop devices, whatever the machine has.

    systemd-sysext inside a host asks /dev/loop-control for a free device
    (LOOP_CTL_GET_FREE, which makes a new one when none is free) and opens /dev/loopN. The
    host's /dev holds only what nspawn binds into it. Binding the machine's own /dev/loopN
    nodes (devtmpfs) gives it the devices that exist when it boots, and no others: when the
    kernel hands out a device made later (the others were taken meanwhile by other hosts, or
    removed by a host's shutdown), the open fails, systemd asks again and gets the same
    number, and after 64 tries it gives up with "Failed to set up loopback device: Device or
    resource busy" (systemd 252, src/shared/loop-util.c). The unit then fails with 203/EXEC.

    So the nodes are made here instead, with mknod in `node_dir` (on the machine's disk, not
    a devtmpfs): a device node names a device number, not a device, so /dev/loopN inside
    opens whatever device N the kernel has at that moment, including one made after the
    boot. `count` nodes are made, and at least LOOP_NODES above the highest device the
    machine has now, plus a bind of /dev/loop-control.
    """
    control = Path("/dev/loop-control")
    if not control.exists():
        raise HostError("/dev/loop-control is missing: the machine has no loop driver")
    in_use = [int(p.name.removeprefix("loop")) for p in Path("/sys/block").glob("loop*")
              if p.name.removeprefix("loop").isdigit()]
    count = max(count, max(in_use, default=-1) + 1 + LOOP_NODES)
    major, shift = _loop_major(), _loop_part_shift()
    node_dir.mkdir(parents=True, exist_ok=True)
    args = [f"--bind={control}"]
    for index in range(count):
        node = node_dir / f"loop{index}"
        device = os.makedev(major, index << shift)
        try:
            st = node.lstat()
        except FileNotFoundError:
            os.mknod(node, 0o660 | stat.S_IFBLK, device)
        else:
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != device:
                raise HostError(f"{node} exists and is not the loop device {major}:{index}")
        args.append(f"--bind={node}:/dev/loop{index}")
    return args


# --- cgroups ------------------------------------------------------------------------------


def _systemd_hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies nspawn uses: cgroup2 and name=systemd."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_part, _sep, fs_part = line.partition(" - ")
        mount_point = mount_part.split()[4].replace("\\040", " ")
        fstype, _source, options = [*fs_part.split(), "", "", ""][:3]
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            found.append(Path(mount_point))
    return found


class _HostCgroup:
    """The cgroup a host's nspawn starts from, in every hierarchy nspawn uses."""

    def __init__(self, name: str) -> None:
        self.paths = [h / CGROUP_PARENT / name for h in _systemd_hierarchies()]
        if not self.paths:
            raise HostError("no cgroup2 or name=systemd hierarchy is mounted")

    def create(self) -> list[Path]:
        """Create the cgroups; return the cgroup.procs files a process must join."""
        for path in self.paths:
            path.mkdir(parents=True, exist_ok=True)
        return [path / "cgroup.procs" for path in self.paths]

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for path in self.paths:
            for procs in path.rglob("cgroup.procs") if path.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def kill(self) -> None:
        """SIGKILL everything in the cgroups (nspawn, the container and anything inside)."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError, PermissionError, OSError):
                (path / "cgroup.kill").write_text("1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float, what: str) -> None:
        """Wait until no process is left in the cgroups, then remove them.

        rmdir can fail with EBUSY for a moment after the last process left (it is still
        exiting), so that is retried until `timeout`.
        """

        def removed() -> bool:
            if self.pids():
                return False
            for path in self.paths:
                if not path.is_dir():
                    continue
                nested = [p for p in path.rglob("*") if p.is_dir()]
                for cgroup in [*sorted(nested, key=lambda p: -len(p.parts)), path]:
                    try:
                        cgroup.rmdir()
                    except FileNotFoundError:
                        pass
                    except OSError as err:
                        if err.errno != errno.EBUSY:
                            raise
                        return False
                with contextlib.suppress(OSError):  # other hosts may still use the parent
                    path.parent.rmdir()
            return True

        wait_for(removed, timeout, f"the cgroups of {what} to be empty and removed")


# --- hosts --------------------------------------------------------------------------------


class NspawnHost:
    """One test host: its own root made from a base root, booted with systemd-nspawn.

    The constructor makes WORKDIR/root and gives it its own machine id and hostname (`name`,
    which must be a DNS label so it can also name a Kubernetes Node). With `storage`
    "overlay" (the default) the root is an overlayfs mounted there, `base_root` below and
    WORKDIR/overlay/upper on top: instant, and a host only stores what it changes. With
    "copy" it is a copy of `base_root` (for file systems overlayfs cannot use as upper).
    `destroy` unmounts and deletes it. `extra_args` go to every systemd-nspawn run (e.g.
    `--bind=...`). With `loop_devices`, every boot gets /dev/loop-control and loop device
    nodes that work for any device the kernel hands out (`loop_device_args`), so
    systemd-sysext can merge a ``.raw`` image after every reboot. Console output of every
    boot is appended to WORKDIR/console.log.

    Not thread-safe except that `RebootFollower` may call `boot`/`poll` from its thread.
    """

    def __init__(
        self,
        name: str,
        base_root: Path,
        workdir: Path,
        *,
        storage: Literal["overlay", "copy"] = "overlay",
        extra_args: Sequence[str] = (),
        loop_devices: bool = False,
    ) -> None:
        if not HOST_NAME_RE.match(name):
            raise ValueError(f"host name {name!r} is not a DNS label of at most 40 characters")
        self.name = name
        self.workdir = workdir.resolve()
        self.root = self.workdir / "root"
        self.console_log = self.workdir / "console.log"
        self.storage = storage
        self.extra_args = tuple(extra_args)
        self.loop_devices = loop_devices
        # nspawn's machine name keys /run/systemd/nspawn/*/NAME: unique per root, so hosts of
        # two test sessions with the same name do not collide. The hostname stays `name`.
        suffix = hashlib.sha256(str(self.root).encode()).hexdigest()[:8]
        self.machine = f"{name}-{suffix}"
        self.machine_id = uuid.uuid4().hex
        self.boots = 0
        self.last_exit: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None
        self._cgroup = _HostCgroup(self.machine)
        self._lock = threading.RLock()

        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.root.exists():
            raise HostError(f"{self.root} already exists: give each host a fresh workdir")
        started = time.monotonic()
        if storage == "overlay":
            self._mount_overlay(base_root)
        else:
            _checked(
                ["cp", "-a", "--reflink=auto", str(base_root), str(self.root)],
                f"copying {base_root} to {self.root}",
            )
        _write(self.root / "etc/machine-id", self.machine_id + "\n", 0o444)
        _write(self.root / "etc/hostname", name + "\n")
        _write(
            self.root / "etc/hosts",
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost\n",
        )
        log.info(
            "host root made",
            extra={
                "HOST": name,
                "STORAGE": storage,
                "SECONDS": round(time.monotonic() - started, 2),
            },
        )

    def _mount_overlay(self, base_root: Path) -> None:
        layers = self.workdir / "overlay"
        upper, work = layers / "upper", layers / "work"
        for folder in (upper, work, self.root):
            folder.mkdir(parents=True)
        upper.chmod(0o755)  # becomes the mode of the root directory
        options = f"lowerdir={base_root.resolve()},upperdir={upper},workdir={work}"
        _checked(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
            f"mounting an overlay of {base_root} at {self.root} (try storage='copy')",
        )

    def __repr__(self) -> str:
        return f"NspawnHost({self.name!r}, root={str(self.root)!r})"

    @property
    def cgroup_paths(self) -> list[Path]:
        """The host's cgroup in each hierarchy (they exist only while it runs)."""
        return list(self._cgroup.paths)

    # --- the root, while stopped ----------------------------------------------------------

    def path(self, path_in_root: str) -> Path:
        """Where `path_in_root` (absolute, as seen inside) is on this machine.

        Symlinks in its folders are followed as the host would (an absolute link is relative
        to the root), so nothing outside the root is ever named; a symlink as the last
        component is not followed (as lstat does).
        """
        return _resolve_in_root(self.root, path_in_root, follow_last=False)

    def add_file(self, path_in_root: str, content: str | bytes, mode: int = 0o644) -> Path:
        """Write a file into the root (with its folders) while the host is stopped."""
        self._require_stopped("adding a file")
        target = _resolve_in_root(self.root, path_in_root, follow_last=True)
        _write(target, content, mode)
        return target

    def enable_unit(self, unit: str) -> None:
        """Enable `unit` (its [Install] section) in the root, while the host is stopped.

        Runs `systemctl --root=ROOT enable`, which creates the same symlinks (e.g. in
        /etc/systemd/system/multi-user.target.wants) as enabling it inside would.
        """
        self._require_stopped("enabling a unit")
        self._systemctl_offline("enable", unit)

    def mask_unit(self, unit: str) -> None:
        """Mask `unit` in the root (e.g. locksmithd.service), while the host is stopped."""
        self._require_stopped("masking a unit")
        self._systemctl_offline("mask", unit)

    def _systemctl_offline(self, verb: str, unit: str) -> None:
        result = subprocess.run(
            ["systemctl", f"--root={self.root}", verb, unit],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise HostError(
                f"systemctl {verb} {unit} in {self.root} failed "
                f"with status {result.returncode}: {result.stderr.strip()}"
            )

    def _require_stopped(self, doing: str) -> None:
        if self.running:
            raise HostError(f"{doing} in host {self.name} needs it stopped; it is running")

    # --- the machine ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether systemd-nspawn is running (the host is booting, up or shutting down)."""
        with self._lock:
            return self._proc is not None and self.poll() is None

    def boot(self) -> None:
        """Start the next boot of the host (returns at once; see `wait_until_running`)."""
        with self._lock:
            if self.running:
                raise HostError(f"host {self.name} is already running")
            self.boots += 1
            procs_files = self._cgroup.create()
            loops = loop_device_args(self.workdir / "loop-dev") if self.loop_devices else []
            argv = [
                "systemd-nspawn",
                f"--directory={self.root}",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-users=no",
                f"--machine={self.machine}",
                "--console=read-only",
                "--link-journal=no",  # journal stays in ROOT/var/log/journal/MACHINE_ID
                *loops,
                *self.extra_args,
            ]
            # Join the host's own cgroup before exec: --keep-unit makes nspawn use it.
            join_cgroup = (
                'for p in $CLUO_CGROUP_PROCS; do echo $$ > "$p" '
                '|| { echo "cannot join cgroup $p" >&2; exit 97; }; done'
            )
            env = {
                "PATH": os.environ.get("PATH", HOST_ENV["PATH"]),
                "LANG": "C.UTF-8",
                "CLUO_CGROUP_PROCS": " ".join(str(p) for p in procs_files),
                # No image lock files: they pile up in /run/systemd/nspawn/locks (not a tmpfs
                # here); boot() already refuses a second run of the same host.
                "SYSTEMD_NSPAWN_LOCK": "0",
            }
            with self.console_log.open("ab") as console:
                console.write(
                    f"\n=== cluo testbed: boot {self.boots} of {self.name} ===\n".encode()
                )
                console.flush()
                self._proc = subprocess.Popen(
                    ["sh", "-c", f'{join_cgroup}; exec "$@"', "sh", *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self._leader = None
            self.last_exit = None
            log.info("host booting", extra={"HOST": self.name, "BOOT": self.boots})

    def poll(self) -> int | None:
        """None while nspawn runs; once it has exited, its status (`EXIT_REBOOT`, ...)."""
        with self._lock:
            if self._proc is None:
                return self.last_exit
            code = self._proc.poll()
            if code is None:
                return None
            self._after_exit(code)
            return code

    def wait_for_exit(self, timeout: float) -> int:
        """Wait until nspawn exits and return its status: 133 after a reboot, 0 after poweroff."""

        def exit_status() -> tuple[int] | None:
            code = self.poll()
            return None if code is None else (code,)

        status = wait_for(exit_status, timeout, f"systemd-nspawn of host {self.name} to exit")
        assert status is not None  # wait_for returns only truthy values
        return status[0]

    def kill(self, timeout: float = KILL_TIMEOUT) -> None:
        """Stop the host hard, leaving no process, cgroup or mount of nspawn's behind.

        The root (and its overlay mount) stays for `journal` and the next `boot`: `destroy`
        removes it.

        The container's PID 1 goes first, so nspawn reaps it and exits by itself (killing
        nspawn first would hand a zombie to the machine's init); whatever is left in the
        host's cgroup is killed after.
        """
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                log.info("killing host", extra={"HOST": self.name})
                for child in _children(proc.pid):  # the container's PID 1
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                try:
                    proc.wait(min(timeout, 5.0))
                except subprocess.TimeoutExpired:
                    self._cgroup.kill()
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    try:
                        proc.wait(timeout)
                    except subprocess.TimeoutExpired as err:
                        raise HostError(
                            f"systemd-nspawn of host {self.name} survived SIGKILL for {timeout:g}s"
                        ) from err
            if proc is not None:
                self.poll()
            else:
                self._cleanup(timeout)

    def destroy(self, timeout: float = KILL_TIMEOUT) -> None:
        """`kill` the host, then unmount and delete its root (the console log stays)."""
        self.kill(timeout)
        if self.storage == "overlay" and str(self.root) in _mounts_under(self.root):
            _checked(["umount", str(self.root)], f"unmounting the root of host {self.name}")
        _remove_tree(self.root)
        _remove_tree(self.workdir / "overlay")

    def mounts_under_root(self) -> list[str]:
        """Mount points on this machine at or below the host's root.

        While the root exists that is the root itself (with storage "overlay") and nothing
        else: nspawn mounts only in the container's own mount namespace.
        """
        return _mounts_under(self.root)

    def _after_exit(self, code: int) -> None:
        """Forget the finished boot and clean what nspawn leaves behind."""
        self._proc = None
        self._leader = None
        self.last_exit = code
        log.info("host exited", extra={"HOST": self.name, "BOOT": self.boots, "STATUS": code})
        self._cleanup(KILL_TIMEOUT)

    def _cleanup(self, timeout: float) -> None:
        # The container's PID 1 may outlive nspawn for a moment (or forever, if nspawn was
        # killed alone): whatever is still in the host's cgroup is killed.
        if self._cgroup.pids():
            self._cgroup.kill()
        self._cgroup.remove(timeout, f"host {self.name}")
        # nspawn refuses to rm -rf these on a /run that is not a tmpfs; they are empty.
        for leftover in ("propagate", "unix-export"):
            with contextlib.suppress(OSError):
                (NSPAWN_RUN_DIR / leftover / self.machine).rmdir()

    # --- inside the running host ----------------------------------------------------------

    def leader(self) -> int:
        """PID (on this machine) of the host's systemd, its PID 1; HostError if not up yet."""
        with self._lock:
            if self._leader is not None:
                return self._leader
            if self._proc is None or self._proc.poll() is not None:
                raise HostError(f"host {self.name} is not running")
            nspawn = self._proc.pid
            for child in _children(nspawn):
                # The payload is the child that is PID 1 of its own namespace and has exec'd
                # systemd (before that it is nspawn's inner child, still setting up mounts).
                if _ns_pid(child) == 1 and _comm(child) == "systemd":
                    self._leader = child
                    return child
            raise HostError(f"host {self.name} has no PID 1 yet")

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the running host (its namespaces, root and a clean environment)."""
        leader = self.leader()
        command = [
            "nsenter",
            f"--target={leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--root",
            "--wd",
            "--",
            *argv,
        ]
        with subprocess.Popen(
            command,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**HOST_ENV, **(env or {})},
            start_new_session=True,
        ) as proc:
            try:
                stdout, stderr = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired as err:
                # nsenter forked the command into the host's PID namespace; both are in the
                # process group we made, so this ends the command too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                wait_for(
                    lambda: not _group_exists(proc.pid),
                    KILL_TIMEOUT,
                    f"{list(argv)} in host {self.name} to be gone after SIGKILL",
                )
                raise HostError(
                    f"{list(argv)} in host {self.name} still ran after {timeout:g}s"
                ) from err
        result = subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise HostError(
                f"{list(argv)} in host {self.name} failed with status {result.returncode}:\n"
                f"{stderr.strip()[-2000:]}\n{stdout.strip()[-2000:]}".rstrip()
            )
        return result

    def system_state(self, timeout: float = COMMAND_TIMEOUT) -> str:
        """`systemctl is-system-running --wait` inside: running, degraded, offline, ..."""
        result = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
        return result.stdout.strip() or f"unknown ({result.stderr.strip()})"

    def wait_until_running(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait until systemd inside has finished booting; return "running" or "degraded"."""
        deadline = time.monotonic() + timeout
        state = "not started"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostError(
                    f"timed out after {timeout:g}s waiting for host {self.name} to reach "
                    f"running (last state: {state}); console: {self.console_log}\n"
                    f"{self.console_tail()}"
                )
            if not self.running:
                raise HostError(
                    f"host {self.name} is not running (last exit status {self.last_exit}); "
                    f"console:\n{self.console_tail()}"
                )
            try:
                self.leader()
                state = self.system_state(timeout=max(0.1, remaining))
            except HostError as err:  # no PID 1 yet, or the command outlived `remaining`
                state = str(err)
            if state in RUNNING_STATES:
                return state
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def boot_id(self) -> str:
        """The boot id inside, as `/proc/sys/kernel/random/boot_id` gives it (with dashes)."""
        return self.run("cat", "/proc/sys/kernel/random/boot_id").stdout.strip()

    def wait_for_reboot(self, old_boot_id: str, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait until the host is up with a boot id other than `old_boot_id` and running.

        For hosts whose reboots a `RebootFollower` turns into new boots. Returns the new id.
        """
        deadline = time.monotonic() + timeout

        def new_boot_id() -> str | None:
            try:
                current = self.boot_id()
            except HostError:  # between boots, or not up yet
                return None
            return current if current != old_boot_id else None

        new = wait_for(
            new_boot_id, timeout, f"host {self.name} to boot again after boot {old_boot_id}"
        )
        assert new is not None  # wait_for returns only truthy values
        self.wait_until_running(max(0.1, deadline - time.monotonic()))
        return new

    def journal(self, unit: str, *, boot_id: str | None = None, output: str = "cat") -> str:
        """The host's journal for `unit`, read from its root (works running or stopped)."""
        journal_dir = self.root / "var/log/journal"
        if not any(journal_dir.glob("*/*.journal")):
            return ""
        argv = ["journalctl", f"--directory={journal_dir}", f"--unit={unit}", f"--output={output}"]
        if boot_id is not None:
            argv.append(f"--boot={boot_id.replace('-', '')}")
        result = subprocess.run(
            [*argv, "--no-pager", "--quiet"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise HostError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return result.stdout

    def console_tail(self, chars: int = 3000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class RebootFollower:
    """Boots `host` again whenever it reboots, from a thread, as a real machine comes back.

    Stops following at the first exit that is not a reboot (poweroff, kill). Use it as a
    context manager around a running host and leave it before `host.kill()`. `exits` lists
    nspawn's statuses seen; an error while booting again is raised from `stop`.
    """

    def __init__(self, host: NspawnHost, *, interval: float = 0.05) -> None:
        self.host = host
        self.interval = interval
        self.exits: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._follow, name=f"reboot-follower-{host.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = KILL_TIMEOUT) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise HostError(f"the reboot follower of host {self.host.name} did not stop")
        if self.error is not None:
            raise HostError(f"booting host {self.host.name} again failed") from self.error

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                code = self.host.poll()
                if code is None:
                    continue
                self.exits.append(code)
                if code != EXIT_REBOOT:
                    return
                self.host.boot()
            except BaseException as err:  # reported by stop()
                self.error = err
                return

    def __enter__(self) -> RebootFollower:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# --- helpers ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


def _ns_pid(pid: int) -> int | None:
    """The PID of `pid` in its innermost PID namespace."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def _group_exists(pgid: int) -> bool:
    """Whether process group `pgid` has a member, zombies included."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None


def _resolve_in_root(
    root: Path, path_in_root: str, *, follow_last: bool, max_links: int = 40
) -> Path:
    """Resolve `path_in_root` under `root` as if `root` were `/` (chroot-style symlinks)."""
    if not path_in_root.startswith("/"):
        raise ValueError(f"{path_in_root!r} is not an absolute path inside the host")
    pending = list(PurePosixPath(path_in_root).parts[1:])
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and (pending or follow_last):
            links += 1
            if links > max_links:
                raise OSError(errno.ELOOP, "too many symlinks", path_in_root)
            target = PurePosixPath(os.readlink(candidate))
            if target.is_absolute():
                resolved = []
                pending = list(target.parts[1:]) + pending
            else:
                pending = list(target.parts) + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _mounts_under(path: Path) -> list[str]:
    """Mount points on this machine at or below `path`."""
    top = str(path.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == top or point.startswith(top + "/"):
            points.append(point)
    return points


def _remove_tree(path: Path) -> None:
    """Delete a root tree, refusing if anything is mounted inside (it could be /dev or /)."""
    if not path.exists():
        return
    mounts = _mounts_under(path)
    if mounts:
        raise HostError(f"not removing {path}: still mounted there: {mounts}")
    shutil.rmtree(path)
