"""Flatcar-shaped test hosts: what systemd-sysext and cluo-agent read of a Flatcar node.

A Debian root booted with systemd-nspawn is no Flatcar machine, but the parts of Flatcar
that cluo depends on are files: `/usr/lib/os-release` (``ID=flatcar``, a Flatcar
``VERSION_ID`` and ``SYSEXT_LEVEL=1.0``, which systemd-sysext compares with an image's
extension-release before it merges it), `/etc/os-release` linking to it, and the update
group in `/usr/share/flatcar/update.conf` (overridden by `/etc/flatcar/update.conf`).
With them, a host merges cluo-agent's release image (``ID=flatcar``, ``SYSEXT_LEVEL=1.0``,
``ARCHITECTURE=x86-64``) as a Flatcar node does, and the agent labels its Node with
Flatcar's id, version and group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.nspawn import NspawnHost

VERSION = "4081.2.0"  # a Flatcar Stable release (2024), glibc 2.38
GROUP = "stable"



def os_release(version: str = VERSION) -> str:
    """Flatcar's /usr/lib/os-release for ``version``."""
    return f"""NAME="Flatcar Container Linux by Kinvolk"
ID=flatcar
ID_LIKE=coreos
VERSION={version}
VERSION_ID={version}
BUILD_ID=2024-11-14-1938
SYSEXT_LEVEL=1.0
PRETTY_NAME="Flatcar Container Linux by Kinvolk {version} (Oklo)"
ANSI_COLOR="38;5;75"
HOME_URL="https://flatcar.org/"
BUG_REPORT_URL="https://issues.flatcar.org"
FLATCAR_BOARD="amd64-usr"
"""


OS_RELEASE = os_release()

UPDATE_CONF = f"""SERVER=https://public.update.flatcar-linux.net/v1/update/
GROUP={GROUP}
"""


def boot_into(host: NspawnHost, version: str) -> None:
    """What Flatcar's A/B update does at a reboot, for a stopped host: the next boot runs
    the ``version`` update_engine installed (its os-release says so, and so the agent's
    version label, which the coordinator's reboot proof compares with the announced one)."""
    host.add_file("/usr/lib/os-release", os_release(version))


def make_flatcar_shaped(host: NspawnHost) -> None:
    """Give a stopped host Flatcar's os-release and update group (see the module doc)."""
    host.add_file("/usr/lib/os-release", OS_RELEASE)
    etc_os_release = host.path("/etc/os-release")
    etc_os_release.unlink(missing_ok=True)
    etc_os_release.symlink_to("../usr/lib/os-release")
    host.add_file("/usr/share/flatcar/update.conf", UPDATE_CONF)
