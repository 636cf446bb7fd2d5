"""The real cluo-agent process against the real control plane and the private system bus.

The agent runs as its console script, authenticated with a real token of the cluo-agent
ServiceAccount bound by deploy/agent-rbac.yaml, talks to dbusmock's update_engine and
logind, and drains pods that the kubelet emulator runs. The test plays the coordinator
(reboot-ok) and the host's reboot (new boot id, node back with a new bootID).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dbus
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

from cluo_host.protocol import Keys
from tests.testbed.agent_host import AgentProcess, HostDir
from tests.testbed.controlplane import ControlPlane
from tests.testbed.dbus_bus import MockService
from tests.testbed.kubelet import EmulatedNode, KubeletEmulator
from tests.testbed.waiting import assert_stays, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.dbus]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEYS = Keys()
NEED_REBOOT = (dbus.Int64(1_700_000_000), 1.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT",
               "4152.2.0", dbus.Int64(300_000_000))
IDLE = (dbus.Int64(1_700_000_100), 0.0, "UPDATE_STATUS_IDLE", "0.0.0", dbus.Int64(0))
TIMEOUT = 60


@pytest.fixture(scope="module")
def agent_kubeconfig(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "agent-rbac.yaml"))
    path = tmp_path_factory.mktemp("agent") / "kubeconfig"
    return control_plane.service_account_kubeconfig("cluo-system", "cluo-agent", path)


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    with KubeletEmulator(kube_admin, heartbeat_interval=2.0, grace_period_scale=0.05) as k:
        yield k


@dataclass
class Rig:
    """One node with its host, its agent, and handles on everything around it."""

    core: CoreV1Api
    node: EmulatedNode
    host: HostDir
    agent: AgentProcess
    update_engine: MockService
    logind: MockService
    namespace: str

    @property
    def name(self) -> str:
        return self.node.name

    def read(self) -> kubernetes.client.V1Node:
        return self.core.read_node(self.name)

    def annotation(self, name: str) -> str | None:
        return (self.read().metadata.annotations or {}).get(KEYS.prefix + name)

    def set_annotation(self, name: str, value: str) -> None:
        self.core.patch_node(self.name, {"metadata": {"annotations": {KEYS.prefix + name: value}}})

    def cordoned(self) -> bool:
        return bool(self.read().spec.unschedulable)

    def reboots(self) -> int:
        return len(self.logind.calls("Reboot"))

    def pods(self) -> list[str]:
        return sorted(p.metadata.name for p in self.core.list_namespaced_pod(self.namespace).items)

    def reboot_host(self) -> None:
        """What a real reboot does: the agent dies, the host comes back with a new boot id,
        update_engine starts idle, the kubelet reports the new bootID, systemd starts the
        agent again."""
        self.agent.kill()
        self.node.shutdown()
        self.update_engine.mock.SetStatus(*IDLE)
        boot_id = self.host.reboot()
        self.node.boot(boot_id)
        self.agent.start()

    def wait(self, predicate, what: str, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
        try:
            return wait_for(predicate, timeout=timeout, what=what)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n--- agent log:\n{self.agent.log()[-6000:]}") from None


def make_pod(name: str, node: str, *, controller: bool = True) -> V1Pod:
    owners = [V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web-1",
                               uid="00000000-0000-0000-0000-0000000000aa",
                               controller=True)] if controller else None
    return V1Pod(
        metadata=V1ObjectMeta(name=name, labels={"app": "web"}, owner_references=owners),
        spec=V1PodSpec(node_name=node, termination_grace_period_seconds=30,
                       containers=[V1Container(name="c", image="pause")]),
    )


@pytest.fixture
def rig(
    kube_admin: kubernetes.client.ApiClient,
    kubelet: KubeletEmulator,
    agent_kubeconfig: Path,
    update_engine_mock: MockService,
    logind_mock: MockService,
    system_bus_address: str,
    namespace: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Rig]:
    core = CoreV1Api(kube_admin)
    host = HostDir(tmp_path / "host")
    node = kubelet.add_node(f"n-{uuid.uuid4().hex[:8]}", boot_id=host.boot_id)
    for pod in ("web-a", "web-b"):
        core.create_namespaced_pod(namespace, make_pod(pod, node.name))
    extra = getattr(request, "param", ())
    agent = AgentProcess(node.name, agent_kubeconfig, system_bus_address, host,
                         tmp_path / "agent.log", extra_args=extra)
    rig = Rig(core, node, host, agent, update_engine_mock, logind_mock, namespace)
    rig.wait(lambda: all(core.read_namespaced_pod(p, namespace).status.phase == "Running"
                         for p in ("web-a", "web-b")), "both pods Running")
    agent.start()
    yield rig
    agent.kill()
    for pod in core.list_namespaced_pod(namespace).items:
        core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)


def announce_and_grant(rig: Rig) -> None:
    rig.update_engine.mock.SetStatus(*NEED_REBOOT)
    rig.wait(lambda: rig.annotation("reboot-needed") == "true", "reboot-needed=true")
    rig.set_annotation("reboot-ok", "true")


def test_happy_path_drains_reboots_once_and_uncordons(rig: Rig) -> None:
    rig.wait(lambda: rig.read().metadata.labels.get(KEYS.group) == "stable",
             "the group label from /etc/flatcar/update.conf")
    labels = rig.read().metadata.labels
    assert labels[KEYS.id] == "flatcar"
    assert labels[KEYS.version] == "4081.2.0"  # quotes stripped

    rig.update_engine.mock.SetStatus(*NEED_REBOOT)
    rig.wait(lambda: rig.annotation("reboot-needed") == "true", "reboot-needed=true")
    node = rig.read()
    assert node.metadata.labels[KEYS.reboot_needed] == "true"
    assert node.metadata.annotations[KEYS.status] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert node.metadata.annotations[KEYS.new_version] == "4152.2.0"
    assert not node.spec.unschedulable
    assert_stays(lambda: rig.reboots() == 0, 1.0, "no reboot without a grant")

    rig.set_annotation("reboot-ok", "true")
    rig.wait(lambda: rig.reboots() == 1, "logind Reboot(false)")
    assert rig.logind.calls("Reboot") == [[False]]
    assert rig.pods() == []
    node = rig.read()
    assert node.spec.unschedulable
    assert node.metadata.annotations[KEYS.reboot_in_progress] == "true"
    assert node.metadata.annotations[KEYS.agent_made_unschedulable] == "true"
    assert node.metadata.annotations[KEYS.boot_id_before_reboot] == rig.host.boot_id

    before = rig.host.boot_id
    rig.reboot_host()
    rig.wait(lambda: rig.annotation("reboot-needed") == "false"
             and rig.annotation("reboot-in-progress") == "false", "the agent to report back")
    assert rig.host.boot_id != before
    assert rig.cordoned(), "stays cordoned until the after-reboot phase ends"

    rig.set_annotation("reboot-ok", "false")
    rig.wait(lambda: not rig.cordoned(), "uncordon")
    rig.wait(lambda: rig.annotation("agent-made-unschedulable") in (None, "false"),
             "the agent-made-unschedulable mark cleared")
    assert rig.reboots() == 1
    assert rig.read().metadata.labels[KEYS.reboot_needed] == "false"
