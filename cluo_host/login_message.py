"""``/run/update-engine/coordinator.conf``: the agent tells Flatcar's login message that it
coordinates the reboots.

Flatcar's shell profile (baselayout ``flatcar-profile.sh``) prints "Update Strategy: No
Reboots" at login unless a reboot coordinator holds an exclusive ``flock`` on that file;
while one does, it reads ``NAME`` and ``STATE`` from it and says nothing for ``running``,
"Reboot planned" for ``reboot-planned`` and ``rebooting``, and the state itself otherwise.
locksmithd introduced the file; FLUO never wrote it. The agent takes the lock when it
starts (the kernel drops it when the process ends, however it ends) and rewrites the file
in place, on the locked descriptor, when its phase moves to another login state: a
rename would leave the lock on the old file. Which phase shows which state is the cycle
driver's (cluo_host/cycle.py, ``login_state``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RELATIVE_PATH = "run/update-engine/coordinator.conf"  # below the host root
NAME = "cluo-agent"
STRATEGY = "cluo"
STARTING = "starting"
RUNNING = "running"
REBOOT_PLANNED = "reboot-planned"
REBOOTING = "rebooting"


def render(state: str) -> str:
    return f"NAME={NAME}\nSTRATEGY={STRATEGY}\nSTATE={state}\n"


class CoordinatorConf:
    """The locked file. ``take()`` once at start, ``show(state)`` on every phase change.

    Best effort throughout: the login message is a courtesy to the operator, never a
    reason for the agent to stop; each failure is logged once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._shown = ""

    def take(self) -> bool:
        """Open the file and lock it; False (logged) when another process holds the lock
        (locksmithd, which must not run beside the agent) or the file cannot be opened."""
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            # Readable by the login shell of any user, whatever the agent's umask (0077).
            os.fchmod(fd, 0o644)
        except OSError as err:
            log.warning("cannot write the login message's coordinator file",
                        extra={"PATH": str(self.path), "ERROR": str(err)})
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            log.warning("another reboot coordinator holds the login message's file; is "
                        "locksmithd running?", extra={"PATH": str(self.path), "ERROR": str(err)})
            return False
        self._fd = fd
        self.show(STARTING)
        return True

    def show(self, state: str) -> None:
        """Rewrite the file in place for ``state`` (nothing if it already says so)."""
        if self._fd is None or state == self._shown:
            return
        data = render(state).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as err:
            log.warning("cannot write the login message's coordinator file",
                        extra={"PATH": str(self.path), "ERROR": str(err)})
            return
        self._shown = state

    def close(self) -> None:
        """Release the lock: the profile then reads the agent as not running."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
