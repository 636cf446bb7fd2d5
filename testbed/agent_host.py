"""Run the real cluo-agent (its console script) as a process against the test bed.

``HostDir`` is the agent's view of a host (``--host-root``): the boot id, os-release and
update.conf files. ``AgentProcess`` starts ``cluo-agent`` with a kubeconfig (its node's
kubelet credential, as on a real node: ``ControlPlane.node_kubeconfig``), the private
system bus and a host dir, and can stop it gracefully, kill it at any moment and start
it again, as systemd's Restart=always would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed import flatcar

AGENT = Path(sys.executable).with_name("cluo-agent")


@dataclass
class HostDir:
    """A host as the agent reads it: boot id, /etc/os-release, update.conf, /run."""

    root: Path
    group: str = "stable"
    boot_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        (self.root / "etc/flatcar").mkdir(parents=True, exist_ok=True)
        (self.root / "usr/share/flatcar").mkdir(parents=True, exist_ok=True)
        (self.root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        (self.root / "etc/os-release").write_text(flatcar.OS_RELEASE)
        (self.root / "usr/share/flatcar/update.conf").write_text("GROUP=alpha\n")
        (self.root / "etc/flatcar/update.conf").write_text(f'GROUP="{self.group}"\n')
        self._write_boot_id()

    def reboot(self) -> str:
        """The host came back from a reboot: a new boot id, an empty /run (a tmpfs)."""
        for entry in (self.root / "run").iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.boot_id = str(uuid.uuid4())
        self._write_boot_id()
        return self.boot_id

    def _write_boot_id(self) -> None:
        (self.root / "proc/sys/kernel/random/boot_id").write_text(self.boot_id + "\n")


@dataclass
class AgentProcess:
    node_name: str
    kubeconfig: Path
    bus_address: str
    host: HostDir
    log_path: Path
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        if self.running():
            raise RuntimeError(f"agent for {self.node_name} is already running")
        argv = [
            str(AGENT),
            "--node-name", self.node_name,
            "--kubeconfig", str(self.kubeconfig),
            "--system-bus-address", self.bus_address,
            "--host-root", str(self.host.root),
            "--log-target", "stderr",
            "--log-level", "debug",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUO_AGENT_")}
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.env)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the agent dies wherever it is, as in a crash or an OOM kill."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, as `systemctl stop` does; returns the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""
