"""Debian trixie roots for test hosts that need systemd 257, e.g. for systemd-sysupdate.

Bookworm's systemd 252 ships no ``systemd-sysupdate``; trixie's ``systemd-container``
(systemd 257) does, as ``/usr/lib/systemd/systemd-sysupdate``. A trixie root is built by
the same machinery as the bookworm one (`testbed.nspawn.build_base_root`, mmdebstrap from
the same Debian mirror) with its own package list, so its cache key is its own and the
bookworm roots other tests use stay as they are.

Verified on this machine (bookworm's systemd-nspawn 252, hybrid cgroups, kernel 6.18): the
root builds in about a minute (systemd 257.13-1~deb13u1, the mirror's trixie); it boots under
this nspawn to ``running`` in about a second, its systemd-sysext merges cluo-agent's squashfs
image on a Flatcar-shaped host, and its systemd-sysupdate reads a transfer file named
``*.conf`` (tests/e2e/test_sysupdate.py). Unlike 252, systemd 257 shows a unit with
``ProtectProc=``/``ProtectKernelTunables=`` the nspawn boot's own id, and refuses to bind a
file over ``/proc/sys/kernel/random/boot_id`` (see the test's drop-in).
"""

from __future__ import annotations

from pathlib import Path

from testbed import nspawn

SUITE = "trixie"
# The bookworm hosts' packages (they exist under these names in trixie too) and
# systemd-container, which carries systemd-sysupdate.
PACKAGES = (*nspawn.PACKAGES, "systemd-container")
SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"


def build_trixie_root(cache_dir: Path | None = None) -> Path:
    """The cached trixie root (built on first use; see `nspawn.build_base_root`)."""
    return nspawn.build_base_root(cache_dir, suite=SUITE, packages=PACKAGES)
