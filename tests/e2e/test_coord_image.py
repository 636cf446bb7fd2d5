"""cluo-coord's container image, run the way the kubelet runs deploy/'s Deployment.

The image is built by hack/build-coord-image.sh, what `make image` runs (its bases and
layers are cached, so a warm build takes seconds; a clean clone builds everything). It is
then started with podman as the kubelet would start the pod of deploy/coordinator.yaml
(testbed/podman_pod.py): the container's args, env, ports, probes, limits and
security context come from the manifest, the ServiceAccount token is a real one from the
test control plane (TokenRequest, RBAC of deploy/), and KUBERNETES_SERVICE_HOST/PORT point
at that API server. The test adds only flags an operator would add to the Deployment: a
node selector (its own nodes: the control plane is shared) and a reboot window. Against
it the image rolls emulated nodes, played by fake agents (testbed/fake_agents.py),
with the window in a time zone 14 hours from UTC, which only the image's own tzdata can
place (nothing of the machine's is mounted).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import CoordinationV1Api, CoreV1Api

from cluo.protocol import SLOT_LEASE_LABEL, Keys
from testbed.controlplane import ControlPlane
from testbed.coord_image import BUILD_TIMEOUT, BuiltImage, build_coord_image
from testbed.fake_agents import FakeAgents
from testbed.kubelet import KubeletEmulator
from testbed.podman_pod import (
    PodmanPod,
    PodRun,
    deployment_from,
    pod_run,
    podman,
)
from testbed.recorder import InFlightRecorder
from testbed.waiting import assert_stays, wait_for

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KEYS = Keys()
SELECTOR_LABEL = "cluo-image-test"
# UTC+14 all year (no daylight saving time since 1995): a window read in the wrong zone is
# 10 or 14 hours off.
ZONE, ZONE_OFFSET = "Pacific/Kiritimati", timedelta(hours=14)
READY_TIMEOUT = 60.0
ROLL_TIMEOUT = 120.0


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the image test needs root (podman's storage, mmdebstrap for the bases)"
    if shutil.which("podman") is None:
        return "podman is missing (Debian package podman; hack/install-deps.sh installs it)"
    return None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or ""),
    pytest.mark.timeout(BUILD_TIMEOUT + 300),  # a cold build makes two Debian roots
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def coord_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """hack/build-coord-image.sh, its archive in a fresh folder."""
    return build_coord_image(tmp_path_factory.mktemp("coord-image"), BUILD_TIMEOUT)


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return deployment_from(DEPLOY / "coordinator.yaml", "cluo-coord")


@pytest.fixture(scope="module")
def service_account_dir(control_plane: ControlPlane, deployment: dict[str, Any],
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """token, ca.crt and namespace of the pod's ServiceAccount, as the kubelet mounts them."""
    control_plane.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"),
                          "-f", str(DEPLOY / "coordinator-rbac.yaml"))
    namespace = deployment["metadata"]["namespace"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    folder = tmp_path_factory.mktemp("serviceaccount")
    (folder / "token").write_text(control_plane.service_account_token(namespace, account))
    (folder / "ca.crt").write_bytes(control_plane.pki.ca_cert.read_bytes())
    (folder / "namespace").write_text(namespace)
    folder.chmod(0o755)  # the container's uid 65532 reads them, as with the kubelet's 0644
    for item in folder.iterdir():
        item.chmod(0o644)
    return folder


def _clean_slot_leases(admin: kubernetes.client.ApiClient, namespace: str) -> None:
    CoordinationV1Api(admin).delete_collection_namespaced_lease(
        namespace, label_selector=SLOT_LEASE_LABEL)


@dataclass
class Rig:
    control_plane: ControlPlane
    admin: kubernetes.client.ApiClient
    emulator: KubeletEmulator
    deployment: dict[str, Any]
    image: BuiltImage
    service_account_dir: Path
    pods: list[PodmanPod]
    test_id: str

    @property
    def selector(self) -> str:
        return f"{SELECTOR_LABEL}={self.test_id}"

    @property
    def namespace(self) -> str:
        return str(self.deployment["metadata"]["namespace"])

    def add_nodes(self, count: int) -> list[str]:
        """Nodes needing a reboot, queued in name order (by last-checked-time)."""
        names = [f"i{self.test_id}-{i}" for i in range(count)]
        self.emulator.add_nodes(names, labels={SELECTOR_LABEL: self.test_id})
        core = CoreV1Api(self.admin)
        for i, name in enumerate(names):
            core.patch_node(name, {"metadata": {"annotations": {
                KEYS.reboot_needed: "true", KEYS.last_checked_time: str(1_700_000_000 + i)}}})
        wait_for(lambda: all(core.read_node(n).status.node_info.boot_id for n in names), 20,
                 "the emulated nodes to report a bootID")
        return names

    def annotations(self, name: str) -> dict[str, str]:
        return dict(CoreV1Api(self.admin).read_node(name).metadata.annotations or {})

    def slot_holders(self) -> list[str]:
        leases = CoordinationV1Api(self.admin).list_namespaced_lease(
            self.namespace, label_selector=SLOT_LEASE_LABEL).items
        return [lease.spec.holder_identity for lease in leases if lease.spec.holder_identity]

    def done(self, name: str) -> bool:
        """The node's cycle is over: rebooted, reboot-ok=false, its slot released."""
        annotations = self.annotations(name)
        return (annotations.get(KEYS.reboot_needed) == "false"
                and annotations.get(KEYS.reboot_ok) == "false"
                and name not in self.slot_holders())

    def start_pod(self, node_name: str, *extra_args: str) -> PodmanPod:
        """The Deployment's pod on ``node_name``, ready (its readiness probe says 200)."""
        run = pod_run(self.deployment, pod_name=f"cluo-coord-{self.test_id}",
                      node_name=node_name, service_account_dir=self.service_account_dir,
                      api_host="127.0.0.1", api_port=self.control_plane.apiserver_port,
                      extra_args=("--node-selector", self.selector, *extra_args))
        assert run.image in self.image.names, (
            f"deploy/coordinator.yaml runs {run.image}, `make image` builds "
            f"{self.image.names}")
        _require_free_ports(run)
        pod = PodmanPod.start(f"cluo-coord-test-{uuid.uuid4().hex[:8]}", run)
        self.pods.append(pod)
        wait_for(lambda: pod.probe("readiness") == 200 or not pod.running(), READY_TIMEOUT,
                 "the pod's readiness probe to answer 200")
        assert pod.running(), f"the container exited:\n{pod.logs()[-4000:]}"
        return pod


def _require_free_ports(run: PodRun) -> None:
    """The pod listens on the machine's network at the manifest's ports: they must be free."""
    for name, port in run.ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                sock.bind(("", port))
            except OSError as err:
                pytest.fail(f"port {port} ({name}, deploy/coordinator.yaml) is taken on this "
                            f"machine ({err}); the pod runs on the host network at the "
                            f"manifest's port, so free it to run this test")


@pytest.fixture
def rig(control_plane: ControlPlane, kube_admin: kubernetes.client.ApiClient,
        coord_image: BuiltImage, deployment: dict[str, Any],
        service_account_dir: Path) -> Iterator[Rig]:
    namespace = deployment["metadata"]["namespace"]
    _clean_slot_leases(kube_admin, namespace)
    pods: list[PodmanPod] = []
    try:
        with KubeletEmulator(kube_admin, heartbeat_interval=5.0) as emulator:
            try:
                yield Rig(control_plane, kube_admin, emulator, deployment, coord_image,
                          service_account_dir, pods, uuid.uuid4().hex[:8])
            finally:
                for pod in pods:
                    pod.remove()
                emulator.stop(delete_nodes=True)
    finally:
        _clean_slot_leases(kube_admin, namespace)


@pytest.fixture
def recorder(rig: Rig) -> Iterator[InFlightRecorder]:
    rec = InFlightRecorder(rig.admin, rig.selector, rig.namespace, KEYS).start()
    yield rec
    rec.stop()
    assert not rec.errors, f"gaps in the recorded history: {rec.errors}"


def _window_open_now(offset: timedelta) -> str:
    """A daily window that opened five minutes ago on a clock ``offset`` from UTC."""
    return f"{datetime.now(UTC) + offset - timedelta(minutes=5):%H:%M} 1h"


def _all_done(rig: Rig, names: list[str]) -> Callable[[], bool]:
    return lambda: all(rig.done(name) for name in names)


# --------------------------------------------------------------------------- tests


def test_deploy_names_the_built_image_which_runs_as_nonroot_without_a_shell(
    coord_image: BuiltImage, deployment: dict[str, Any]
) -> None:
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image in coord_image.names, f"`make image` builds {coord_image.names}"
    assert podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip() \
        == coord_image.image_id, "deploy/coordinator.yaml's image is not the archived one"
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}",
                               image).stdout)
    assert config["User"] == "65532:65532"
    # The image's own user (no --user), any shell or package tool it might carry.
    probe = ("import json, os, shutil; print(json.dumps({'ids': [os.getuid(), os.getgid()], "
             "'bin_sh': os.path.lexists('/bin/sh'), 'tools': [t for t in ('sh', 'bash', "
             "'dash', 'busybox', 'apt', 'dpkg', 'perl') if shutil.which(t)]}))")
    result = podman("run", "--rm", "--runtime", "runc", "--ulimit", "nofile=20000:20000",
                    "--ulimit", "nproc=4096:4096", "--pull=never", "--network", "none",
                    "--entrypoint", "/usr/bin/python3", image, "-c", probe)
    seen = json.loads(result.stdout)
    assert seen == {"ids": [65532, 65532], "bin_sh": False, "tools": []}, seen


def test_window_open_in_utc_but_closed_in_its_zone_grants_nothing(rig: Rig) -> None:
    names = rig.add_nodes(2)
    pod = rig.start_pod("elsewhere", "--reboot-windows", _window_open_now(timedelta(0)),
                        "--time-zone", ZONE)
    assert pod.probe("liveness") == 200
    wait_for(lambda: pod.metrics().get("cluo_nodes_needing_reboot") == len(names), 30,
             "the coordinator to count the nodes needing a reboot")
    assert_stays(lambda: not rig.slot_holders()
                 and not any(rig.annotations(n).get(KEYS.reboot_ok) == "true" for n in names),
                 3.0, f"no slot and no grant: the window is closed in {ZONE}")
    assert pod.stop() == 0, pod.logs()[-4000:]


def test_pod_rolls_nodes_one_at_a_time_in_a_window_open_only_in_its_zone(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    own, *others = rig.add_nodes(3)
    # The pod runs on `own` (NODE_NAME from spec.nodeName), so that node goes last; the
    # window is open now in the zone and would be closed read as UTC.
    pod = rig.start_pod(own, "--reboot-windows", _window_open_now(ZONE_OFFSET),
                        "--time-zone", ZONE)
    container = pod.inspect()
    mounts = [m["Destination"] for m in container["Mounts"]]
    assert mounts == ["/var/run/secrets/kubernetes.io/serviceaccount"], mounts
    assert container["HostConfig"]["Memory"] == 256 * 2**20  # the manifest's limit
    with FakeAgents(rig.control_plane, rig.emulator, rig.selector, keys=KEYS) as agents:
        wait_for(_all_done(rig, [own, *others]), ROLL_TIMEOUT,
                 "the pod to roll all three nodes")
    assert not agents.errors, agents.errors
    assert recorder.max_in_flight() == 1
    assert recorder.grant_order() == [*others, own]
    assert pod.probe("liveness") == 200
    assert pod.probe("readiness") == 200
    metrics = pod.metrics()
    assert metrics["cluo_grants_total"] == 3
    assert metrics["cluo_nodes_in_flight"] == 0
    assert metrics["cluo_nodes_needing_reboot"] == 0
    assert pod.stop() == 0, pod.logs()[-4000:]  # SIGTERM to PID 1: a clean stop
    entries = pod.log_entries()
    assert [e["node"] for e in entries if e["msg"] == "reboot granted"] == [*others, own]
    assert any(e["msg"] == "stopping" for e in entries)
