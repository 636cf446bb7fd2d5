"""The real-systemd test hosts: booting, rebooting, units from outside, journals, teardown."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from testbed.nspawn import (
    EXIT_POWEROFF,
    EXIT_REBOOT,
    MASKED_UNITS,
    HostError,
    NspawnHost,
    RebootFollower,
    build_base_root,
    unavailable_reason,
)
from testbed.waiting import wait_for

UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]

LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
EXIT_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def base_root() -> Path:
    return build_base_root()


@pytest.fixture
def make_host(base_root: Path, tmp_path: Path) -> Iterator[Callable[[str], NspawnHost]]:
    """Factory of hosts made from the base root; each is destroyed afterwards."""
    hosts: list[NspawnHost] = []

    def make(name: str) -> NspawnHost:
        host = NspawnHost(name, base_root, tmp_path / name)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.destroy()


def booted(host: NspawnHost) -> NspawnHost:
    host.boot()
    assert host.wait_until_running() == "running", host.run("systemctl", "--failed").stdout
    return host


def logind_call(host: NspawnHost, method: str) -> subprocess.CompletedProcess[str]:
    """Call logind's `method`(false) inside as the agent will; return busctl's result.

    The reply can be lost: the host may take its bus down first (busctl then ends with
    "Connection reset by peer"), so whether the call worked shows in how the host goes down.
    """
    return host.run("busctl", "call", *LOGIND, method, "b", "false", check=False)


def exit_status_after(host: NspawnHost, method: str) -> int:
    """Call logind's `method` inside and return nspawn's exit status."""
    call = logind_call(host, method)
    try:
        return host.wait_for_exit(EXIT_TIMEOUT)
    except TimeoutError as err:
        raise AssertionError(f"host {host.name} still runs after {method}: {call}") from err


def boot_id_after_followed_reboot(host: NspawnHost) -> str:
    """Reboot a host under a RebootFollower through logind; return the next boot's id."""
    old = host.boot_id()
    call = logind_call(host, "Reboot")
    try:
        return host.wait_for_reboot(old)
    except TimeoutError as err:
        raise AssertionError(f"host {host.name} did not come back after Reboot: {call}") from err


def processes_in(root: Path) -> list[int]:
    """PIDs of processes on this machine whose root directory is `root`."""
    want = root.stat()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            proc_root = (proc / "root").stat()
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if (proc_root.st_dev, proc_root.st_ino) == (want.st_dev, want.st_ino):
            pids.append(int(proc.name))
    return pids


def test_boots_real_systemd_with_system_bus_logind_and_journald(
    make_host: Callable[[str], NspawnHost],
) -> None:
    host = booted(make_host("node-a"))

    names = {
        line.split()[0] for line in host.run("busctl", "list", "--no-legend").stdout.splitlines()
    }
    assert {"org.freedesktop.login1", "org.freedesktop.systemd1"} <= names
    states = host.run(
        "systemctl",
        "is-active",
        "dbus.service",
        "systemd-logind.service",
        "systemd-journald.service",
    ).stdout.split()
    assert states == ["active", "active", "active"]
    assert host.run("systemd-detect-virt", check=False).stdout.strip() == "systemd-nspawn"
    assert host.run("hostname").stdout.strip() == "node-a"
    assert host.run("cat", "/etc/machine-id").stdout.strip() == host.machine_id
    # The journal persists in the root, where journalctl reads it from outside.
    assert (host.root / "var/log/journal" / host.machine_id / "system.journal").is_file()
    assert "Started systemd-logind.service" in host.journal(
        "systemd-logind.service", output="short"
    )


def test_logind_reboot_ends_nspawn_with_133_and_the_next_boot_has_a_new_boot_id(
    make_host: Callable[[str], NspawnHost],
) -> None:
    host = booted(make_host("node-b"))
    first_boot = host.boot_id()

    status = exit_status_after(host, "Reboot")

    assert status == EXIT_REBOOT == 133
    assert not host.running
    booted(host)
    second_boot = host.boot_id()
    assert second_boot != first_boot
    assert host.run("cat", "/etc/machine-id").stdout.strip() == host.machine_id
    # Both boots are in the one persistent journal.
    for boot in (first_boot, second_boot):
        assert "Started systemd-logind.service" in host.journal(
            "systemd-logind.service", boot_id=boot
        )


def test_logind_poweroff_ends_nspawn_with_0(make_host: Callable[[str], NspawnHost]) -> None:
    host = booted(make_host("node-c"))

    status = exit_status_after(host, "PowerOff")

    assert status == EXIT_POWEROFF == 0


def test_unit_written_before_boot_runs_at_boot_and_logs_to_the_journal(
    make_host: Callable[[str], NspawnHost],
) -> None:
    host = make_host("node-d")
    host.add_file(
        "/etc/systemd/system/hello.service",
        "[Unit]\nDescription=Says hello\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=/bin/sh -c 'echo \"hello from $$(hostname) in boot "
        "$$(cat /proc/sys/kernel/random/boot_id)\"'\n\n"
        "[Install]\nWantedBy=multi-user.target\n",
    )
    host.enable_unit("hello.service")
    assert host.path("/etc/systemd/system/multi-user.target.wants/hello.service").is_symlink()

    booted(host)

    assert host.run("systemctl", "is-active", "hello.service").stdout.strip() == "active"
    expected = f"hello from node-d in boot {host.boot_id()}"
    wait_for(
        lambda: expected in host.journal("hello.service"), 10, "the unit's hello in the journal"
    )
    with pytest.raises(HostError, match="needs it stopped"):
        host.add_file("/etc/late", "too late")
    with pytest.raises(HostError, match="needs it stopped"):
        host.enable_unit("hello.service")


def test_add_file_follows_absolute_symlinks_inside_the_root_only(
    make_host: Callable[[str], NspawnHost], tmp_path: Path
) -> None:
    host = make_host("node-e")
    outside = tmp_path / "outside"
    (host.root / "etc/escape").symlink_to(outside)

    written = host.add_file("/etc/escape/file", "stays inside", 0o600)

    assert not outside.exists()
    assert written == host.root / str(outside).lstrip("/") / "file"
    assert written.read_text() == "stays inside"
    assert written.stat().st_mode & 0o777 == 0o600


def test_reboot_follower_boots_the_host_again_like_a_machine(
    make_host: Callable[[str], NspawnHost],
) -> None:
    host = booted(make_host("node-f"))
    first_boot = host.boot_id()

    with RebootFollower(host) as follower:
        second_boot = boot_id_after_followed_reboot(host)
        third_boot = boot_id_after_followed_reboot(host)

    assert len({first_boot, second_boot, third_boot}) == 3
    assert follower.exits == [EXIT_REBOOT, EXIT_REBOOT]
    assert host.boots == 3
    assert host.running


def test_command_timeout_ends_the_command_inside(make_host: Callable[[str], NspawnHost]) -> None:
    host = booted(make_host("node-g"))

    with pytest.raises(HostError, match="still ran after"):
        host.run("sleep", "300", timeout=1)

    assert host.run("pgrep", "-x", "sleep", check=False).returncode == 1


def test_kill_leaves_no_process_cgroup_or_mount_behind(
    make_host: Callable[[str], NspawnHost],
) -> None:
    host = booted(make_host("node-h"))
    leader = host.leader()
    assert leader in processes_in(host.root)
    assert all(path.is_dir() for path in host.cgroup_paths)

    host.kill()

    assert not host.running
    assert processes_in(host.root) == []
    assert not Path(f"/proc/{leader}").exists()
    assert not any(path.exists() for path in host.cgroup_paths)
    assert host.mounts_under_root() == [str(host.root)]  # the overlay, and nothing of nspawn's
    with pytest.raises(HostError, match="not running"):
        host.run("true")

    host.destroy()

    assert host.mounts_under_root() == []
    assert not host.root.exists()


def test_a_host_can_be_a_plain_copy_of_the_base_root(base_root: Path, tmp_path: Path) -> None:
    host = NspawnHost("node-i", base_root, tmp_path / "node-i", storage="copy")
    leader = None
    try:
        assert host.mounts_under_root() == []
        booted(host)
        leader = host.leader()
        assert host.run("hostname").stdout.strip() == "node-i"
    finally:
        host.destroy()
    assert not host.root.exists()
    assert leader is not None and not Path(f"/proc/{leader}").exists()


def test_a_host_that_cannot_start_says_why(make_host: Callable[[str], NspawnHost]) -> None:
    host = make_host("node-j")
    host.extra_args = ("--bind=/nonexistent/cluo-testbed",)
    host.boot()

    with pytest.raises(HostError, match="not running") as raised:
        host.wait_until_running()

    assert "/nonexistent/cluo-testbed" in str(raised.value)  # nspawn's own complaint
    assert host.last_exit not in (None, EXIT_REBOOT, EXIT_POWEROFF)


def fake_bootstrap(
    calls: list[str], delay: float = 0.3
) -> Callable[[str, Sequence[str], Path], None]:
    """A stand-in for mmdebstrap that makes the few files the customization touches."""

    def bootstrap(suite: str, packages: Sequence[str], target: Path) -> None:
        calls.append(suite)
        time.sleep(delay)  # long enough for a second caller to arrive during the build
        (target / "etc").mkdir()
        (target / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
        (target / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nnobody:*:19000::::::\n")

    return bootstrap


def test_base_root_is_built_once_for_concurrent_callers_and_cached(tmp_path: Path) -> None:
    calls: list[str] = []
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                build_base_root(tmp_path, bootstrap=fake_bootstrap(calls))
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(results) == 2 and results[0] == results[1]
    assert calls == ["bookworm"]
    root = results[0]
    assert build_base_root(tmp_path, bootstrap=fake_bootstrap(calls)) == root
    assert calls == ["bookworm"]
    assert not list(tmp_path.glob(".build-*"))
    assert root.stat().st_mode & 0o777 == 0o755
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/shadow").read_text().startswith("root::19000:")
    assert (root / "var/log/journal").is_dir()
    for unit in MASKED_UNITS:
        assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null"


def test_base_root_build_that_fails_leaves_nothing_and_is_retried(tmp_path: Path) -> None:
    def failing(suite: str, packages: Sequence[str], target: Path) -> None:
        (target / "half-made").write_text("")
        raise HostError("mirror unreachable")

    with pytest.raises(HostError, match="mirror unreachable"):
        build_base_root(tmp_path, bootstrap=failing)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    calls: list[str] = []
    root = build_base_root(tmp_path, bootstrap=fake_bootstrap(calls, delay=0))
    assert calls == ["bookworm"] and root.is_dir()


def test_a_different_package_list_is_a_different_base_root(tmp_path: Path) -> None:
    calls: list[str] = []
    bootstrap = fake_bootstrap(calls, delay=0)
    one = build_base_root(tmp_path, packages=("systemd",), bootstrap=bootstrap)
    two = build_base_root(tmp_path, packages=("systemd", "python3"), bootstrap=bootstrap)
    assert one != two and len(calls) == 2
