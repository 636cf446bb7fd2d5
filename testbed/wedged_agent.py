"""cluo-agent with its loop wedged in one await, for the watchdog's end-to-end test.

``python3 -m testbed.wedged_agent [FLAGS]`` runs the real agent (``cluo_host.main.main``)
with one change: in the process whose PID the test wrote to `WEDGE_FILE`, logind's
``Reboot`` call never returns (``await asyncio.Event().wait()``). The agent's loop is then
stuck in that await while the process and its event loop run on, which is what the
watchdog must catch: only the loop's own progress may feed it (cluo_host/notify.py). Any
other process, such as the one systemd starts after the watchdog killed the wedged one,
reboots as the agent does. Nothing in cluo_host changes; this is a test device only.

`install` puts this on a running test host (tests/e2e/test_agent_watchdog.py): the agent's sources,
the third-party packages it imports and this module, copied from this checkout and its
virtualenv (the hosts' bookworm python3 is 3.11, as the virtualenv's), and a drop-in that
makes it cluo-agent.service's ``ExecStart=``, every other setting of the unit kept.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cluo_host import main as agent_main
from cluo_host.logind import Logind

if TYPE_CHECKING:
    from testbed.nspawn import NspawnHost

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Written by `wedge` inside the host; /run is readable under the unit's ProtectSystem=strict.
WEDGE_FILE = "/run/cluo-testbed/wedge-pid"
# Inside the host: the sources and packages `install` copies, and the drop-in it writes.
PYTHON_PATH = "/opt/cluo-testbed/python"
DROPIN = "/etc/systemd/system/cluo-agent.service.d/60-cluo-testbed-wedged-agent.conf"
DROPIN_TEXT = f"""# cluo test bed: the agent from source, wedged on demand (testbed/wedged_agent.py)
[Service]
Environment=PYTHONPATH={PYTHON_PATH} PYTHONDONTWRITEBYTECODE=1
ExecStart=
ExecStart=/usr/bin/python3 -m testbed.wedged_agent
"""
# What cluo-agent imports beyond the standard library (.importlinter: agent-third-party
# and shared-third-party).
THIRD_PARTY = ("dbus_fast", "yaml")
RESTART_TIMEOUT = 60.0  # Type=notify: `systemctl restart` returns once READY=1 came

_reboot = Logind.reboot


async def _reboot_unless_wedged(self: Logind) -> None:
    if _wedged_here():
        log.warning("test bed: the reboot call hangs for ever, the event loop runs on",
                    extra={"PID": os.getpid()})
        await asyncio.Event().wait()
    await _reboot(self)


def _wedged_here() -> bool:
    try:
        return Path(WEDGE_FILE).read_text().strip() == str(os.getpid())
    except FileNotFoundError:
        return False


def main() -> int:
    Logind.reboot = _reboot_unless_wedged  # type: ignore[method-assign]
    return agent_main.main()


# -- the test's side -------------------------------------------------------------------


def install(host: NspawnHost) -> None:
    """Make the running ``host``'s cluo-agent.service run this module, and restart it."""
    target = host.path(PYTHON_PATH)
    skip = shutil.ignore_patterns("__pycache__")
    for package in ("cluo", "cluo_host"):
        shutil.copytree(REPO / package, target / package, ignore=skip)
    (target / "testbed").mkdir()
    for module in ("__init__.py", Path(__file__).name):
        shutil.copy2(REPO / "testbed" / module, target / "testbed" / module)
    for name in THIRD_PARTY:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        source = next(iter(spec.submodule_search_locations))
        shutil.copytree(source, target / name, ignore=skip)
    dropin = host.path(DROPIN)
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(DROPIN_TEXT)
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "restart", "cluo-agent.service", timeout=RESTART_TIMEOUT)


def wedge(host: NspawnHost, pid: str) -> None:
    """Wedge the agent process ``pid`` (as the host sees it) at its next reboot call."""
    host.run("sh", "-c", f'echo {pid} > "$1"', "sh", WEDGE_FILE)


if __name__ == "__main__":
    sys.exit(main())
