"""Stand-ins for cluo-agent on emulated nodes, for tests of the coordinator.

`FakeAgents` plays the agent on every Node of a label selector: when the coordinator sets
reboot-ok=true on a node that needs a reboot, it makes the agent's Node writes
(cluo/cycle/agent_core.py): reboot-in-progress with, unless the node was already cordoned,
agent-made-unschedulable and the cordon, in one request; the boot id before the reboot;
it powers the emulated host off (for ``down_for`` seconds) and on again (a new bootID),
waits until the Node reports it, then reports reboot-needed=false,
reboot-in-progress=false; once the coordinator has set reboot-ok=false (``finish_delay``
later: an agent is not instant) it ends the cycle: cluo-coord's reset of a proven reboot
has uncordoned the node and removed the mark and the boot id (planner rule 10), and then
there is nothing to write; a reset that left them (an aborted or withdrawn cycle, an
older coordinator) gets one request: the mark and the boot id removed and, only if the
mark is still there with the cordon, the uncordon.
Each node's stand-in writes with that node's own credential (a client certificate of
system:node:<name>, as the real agent uses its kubelet's), so the confinement of
docs/security.md is exercised by the real authorizer and admission; the nodes are listed
with the admin's. Errors are collected in ``errors`` for the test to
assert on; a list that fails (an API server outage) is counted and retried, as an agent
would.

"""

from __future__ import annotations

import threading
import time

import urllib3
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from cluo.protocol import Keys
from testbed.controlplane import ControlPlane
from testbed.kubelet import KubeletEmulator
from testbed.waiting import wait_for

POLL_INTERVAL = 0.05
BOOT_TIMEOUT = 20.0


class FakeAgents:
    """Reboots each node of ``selector`` once, at its first grant (``never_return``: it
    stays down)."""

    def __init__(self, control_plane: ControlPlane, emulator: KubeletEmulator, selector: str,
                 *, keys: Keys | None = None,
                 never_return: frozenset[str] = frozenset(),
                 finish_delay: float = 0.0, down_for: float = 0.1) -> None:
        self._emulator = emulator
        self._selector = selector
        self._keys = keys or Keys()
        self._control_plane = control_plane
        self._api = control_plane.admin_api_client()
        self._core = CoreV1Api(self._api)
        self._never_return = never_return
        self._finish_delay = finish_delay
        self._down_for = down_for
        self.uncordoned = 0  # uncordons made by the stand-ins (the rest: the coordinator's)
        self.finish_writes = 0  # cycles the stand-ins ended with a write of their own
        self.finishing_at: dict[str, float] = {}  # node -> monotonic time its cycle ended
        self._stop = threading.Event()
        self._busy: set[str] = set()
        self._workers: list[threading.Thread] = []
        self.errors: list[str] = []
        self.list_failures = 0
        self._thread = threading.Thread(target=self._run, name="fake-agents", daemon=True)

    def __enter__(self) -> FakeAgents:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for worker in self._workers:
            worker.join(30)
        self._api.close()
        assert not self._thread.is_alive(), "the fake agents' thread did not stop"

    def settled(self) -> bool:
        """No reboot of ours is under way (a never-returning node's ends at its shutdown)."""
        return not any(worker.is_alive() for worker in self._workers)

    def _run(self) -> None:
        keys = self._keys
        while not self._stop.wait(POLL_INTERVAL):
            try:
                nodes = self._core.list_node(label_selector=self._selector).items
            except (ApiException, urllib3.exceptions.HTTPError):
                self.list_failures += 1
                continue
            for node in nodes:
                annotations = node.metadata.annotations or {}
                name = node.metadata.name
                if (annotations.get(keys.reboot_ok) == "true"
                        and annotations.get(keys.reboot_needed) == "true"
                        and annotations.get(keys.reboot_in_progress) != "true"
                        and name not in self._busy):
                    self._busy.add(name)
                    worker = threading.Thread(target=self._reboot, args=(name,), daemon=True,
                                              name=f"fake-agent-{name}")
                    self._workers.append(worker)
                    worker.start()

    def _reboot(self, name: str) -> None:
        try:
            with self._control_plane.node_api_client(name) as api:
                self._reboot_as_node(name, CoreV1Api(api))
        except Exception as err:  # reported by the test
            self.errors.append(f"{name}: {err!r}")

    def _reboot_as_node(self, name: str, node: CoreV1Api) -> None:
        keys = self._keys
        before = node.read_node(name)
        old_boot = before.status.node_info.boot_id
        we_cordon = not before.spec.unschedulable
        mark = {keys.agent_made_unschedulable: "true"} if we_cordon else {}
        node.patch_node(name, {
            "metadata": {"annotations": {keys.reboot_in_progress: "true", **mark}},
            **({"spec": {"unschedulable": True}} if we_cordon else {})})
        node.patch_node(name, {"metadata": {"annotations": {
            keys.boot_id_before_reboot: old_boot}}})  # the drain is done
        host = self._emulator.node(name)
        host.shutdown()
        if name in self._never_return:
            return
        time.sleep(self._down_for)  # down for a moment, as a host is
        new_boot = host.boot()
        wait_for(lambda: node.read_node(name).status.node_info.boot_id == new_boot,
                 BOOT_TIMEOUT, f"{name} to report its new bootID")
        node.patch_node(name, {"metadata": {"annotations": {
            keys.reboot_needed: "false", keys.reboot_in_progress: "false"}}})
        while (node.read_node(name).metadata.annotations or {}).get(keys.reboot_ok) == "true":
            if self._stop.wait(POLL_INTERVAL):
                return  # the test is over before the after-reboot phase
        time.sleep(self._finish_delay)
        now = node.read_node(name)
        annotations = now.metadata.annotations or {}
        uncordon = bool(now.spec.unschedulable) and (
            annotations.get(keys.agent_made_unschedulable) == "true")
        self.finishing_at[name] = time.monotonic()
        if (keys.agent_made_unschedulable not in annotations
                and keys.boot_id_before_reboot not in annotations):
            return  # cluo-coord's reset ended the cycle: nothing left to write
        node.patch_node(name, {
            "metadata": {"annotations": {keys.agent_made_unschedulable: None,
                                         keys.boot_id_before_reboot: None}},
            **({"spec": {"unschedulable": False}} if uncordon else {})})
        self.finish_writes += 1
        if uncordon:
            self.uncordoned += 1
