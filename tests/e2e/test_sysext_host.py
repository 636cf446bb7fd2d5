"""systemd-sysext in Flatcar-shaped test hosts, as every e2e roll and `make demo` use them.

A host merges an ``ID=flatcar`` ``SYSEXT_LEVEL=1.0`` image linked from /etc/extensions after
every boot, whatever loop devices the machine has and whatever other hosts take meanwhile
(`NspawnHost(loop_devices=True)`); a host whose extension did not merge is reported at
once, with systemd-sysext's own words (`testbed.roll.sysext_problem`).

The images here are tiny squashfs trees named like cluo-agent's, so the tests need no
PyInstaller build; the release image itself is merged by tests/e2e/test_artifact.py,
test_agent_host.py and test_roll.py.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.flatcar import make_flatcar_shaped
from testbed.nspawn import NspawnHost, RebootFollower, build_base_root, unavailable_reason
from testbed.roll import SYSEXT_RELEASE, sysext_problem

UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]

FLATCAR_RELEASE = "ID=flatcar\nSYSEXT_LEVEL=1.0\nARCHITECTURE=x86-64\n"
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")


def sysext_image(folder: Path, name: str, release: str) -> Path:
    """A squashfs extension NAME.raw holding its extension-release and one file."""
    tree = folder / f"{name}-tree"
    (tree / "usr/lib/extension-release.d").mkdir(parents=True)
    (tree / f"usr/lib/extension-release.d/extension-release.{name}").write_text(release)
    (tree / f"usr/share/{name}").mkdir(parents=True)
    (tree / f"usr/share/{name}/hello").write_text(f"hello from {name}\n")
    image = folder / f"{name}.raw"
    subprocess.run(["mksquashfs", str(tree), str(image), "-all-root", "-noappend", "-quiet",
                    "-no-progress"], check=True, capture_output=True, timeout=60)
    return image


HostFactory = Callable[[dict[str, Path]], NspawnHost]


@pytest.fixture
def flatcar_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Factory: a booted Flatcar-shaped host with `images` ({name: raw}) in /etc/extensions."""
    hosts: list[NspawnHost] = []

    def make(images: dict[str, Path]) -> NspawnHost:
        host = NspawnHost(f"sysext-{len(hosts) + 1}", build_base_root(),
                          tmp_path / f"host-{len(hosts) + 1}", loop_devices=True)
        hosts.append(host)
        make_flatcar_shaped(host)
        for name, image in images.items():
            host.add_file(f"/etc/extensions/{name}.raw", image.read_bytes())
        host.enable_unit("systemd-sysext.service")
        host.boot()
        host.wait_until_running()
        return host

    yield make
    for host in hosts:
        host.destroy()


def loop_devices() -> set[str]:
    return {p.name for p in Path("/sys/block").glob("loop*")}


@contextlib.contextmanager
def every_free_loop_device_taken(folder: Path) -> Iterator[list[str]]:
    """Attach a file to every loop device of the machine that is free, and detach after.

    The next loop device anyone asks for is then one the kernel makes at that moment."""
    backing = folder / "busy.img"
    backing.write_bytes(bytes(64 * 1024))
    taken: list[str] = []
    try:
        for device in sorted(Path("/sys/block").glob("loop*")):
            if (device / "loop" / "backing_file").exists():
                continue
            attach = subprocess.run(["losetup", "--read-only", f"/dev/{device.name}",
                                     str(backing)], capture_output=True, timeout=30, check=False)
            if attach.returncode == 0:  # else taken meanwhile, or being removed: busy anyway
                taken.append(device.name)
        yield taken
    finally:
        for name in taken:
            subprocess.run(["losetup", "--detach", f"/dev/{name}"], capture_output=True,
                           timeout=30, check=False)


def test_the_flatcar_image_merges_again_after_every_reboot(
    flatcar_host: HostFactory, tmp_path: Path
) -> None:
    image = sysext_image(tmp_path, "cluo-agent", FLATCAR_RELEASE)
    host = flatcar_host({"cluo-agent": image})
    assert host.run("sh", "-c", ". /etc/os-release && echo $ID $SYSEXT_LEVEL").stdout.split() == [
        "flatcar", "1.0"]
    assert sysext_problem(host) is None
    with RebootFollower(host):
        for _ in range(2):
            old = host.boot_id()
            # As the agent reboots: logind's Reboot(false); the caller may get no answer.
            host.run("busctl", "call", *LOGIND, "Reboot", "b", "false", check=False)
            host.wait_for_reboot(old)
            assert sysext_problem(host) is None
            assert host.run("cat", "/usr/share/cluo-agent/hello").stdout == (
                "hello from cluo-agent\n")
    assert host.boots == 3


def test_a_merge_can_use_a_loop_device_the_kernel_made_after_the_boot(
    flatcar_host: HostFactory, tmp_path: Path
) -> None:
    """The failure of the first cold `make demo`: every loop device that existed when the host
    booted is taken, so the kernel hands systemd-sysext a new one; a host given only the
    machine's /dev/loopN nodes of its boot time cannot open it ("Failed to set up loopback
    device: Device or resource busy", then cluo-agent.service 203/EXEC)."""
    first = sysext_image(tmp_path, "cluo-agent", FLATCAR_RELEASE)
    host = flatcar_host({"cluo-agent": first})
    assert sysext_problem(host) is None
    second = sysext_image(tmp_path, "cluo-extra", FLATCAR_RELEASE)
    extension = host.path("/etc/extensions/cluo-extra.raw")
    extension.write_bytes(second.read_bytes())
    before = loop_devices()
    with every_free_loop_device_taken(tmp_path) as taken:
        refresh = host.run("systemd-sysext", "refresh", check=False, timeout=60)
        made = loop_devices() - before
        status = host.run("systemd-sysext", "status", "--no-pager").stdout
    print(f"\ntook {taken} of {sorted(before)}; the kernel made {sorted(made)}")
    assert refresh.returncode == 0, refresh.stderr
    assert made, "no loop device was made after the boot: the test did not test that"
    assert "cluo-agent" in status and "cluo-extra" in status, status
    assert host.run("cat", "/usr/share/cluo-extra/hello").stdout == "hello from cluo-extra\n"


def test_a_host_whose_extension_did_not_merge_is_reported_with_the_reason(
    flatcar_host: HostFactory, tmp_path: Path
) -> None:
    image = sysext_image(tmp_path, "cluo-agent", "ID=debian\nVERSION_ID=12\n")
    host = flatcar_host({"cluo-agent": image})
    problem = sysext_problem(host, timeout=30)
    assert problem is not None
    print(f"\n{problem}")
    assert f"{SYSEXT_RELEASE} missing" in problem
    assert "journalctl -u systemd-sysext.service of this boot:" in problem
    journal = problem.split("of this boot:", 1)[1]
    assert "No suitable extensions found (1 ignored due to incompatible version)" in journal
