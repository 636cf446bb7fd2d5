"""A FleetLock client for the tests: Zincati's own client code, and a host that uses it.

`find_fleetlock_client` returns the harness ``hack/build-fleetlock-client.sh`` builds
from the zincati crate's ``src/fleet_lock/mod.rs`` (built into $CLUO_CACHE if missing):
``fleetlock-client BASE_URL NODE_UUID GROUP pre-reboot|steady-state``, one JSON line out.
`FleetLockClient.ask` runs it once. `ZincatiHost` plays Zincati's update strategy on an
emulated host (testbed/kubelet.py): steady-state until yes (its start-up), pre-reboot
until yes, then the host reboots (a new bootID), then steady-state until yes; every answer
is kept in ``answers`` with the moment it came, for the test to check the order of things.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.kubelet import EmulatedNode
from testbed.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-fleetlock-client.sh"
BUILD_TIMEOUT = 600.0  # a cold build takes about two minutes
REQUEST_TIMEOUT = 40.0  # the harness waits for the server's answer, which waits for the node
ASK_INTERVAL = 0.3  # s between two requests of a ZincatiHost (Zincati's is minutes)
BOOT_TIMEOUT = 30.0


class FleetLockClientError(RuntimeError):
    """The harness could not be built or found, or it could not be run."""


def find_fleetlock_client() -> Path:
    """The harness: ``$FLEETLOCK_CLIENT_BINARY``, else the build script's (built if missing)."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                            check=False, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        raise FleetLockClientError(
            f"no FleetLock client: `bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}` failed:\n"
            f"{result.stderr[-3000:]}")
    binary = Path(result.stdout.strip().splitlines()[-1])
    if not os.access(binary, os.X_OK):
        raise FleetLockClientError(f"{binary} is not an executable FleetLock client")
    return binary


@dataclass(frozen=True)
class Reply:
    """One answer as Zincati's client reads it: yes, or the server's kind and value."""

    ok: bool
    status: int | None = None
    kind: str = ""
    value: str = ""
    at: float = 0.0  # time.monotonic() when it came


@dataclass(frozen=True)
class FleetLockClient:
    binary: Path
    base_url: str  # e.g. http://127.0.0.1:8443/

    def ask(self, client_id: str, group: str, endpoint: str) -> Reply:
        """One request (``pre-reboot`` or ``steady-state``) through Zincati's code."""
        result = subprocess.run([str(self.binary), self.base_url, client_id, group, endpoint],
                                capture_output=True, text=True, check=False,
                                timeout=REQUEST_TIMEOUT)
        if result.returncode not in (0, 1):
            raise FleetLockClientError(f"fleetlock-client exited {result.returncode}: "
                                       f"{result.stderr.strip()}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return Reply(ok=bool(answer.get("ok")), status=answer.get("status"),
                     kind=str(answer.get("kind") or ""), value=str(answer.get("value") or ""),
                     at=time.monotonic())


@dataclass
class ZincatiHost:
    """Zincati's fleet_lock strategy on one emulated host, in a thread of its own."""

    client: FleetLockClient
    node: EmulatedNode
    client_id: str
    group: str = "default"
    # Called with the pre-reboot's 200, before the host goes down (a test's check).
    on_granted: Callable[[], None] = lambda: None
    answers: list[tuple[str, Reply]] = field(default_factory=list)
    rebooted_at: float | None = None
    finished: bool = False
    error: str = ""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"zincati-{self.node.name}")

    def __enter__(self) -> ZincatiHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + BOOT_TIMEOUT)

    def replies(self, endpoint: str) -> list[Reply]:
        return [reply for asked, reply in self.answers if asked == endpoint]

    def _until_yes(self, endpoint: str) -> bool:
        while not self._stop.is_set():
            reply = self.client.ask(self.client_id, self.group, endpoint)
            self.answers.append((endpoint, reply))
            if reply.ok:
                return True
            self._stop.wait(ASK_INTERVAL)
        return False

    def _run(self) -> None:
        try:
            if not (self._until_yes("steady-state") and self._until_yes("pre-reboot")):
                return
            self.on_granted()
            old = self.node.boot_id
            self.node.shutdown()
            time.sleep(0.1)  # down for a moment, as a host is
            new = self.node.boot()
            wait_for(lambda: new != old, BOOT_TIMEOUT, f"{self.node.name} to boot again")
            self.rebooted_at = time.monotonic()
            self.finished = self._until_yes("steady-state")
        except Exception as err:  # reported by the test
            self.error = f"{self.node.name}: {err!r}"
