"""``/run/reboot-required``: the file-based way to ask for a reboot, watched with inotify.

Debian's convention, which Flatcar follows since release 3067: update_engine writes the
file when an update needs a reboot, and so does the recipe of ``systemd-sysupdate`` for
sysext images; ``/run/reboot-required.pkgs`` may list what needs it, one name a line.
The agent treats the file's presence as "reboot needed" (docs/agent.md). ``/run`` is a
tmpfs, so the reboot itself removes the file.

``RebootRequiredWatch`` watches the *directory* (``IN_CREATE``, ``IN_MOVED_TO``,
``IN_CLOSE_WRITE``, ``IN_DELETE``, ``IN_MOVED_FROM``), so the file may be created,
renamed into place or removed at any time; after each event it reads both files again
and hands the result to the agent. It is not polled: the kernel wakes the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluo.errors import ConfigError

RELATIVE_PATH = "run/reboot-required"  # below the host root
PKGS_SUFFIX = ".pkgs"
MAX_REASON = 400  # characters of the package list kept in the annotation and the Event

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_WATCHED = (_IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_DELETE | _IN_MOVED_FROM
            | _IN_DELETE_SELF | _IN_MOVE_SELF)


@dataclass(frozen=True)
class RebootRequired:
    """The file is there; ``packages`` is the ``.pkgs`` list (empty when there is none)."""

    packages: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the annotation and the Event."""
        text = "/" + RELATIVE_PATH
        if self.packages:
            text += " (packages: " + ", ".join(self.packages) + ")"
        return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def read_reboot_required(path: Path) -> RebootRequired | None:
    """The file's state now: None when it is absent."""
    if not path.exists():
        return None
    pkgs = path.with_name(path.name + PKGS_SUFFIX)
    try:
        lines = pkgs.read_text(errors="replace").splitlines()
    except OSError:  # absent (the usual case) or unreadable: no list to show
        lines = []
    return RebootRequired(tuple(dict.fromkeys(line.strip() for line in lines if line.strip())))


def _libc() -> ctypes.CDLL:
    """The C library the process already runs on (dlopen of the program itself), not one
    looked up by name: ``ctypes.util.find_library`` forks ``ldconfig -p``, which would
    cost the agent's start-up a fork and exec of a 30 MB process."""
    return ctypes.CDLL(None, use_errno=True)


class RebootRequiredWatch:
    """Calls ``on_change`` with the file's state whenever it may have changed.

    ``start()`` reads the state once (a file made before the agent started counts) and
    registers the inotify descriptor with the running event loop; ``close()`` undoes it.
    """

    def __init__(self, path: Path, on_change: Callable[[RebootRequired | None], None]) -> None:
        self.path = path
        self._on_change = on_change
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> RebootRequired | None:
        libc = _libc()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise ConfigError(f"cannot watch {self.path}: inotify_init1: {os.strerror(code)}")
        directory = self.path.parent
        if libc.inotify_add_watch(fd, os.fsencode(directory), _WATCHED) < 0:
            code = ctypes.get_errno()
            os.close(fd)
            hint = " (the directory does not exist)" if code == errno.ENOENT else ""
            raise ConfigError(
                f"cannot watch {directory} for {self.path.name}: {os.strerror(code)}{hint}")
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        return read_reboot_required(self.path)

    def close(self) -> None:
        if self._fd is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None

    def _readable(self) -> None:
        assert self._fd is not None
        names = set()
        overflow = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            if not data:
                break
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size
                names.add(data[offset:offset + length].rstrip(b"\0").decode(errors="replace"))
                offset += length
                overflow = overflow or bool(mask & (_IN_Q_OVERFLOW | _IN_DELETE_SELF
                                                    | _IN_MOVE_SELF))
        ours = {self.path.name, self.path.name + PKGS_SUFFIX}
        if overflow or names & ours:
            self._on_change(read_reboot_required(self.path))
