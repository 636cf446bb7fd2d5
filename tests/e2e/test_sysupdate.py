"""A sysext update of cluo-agent's own image behind the reboot slot, end to end.

A Debian trixie host (systemd 257, which ships systemd-sysupdate; testbed/trixie.py),
Flatcar-shaped and provisioned by the real Ignition from
`ignition/cluo_ignition.py --sysupdate-url`, runs the first image; an HTTP server on
loopback (testbed.ignition_apply.serve_directory) is the artifact store, a folder that
`hack/build-agent-artifact.sh` builds into, so its SHA256SUMS lists every image in it.
Publishing a newer image there and starting cluo-sysupdate.service by hand (not waiting
for its timer) makes systemd-sysupdate download it and move the extension link; the
service then asks for a reboot with /run/reboot-required. The agent announces it
(reboot-needed, a reason naming cluo-agent), the test plays the coordinator and grants the
slot (reboot-ok, as tests/e2e/test_agent_host.py does), the agent drains and reboots
through logind, and the next boot merges the new image: the running agent's own view of
/usr holds the new version. Nothing reboots before the grant.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api

from testbed import ignition_apply
from testbed.controlplane import ControlPlane
from testbed.kubelet import KubeletEmulator
from testbed.nspawn import EXIT_REBOOT, NspawnHost, RebootFollower
from testbed.roll import AgentImage, build_agent_image, provision_host, sysext_problem
from testbed.trixie import SYSUPDATE, build_trixie_root
from testbed.waiting import assert_stays, wait_for
from tests.e2e import test_agent_host
from tests.e2e.conftest import unique_name
from tests.e2e.test_agent_host import Cycle

pytestmark = test_agent_host.pytestmark

# The rig of tests/e2e/test_agent_host.py, and the fixtures it is built from.
kubelet = test_agent_host.kubelet
core = test_agent_host.core

OLD_VERSION = "0.1.0"
NEW_VERSION = "0.1.1"
EXTENSION_LINK = "/etc/extensions/cluo-agent.raw"
EXTENSIONS_DIR = "/opt/extensions/cluo-agent"
MERGED_VERSION = "/usr/lib/cluo-agent/VERSION"
SERVICE = "cluo-sysupdate.service"
TIMER = "cluo-sysupdate.timer"
SYSUPDATE_RUN_TIMEOUT = 120.0  # download of a ~20 MB image from loopback, and the check
JOURNAL_TIMEOUT = 10.0  # journald's reading of a finished service's last output lines


def image_file(version: str) -> str:
    return f"{EXTENSIONS_DIR}/cluo-agent-{version}-x86-64.raw"


@pytest.fixture(scope="session")
def trixie_root() -> Path:
    return build_trixie_root()


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, AgentImage]:
    """The artifact store's folder with the first image (and its SHA256SUMS)."""
    folder = tmp_path / "published"
    monkeypatch.setenv("ARTIFACT_VERSION", OLD_VERSION)
    return folder, build_agent_image(folder)


@pytest.fixture
def store(published: tuple[Path, AgentImage]) -> Iterator[str]:
    with ignition_apply.serve_directory(published[0]) as base:
        yield base


@pytest.fixture
def cycle(
    trixie_root: Path,
    published: tuple[Path, AgentImage],
    store: str,
    control_plane: ControlPlane,
    kubelet: KubeletEmulator,
    core: CoreV1Api,
    namespace: str,
    tmp_path: Path,
) -> Iterator[Cycle]:
    hosts: list[NspawnHost] = []

    def made(host: NspawnHost) -> None:
        hosts.append(host)
        host.add_file(NO_BOOT_ID_BIND, NO_BOOT_ID_BIND_TEXT)

    name = unique_name("sysupdate")
    try:
        provisioned = provision_host(
            name, base_root=trixie_root, image=published[1], url_base=store,
            control_plane=control_plane, workdir=tmp_path / name,
            generator_args=["--sysupdate-url", store], on_made=made)
        assert provisioned.root_problems == [], provisioned.root_problems
        node = kubelet.add_node(name, boot_id=provisioned.boot_id)
        assert provisioned.wait_until_running() == "running", provisioned.host.run(
            "systemctl", "--failed", "--no-pager").stdout
        yield Cycle(provisioned, node, core, namespace)
    finally:
        for host in hosts:
            host.destroy()


# testbed/roll.py binds the nspawn boot's id over /proc/sys/kernel/random/boot_id for the
# agent, because systemd 252 shows a unit with ProtectProc=/ProtectKernelTunables= the
# machine kernel's id. systemd 257 shows such a unit the boot's own id (checked with
# `systemd-run --property=ProtectProc=invisible --property=ProtectKernelTunables=yes cat
# /proc/sys/kernel/random/boot_id` in a trixie host), and refuses that bind (226/NAMESPACE,
# "Failed to set up mount namespacing: /proc/sys/kernel/random/boot_id: No such file or
# directory"). A later drop-in empties the list again: the agent runs as shipped.
NO_BOOT_ID_BIND = "/etc/systemd/system/cluo-agent.service.d/60-cluo-testbed-systemd-257.conf"
NO_BOOT_ID_BIND_TEXT = """# cluo test bed: systemd 257 shows the unit this boot's own id.
[Service]
BindReadOnlyPaths=
"""


def read(host: NspawnHost, path: str) -> str:
    return host.run("cat", path).stdout.strip()


def exists(host: NspawnHost, path: str) -> bool:
    return host.run("test", "-e", path, check=False).returncode == 0


def run_sysupdate(host: NspawnHost, says: str, times: int = 1) -> str:
    """Start the service as its timer would, wait until it has finished and this boot's
    journal of it holds `says` at least `times` times (journald reads the service's output
    stream on its own, so a line can arrive after the service has finished); its journal."""
    result = host.run("systemctl", "start", SERVICE, check=False,
                      timeout=SYSUPDATE_RUN_TIMEOUT)

    def journal() -> str:
        return host.run("journalctl", "--boot", "--unit", SERVICE, "--no-pager",
                        "--output=cat").stdout

    assert result.returncode == 0, f"systemctl start {SERVICE}: {result.stderr}\n{journal()}"
    def holds() -> str:
        text = journal()
        return text if text.count(says) >= times else ""

    try:
        return wait_for(holds, JOURNAL_TIMEOUT,
                        f"{says!r} {times} time(s) in {SERVICE}'s journal", interval=0.2)
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{journal()}") from None


def agent_sees(cycle: Cycle, path: str) -> str:
    """`path` as the running agent process sees it (its own mount namespace)."""
    pid = cycle.agent_property("MainPID")
    assert pid not in ("", "0"), "cluo-agent is not running"
    return read(cycle.host, f"/proc/{pid}/root{path}")


@pytest.mark.timeout(900)
def test_a_newer_agent_image_is_downloaded_and_merged_after_a_coordinated_reboot(
    cycle: Cycle, published: tuple[Path, AgentImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    host = cycle.host
    assert exists(host, SYSUPDATE), "the trixie host has systemd-sysupdate"
    assert host.run("systemctl", "is-active", TIMER).stdout.strip() == "active"
    cycle.add_pod("web-a")
    cycle.wait_until_agent_ready()
    assert agent_sees(cycle, MERGED_VERSION) == OLD_VERSION
    assert host.run("readlink", "-f", EXTENSION_LINK).stdout.strip() == image_file(OLD_VERSION)

    # Nothing newer published: systemd-sysupdate finds the installed image current, and no
    # reboot is asked for.
    run_sysupdate(host, "no reboot needed")
    assert not exists(host, "/run/reboot-required")

    # A release: the newer image lands in the store, and SHA256SUMS lists both.
    monkeypatch.setenv("ARTIFACT_VERSION", NEW_VERSION)
    build_agent_image(published[0])
    sums = (published[0] / "SHA256SUMS").read_text()
    assert f"cluo-agent-{NEW_VERSION}-x86-64.raw" in sums, sums

    run_sysupdate(host, "asked for a reboot")
    listing = host.run("ls", EXTENSIONS_DIR).stdout.split()
    assert sorted(listing) == sorted(Path(image_file(v)).name
                                     for v in (OLD_VERSION, NEW_VERSION)), listing
    assert host.run("readlink", "-f", EXTENSION_LINK).stdout.strip() == image_file(NEW_VERSION)
    assert read(host, "/run/reboot-required.pkgs").splitlines() == ["cluo-agent"]
    cycle.wait(lambda: cycle.annotation("reboot-needed") == "true",
               "the agent to report reboot-needed=true for /run/reboot-required")
    reason = cycle.annotation("reboot-reason") or ""
    assert reason == "/run/reboot-required (packages: cluo-agent)", reason
    # The service compares what is installed with what is merged, not what it downloaded
    # itself: a request lost after the download (here: removed) is made again by the next
    # run, though there is nothing new to download.
    host.run("rm", "/run/reboot-required", "/run/reboot-required.pkgs")
    journal = run_sysupdate(host, "asked for a reboot", times=2)
    assert journal.count("asked for a reboot") == 2, journal
    assert read(host, "/run/reboot-required.pkgs").splitlines() == ["cluo-agent"]
    # Downloaded, not applied: the old image stays merged and nothing reboots before the
    # grant (the agent waits for the coordinator).
    assert_stays(lambda: host.boots == 1 and not cycle.cordoned(), 3.0,
                 "no reboot and no drain before the grant")
    assert read(host, MERGED_VERSION) == OLD_VERSION
    first_boot = host.boot_id()

    with RebootFollower(host) as follower:
        cycle.set_annotation("reboot-ok", "true")
        second_boot = cycle.follow_reboot(follower, first_boot)
        assert cycle.pods() == [], "evicted before the reboot"
        cycle.finish_after_reboot()
        assert_stays(lambda: host.running and host.boots == 2, 2.0, "no second reboot")
    assert follower.exits == [EXIT_REBOOT]
    assert second_boot != first_boot

    # The new boot merged the new image, and the agent running now is the new one.
    assert sysext_problem(host) is None
    assert read(host, MERGED_VERSION) == NEW_VERSION
    cycle.wait(lambda: cycle.agent_property("ActiveState") == "active",
               "cluo-agent.service to be active in the new boot")
    assert agent_sees(cycle, MERGED_VERSION) == NEW_VERSION
    assert not exists(host, "/run/reboot-required"), "the reboot emptied /run"
    # And the next run of the timer's service finds nothing to do.
    run_sysupdate(host, "no reboot needed")
    assert not exists(host, "/run/reboot-required")
