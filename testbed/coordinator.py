"""The real ``cluo-coord`` as a process: shared by tests/kube, the e2e roll and bench/.

`CoordProcess.start` runs the console script with a kubeconfig, a node selector, leader
election on or off, an identity and the caller's flags, its output (JSON logs) in a file
and its metrics on a free loopback port, and returns once /readyz answers 200 (its caches
are synced). The environment it inherits has no ``CLUO_COORD_*`` variable but the ones the
caller passes. With ``crash_after`` it runs cluo-coord through the test bed's crash wrapper
(testbed/crashing_coord.py), which exits right after the first change of that type
is applied. Either way it runs this tree's code (``PYTHONPATH`` starts with the tree this
module is in), so a copy of the tree with a shared venv measures the copy. `stop` sends
SIGTERM, then kills.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import crashing_coord
from testbed.controlplane import free_port
from testbed.waiting import wait_for

COORD = Path(sys.executable).parent / "cluo-coord"
ROOT = Path(__file__).resolve().parents[1]  # the tree whose cluo_coord (and crash wrapper) runs
CRASH_EXIT_CODE = crashing_coord.CRASH_EXIT_CODE
NAMESPACE = "cluo-system"  # deploy/namespace.yaml
ENV_PREFIX = "CLUO_COORD_"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class CoordProcessError(RuntimeError):
    """cluo-coord exited while it was expected to start."""


@dataclass
class CoordProcess:
    """``cluo-coord`` as a process, its output in `log_path`, metrics on `port`."""

    identity: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    http_timeout: float = 2.0

    @classmethod
    def start(cls, kubeconfig: Path, selector: str, log_path: Path, *, identity: str,
              leader_elect: bool, flags: Sequence[str] = (),
              env: Mapping[str, str] | None = None, namespace: str = NAMESPACE,
              profile_to: Path | None = None, ready_timeout: float = READY_TIMEOUT,
              http_timeout: float = 2.0, may_exit: bool = False,
              crash_after: str = "") -> CoordProcess:
        """Start cluo-coord and return once /readyz answers 200.

        With ``crash_after`` (a change type, e.g. "AcquireSlot"), the process exits with
        ``CRASH_EXIT_CODE`` right after applying the first change of that type. With
        ``may_exit`` or ``crash_after``, an exit before /readyz answers is not an error and
        the exited process is returned. With ``profile_to``, it runs under cProfile (its
        main thread: the reconcile loop); the stats are written there when it stops."""
        port = free_port()
        python_options = [] if profile_to is None else ["-m", "cProfile", "-o", str(profile_to)]
        if crash_after:
            program = [sys.executable, *python_options, "-m", crashing_coord.__name__,
                       "--crash-after", crash_after, "--"]
        elif python_options:
            program = [sys.executable, *python_options, str(COORD)]
        else:
            program = [str(COORD)]
        argv = [*program, "--kubeconfig", str(kubeconfig),
                "--namespace", namespace, "--node-selector", selector,
                "--metrics-address", f"127.0.0.1:{port}",
                "--leader-elect", "true" if leader_elect else "false",
                "--identity", identity, *flags]
        environment = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        environment.update(env or {})
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, (str(ROOT), environment.get("PYTHONPATH"))))
        if crash_after:
            may_exit = True
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=environment)
        coord = cls(identity, process, port, log_path, http_timeout)
        try:
            wait_for(lambda: coord.get("/readyz")[0] == 200 or process.poll() is not None,
                     ready_timeout, f"{identity} to report ready on /readyz")
            if process.poll() is not None and not may_exit:
                raise CoordProcessError(f"{identity} exited with {process.returncode}:\n"
                                       f"{coord.log_tail()}")
        except BaseException:
            coord.stop()
            raise
        return coord

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> tuple[int, str]:
        """Status and body of a GET on the metrics server; 0 if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=self.http_timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""
        except (OSError, http.client.HTTPException):
            # No answer, or half of one: the process may die mid-answer (a crash hook).
            return 0, ""

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by its series name (``name{labels}``), in order."""
        _, text = self.get("/metrics")
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                samples[series] = float(value)
        return samples

    def metric(self, series: str) -> float | None:
        """The first sample whose series is ``series`` or ``series{...}``; None if none."""
        for name, value in self.metrics().items():
            if name == series or name.startswith(series + "{"):
                return value
        return None

    def leading(self) -> bool:
        return self.metric("cluo_is_leader") == 1.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def entries(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""
