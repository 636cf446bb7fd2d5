"""cluo-agent on real systemd hosts, provisioned from its Ignition config, against the real
control plane, with the test playing the coordinator (reboot-ok) and the kubelet emulator
following each host's real boots.

Per host (tests/e2e/conftest.py): a Flatcar-shaped host (Flatcar's os-release and update
group), the generated Ignition config applied by the real Ignition, the release sysext image
(ID=flatcar, SYSEXT_LEVEL=1.0) merged by the host's systemd-sysext, a stand-in update_engine
(dbusmock template as update-engine.service on the host's system bus), the agent as
units/cluo-agent.service. A reboot is real: the agent's logind Reboot(false) ends nspawn with
133, a RebootFollower boots the host again with a new boot id, and the emulated Node goes
down with nspawn and comes back with that boot id.

The kubelet emulator scales grace periods by 0.05: a pod with a 200 s grace period takes
10 s to go once evicted, long enough to kill the agent in the middle of the drain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import (
    CoreV1Api,
    V1Container,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodSpec,
)

from cluo.protocol import Keys
from testbed import flatcar, ignition_apply
from testbed.kubelet import EmulatedNode, KubeletEmulator
from testbed.nspawn import EXIT_REBOOT, NspawnHost, RebootFollower
from testbed.nspawn import unavailable_reason as nspawn_unavailable
from testbed.roll import SYSEXT_RELEASE, sysext_problem
from testbed.waiting import assert_stays, wait_for
from tests.e2e.conftest import (
    AgentHostFactory,
    AgentImage,
    ProvisionedHost,
    generate_config,
    unique_name,
    update_engine_unit,
)

UNAVAILABLE = nspawn_unavailable()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.kube,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
    pytest.mark.timeout(600),
]

KEYS = Keys()
AGENT_UNIT = "cluo-agent.service"
UPDATE_ENGINE = ("com.coreos.update1", "/com/coreos/update1", "org.freedesktop.DBus.Mock")
NEED_REBOOT = ("1700000000", "1.0", "UPDATE_STATUS_UPDATED_NEED_REBOOT", "4152.2.0",
               "300000000")
TIMEOUT = 60.0  # any one step of the cycle (agent start-up retries back off up to 30 s)
REBOOT_TIMEOUT = 90.0  # grant -> nspawn exit, with a drain of a few seconds in between
SLOW_GRACE_SECONDS = 200  # x 0.05: an evicted pod takes 10 s to go


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    emulator = KubeletEmulator(kube_admin, heartbeat_interval=2.0, grace_period_scale=0.05)
    emulator.start()
    yield emulator
    emulator.stop(delete_nodes=True)


@pytest.fixture
def core(kube_admin: kubernetes.client.ApiClient) -> CoreV1Api:
    return CoreV1Api(kube_admin)


class Cycle:
    """One provisioned host, its emulated Node and pods; the test's coordinator moves."""

    def __init__(self, provisioned: ProvisionedHost, node: EmulatedNode, core: CoreV1Api,
                 namespace: str) -> None:
        self.provisioned = provisioned
        self.host: NspawnHost = provisioned.host
        self.node = node
        self.core = core
        self.namespace = namespace
        self.name = provisioned.name

    # -- the node ------------------------------------------------------------------------

    def annotation(self, name: str) -> str | None:
        node = self.core.read_node(self.name)
        return (node.metadata.annotations or {}).get(KEYS.prefix + name)

    def set_annotation(self, name: str, value: str) -> None:
        self.core.patch_node(self.name,
                             {"metadata": {"annotations": {KEYS.prefix + name: value}}})

    def cordoned(self) -> bool:
        return bool(self.core.read_node(self.name).spec.unschedulable)

    def add_pod(self, name: str, *, grace: int = 30) -> None:
        owner = V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web-1",
                                 uid="00000000-0000-0000-0000-0000000000aa", controller=True)
        self.core.create_namespaced_pod(self.namespace, V1Pod(
            metadata=V1ObjectMeta(name=name, labels={"app": "web"}, owner_references=[owner]),
            spec=V1PodSpec(node_name=self.name, termination_grace_period_seconds=grace,
                           containers=[V1Container(name="c", image="pause")]),
        ))
        self.wait(lambda: self.core.read_namespaced_pod(name, self.namespace).status.phase
                  == "Running", f"pod {name} Running on {self.name}")

    def pods(self) -> list[str]:
        return sorted(p.metadata.name
                      for p in self.core.list_namespaced_pod(self.namespace).items)

    def pod_deleting(self, name: str) -> bool:
        pods = self.core.list_namespaced_pod(
            self.namespace, field_selector=f"metadata.name={name}").items
        return bool(pods and pods[0].metadata.deletion_timestamp)

    # -- inside the host -----------------------------------------------------------------

    def set_update_status(self, *status: str) -> None:
        self.host.run("busctl", "call", *UPDATE_ENGINE, "SetStatus", "xdssx", *status)

    def agent_property(self, name: str) -> str:
        out = self.host.run("systemctl", "show", "-p", name, "--value", AGENT_UNIT).stdout
        return out.strip()

    def agent_journal(self, boot_id: str | None = None) -> list[dict[str, Any]]:
        text = self.host.journal(AGENT_UNIT, boot_id=boot_id, output="json")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        try:
            return wait_for(predicate, timeout, what, interval=0.2)
        except TimeoutError as err:
            journal = self.host.journal(AGENT_UNIT, output="short-monotonic")
            raise AssertionError(f"{err}\n--- journalctl -u {AGENT_UNIT}:\n"
                                 f"{journal[-6000:]}") from None

    # -- the cycle -----------------------------------------------------------------------

    def wait_until_agent_ready(self) -> None:
        """Type=notify: active once the agent sent READY=1 (update_engine answered), then the
        node shows update_engine's status."""
        self.wait(lambda: self.agent_property("ActiveState") == "active",
                  "cluo-agent.service to be active (READY=1)")
        self.wait(lambda: self.annotation("status") == "UPDATE_STATUS_IDLE",
                  "the agent to mirror update_engine's idle status onto the node")

    def announce_reboot_needed(self) -> None:
        self.set_update_status(*NEED_REBOOT)
        self.wait(lambda: self.annotation("reboot-needed") == "true",
                  "the agent to report reboot-needed=true")

    def follow_reboot(self, follower: RebootFollower, old_boot_id: str) -> str:
        """Wait for the real reboot, take the emulated node down with nspawn's exit and
        boot it with the host's new boot id; returns that id."""
        self.wait(lambda: follower.exits, "the agent's reboot: systemd-nspawn to exit",
                  REBOOT_TIMEOUT)
        self.node.shutdown()
        assert follower.exits[0] == EXIT_REBOOT, follower.exits
        new_boot_id = self.host.wait_for_reboot(old_boot_id)
        self.node.boot(new_boot_id)
        return new_boot_id

    def finish_after_reboot(self) -> None:
        self.wait(lambda: self.annotation("reboot-needed") == "false"
                  and self.annotation("reboot-in-progress") == "false",
                  "the agent to report the reboot (reboot-needed=false, in-progress=false)")
        assert self.cordoned(), "stays cordoned until the coordinator ends the cycle"
        self.set_annotation("reboot-ok", "false")
        self.wait(lambda: not self.cordoned()
                  and self.annotation("agent-made-unschedulable") in (None, "false"),
                  "the agent to uncordon and clear its mark")


@pytest.fixture
def cycle(
    agent_hosts: AgentHostFactory, kubelet: KubeletEmulator, core: CoreV1Api, namespace: str
) -> Cycle:
    provisioned = agent_hosts(unique_name("agent"))
    assert provisioned.root_problems == [], provisioned.root_problems
    host = provisioned.host
    # The Node is registered with the boot id of the host's real boot; the agent, started
    # at boot, retries reading its Node until then (and the boot finishes after).
    node = kubelet.add_node(host.name, boot_id=provisioned.boot_id)
    assert provisioned.wait_until_running() == "running", host.run(
        "systemctl", "--failed", "--no-pager").stdout
    return Cycle(provisioned, node, core, namespace)


def phases(entries: list[dict[str, Any]], node: str) -> list[str]:
    return [e["PHASE"] for e in entries
            if e.get("MESSAGE") == "phase changed" and e.get("NODE") == node]


def report(what: str, timings: dict[str, float]) -> None:
    print(f"\n{what}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def test_provisioned_host_runs_the_agent_through_a_real_reboot(cycle: Cycle) -> None:
    host, timings = cycle.host, cycle.provisioned.timings
    summary = cycle.provisioned.summary
    assert summary.applier.startswith("Ignition") or summary.applier == "python"
    # The merged sysext image is where the unit's ExecStart= comes from.
    assert host.run("readlink", "-f", "/usr/bin/cluo-agent").stdout.strip() == (
        "/usr/lib/cluo-agent/cluo-agent")
    sysext = host.run("systemd-sysext", "status", "--no-pager").stdout
    assert "cluo-agent" in sysext, sysext
    # A Flatcar-shaped host merged the release image, as a Flatcar node does.
    release = host.run("cat", SYSEXT_RELEASE).stdout.split()
    assert "ID=flatcar" in release and "SYSEXT_LEVEL=1.0" in release, release
    assert host.run("systemctl", "is-active", "update-engine.service").stdout.strip() == (
        "active")
    assert host.run("systemctl", "is-enabled", "locksmithd.service",
                    check=False).stdout.strip() == "masked"
    started = time.monotonic()
    cycle.add_pod("web-a")
    cycle.add_pod("web-b")
    cycle.wait_until_agent_ready()
    timings["agent ready"] = time.monotonic() - started

    cycle.announce_reboot_needed()
    # The status follows the annotation: the agent posts its RebootNeeded Event in between.
    def status_when_waiting() -> str | None:
        text = host.run("systemctl", "status", "--no-pager", "--lines=0", AGENT_UNIT).stdout
        return text if "waiting for the coordinator's grant" in text else None

    status = cycle.wait(status_when_waiting, "the unit's status to say it waits for the grant")
    assert "Active: active (running)" in status, status
    assert "Status: \"reboot needed: waiting for the coordinator's grant\"" in status, status
    assert not cycle.cordoned()
    first_boot = host.boot_id()

    with RebootFollower(host) as follower:
        granted = time.monotonic()
        cycle.set_annotation("reboot-ok", "true")
        second_boot = cycle.follow_reboot(follower, first_boot)
        timings["grant to reboot"] = time.monotonic() - granted
        assert cycle.pods() == [], "evicted before the reboot"
        cycle.finish_after_reboot()
        timings["grant to uncordon"] = time.monotonic() - granted
        assert_stays(lambda: host.running and host.boots == 2, 2.0, "no second reboot")
    assert follower.exits == [EXIT_REBOOT]
    assert second_boot != first_boot
    assert cycle.annotation("reboot-ok") == "false"
    assert sysext_problem(host) is None, "merged again in the second boot"
    labels = cycle.core.read_node(cycle.name).metadata.labels or {}
    assert (labels.get(KEYS.id), labels.get(KEYS.version), labels.get(KEYS.group)) == (
        "flatcar", flatcar.VERSION, flatcar.GROUP), labels

    # The agent's structured log: constant messages with NODE= and PHASE= fields.
    before = phases(cycle.agent_journal(first_boot), host.name)
    after = phases(cycle.agent_journal(second_boot), host.name)
    print(f"\nphases, boot 1: {before}\nphases, boot 2: {after}")
    assert _in_order(before, ["Idle", "WaitingForGrant", "Draining", "Rebooting"]), before
    assert after and after[-1] == "Idle", after
    ready = [e for e in cycle.agent_journal() if e.get("MESSAGE") == "agent ready"]
    assert [e["BOOT_ID"] for e in ready] == [first_boot, second_boot]
    report("provisioned host cycle", timings)


def test_agent_killed_mid_drain_is_restarted_by_systemd_and_reboots_once(cycle: Cycle) -> None:
    host, timings = cycle.host, cycle.provisioned.timings
    cycle.add_pod("web-a")
    cycle.add_pod("slow", grace=SLOW_GRACE_SECONDS)
    cycle.wait_until_agent_ready()
    cycle.announce_reboot_needed()
    first_boot = host.boot_id()
    first_pid = cycle.agent_property("MainPID")

    with RebootFollower(host) as follower:
        granted = time.monotonic()
        cycle.set_annotation("reboot-ok", "true")
        cycle.wait(lambda: cycle.pod_deleting("slow"), "the drain to evict the slow pod")
        host.run("systemctl", "kill", "-s", "KILL", AGENT_UNIT)
        # Killed mid-drain: cordoned, in progress, no reboot yet, the slow pod still there.
        assert cycle.annotation("reboot-in-progress") == "true"
        assert cycle.cordoned()
        assert "slow" in cycle.pods()
        assert not follower.exits
        second_boot = cycle.follow_reboot(follower, first_boot)
        timings["grant to reboot"] = time.monotonic() - granted
        cycle.finish_after_reboot()
        assert_stays(lambda: host.running and host.boots == 2, 2.0, "no second reboot")
    assert follower.exits == [EXIT_REBOOT], "exactly one reboot"

    # systemd restarted the killed agent in the first boot (Restart=always), which finished
    # the drain and rebooted.
    first = cycle.agent_journal(first_boot)
    messages = [e.get("MESSAGE", "") for e in first]
    assert any("status=9/KILL" in m for m in messages), messages[-30:]
    assert any("restart counter is at 1" in m for m in messages), messages[-30:]
    ready = [e for e in first if e.get("MESSAGE") == "agent ready"]
    assert len(ready) == 2, "the agent started twice in the first boot"
    assert ready[0]["_PID"] == first_pid != ready[1]["_PID"]
    assert "Rebooting" in phases(first, host.name)
    assert cycle.agent_property("NRestarts") == "0", "a fresh agent in the new boot"
    assert second_boot in {e["BOOT_ID"] for e in cycle.agent_journal(second_boot)
                           if e.get("MESSAGE") == "agent ready"}
    report("SIGKILL mid-drain cycle", timings)


# -- provisioning without a boot ----------------------------------------------------------


def test_python_applier_gives_the_root_real_ignition_gives_and_checks_hashes(
    agent_base_root: Path, agent_image: AgentImage, tmp_path: Path
) -> None:
    url_base = "https://artifacts.example.com/cluo"
    config_path = tmp_path / "node.ign"
    config = generate_config(agent_image, url_base, config_path, ["log-level=debug"])
    url = f"{url_base}/{agent_image.image.name}"
    hosts = [NspawnHost(f"prov-{kind}", agent_base_root, tmp_path / kind)
             for kind in ("ignition", "python", "tampered")]
    try:
        real, small, tampered = hosts
        if ignition_apply.find_ignition() is None:
            pytest.skip("no Ignition binary to compare with (Debian package ignition)")
        with ignition_apply.serve_directory(agent_image.image.parent) as served:
            served_config = tmp_path / "served.ign"
            served_config.write_text(config_path.read_text().replace(url_base, served))
            ignition_apply.apply_with_ignition(real, served_config, tmp_path / "scratch")
        ignition_apply.apply_with_python(small, config, {url: agent_image.image})

        for host in (real, small):
            # Real Ignition writes its preset lines in an order that changes from run to run
            # (CI saw both orders); for distinct units the order carries no meaning.
            assert sorted(ignition_apply.preset_entries(host)) == [
                ("enable", "cluo-agent.service"), ("enable", "update-engine.service")]
            host.add_file("/etc/systemd/system/update-engine.service", update_engine_unit())
            assert sorted(ignition_apply.apply_first_boot_presets(host)) == [
                "cluo-agent.service", "update-engine.service"]
            assert ignition_apply.check_root(host, config, {url: agent_image.image}) == []
        assert (real.path("/etc/cluo/agent.env").read_text()
                == small.path("/etc/cluo/agent.env").read_text())
        assert "CLUO_AGENT_LOG_LEVEL=debug" in small.path("/etc/cluo/agent.env").read_text()

        other = tmp_path / "other.raw"
        other.write_bytes(b"not the image")
        with pytest.raises(ignition_apply.ProvisioningError, match="do not match"):
            ignition_apply.apply_with_python(tampered, config, {url: other})
    finally:
        for host in hosts:
            host.destroy()


def _in_order(seen: list[str], expected: list[str]) -> bool:
    position = 0
    for item in seen:
        if position < len(expected) and item == expected[position]:
            position += 1
    return position == len(expected)
