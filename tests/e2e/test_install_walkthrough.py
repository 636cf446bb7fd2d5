"""docs/install.md, walked: each step's commands run as the doc writes them.

The example names become the test bed's: ``registry.example.com`` a Debian
``docker-registry`` on a free loopback port, ``https://k8s-api.example.com:6443`` the test
control plane, ``https://artifacts.example.com/cluo`` an HTTP server on loopback, the
example node ``worker-1`` a Node registered here. Where the doc's text is a script (the
check that the cluster confines node credentials, the in-place update) or a file's content
(the kustomization's ``images:`` entry), the test takes it from docs/install.md itself, so
the doc and the test cannot say different things; single commands are written out here.

The operator's checkout is a folder of this module: ``build/`` holds what ``make image``'s
script built there and the agent image the e2e fixtures built, ``ignition`` and ``.venv``
link to this repository's, ``deploy/`` is a copy. Commands with relative paths run there
unchanged. ``kubectl`` is the control plane's, with the admin kubeconfig.

The test bed runs no deployment controller and no kubelet: the applied Deployment's pod
does not start here (tests/e2e/test_coord_image.py runs the image as that pod would). The
nodes are Flatcar-shaped nspawn hosts provisioned from their Ignition config
(tests/e2e/conftest.py's ``agent_hosts``), the test bed putting each node's kubelet
credential where kubeadm would (step 5: the agent uses it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from cluo.protocol import Keys
from testbed import flatcar
from testbed.controlplane import ControlPlane, free_port
from testbed.coord_image import BUILD_TIMEOUT, BuiltImage, build_coord_image
from testbed.ignition_apply import serve_directory
from testbed.kubelet import KubeletEmulator
from testbed.nspawn import unavailable_reason as nspawn_unavailable
from testbed.roll import build_agent_image
from testbed.waiting import wait_for
from tests.e2e.conftest import AgentHostFactory, AgentImage, ProvisionedHost, unique_name

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "install.md"
with (REPO / "pyproject.toml").open("rb") as _file:
    VERSION = tomllib.load(_file)["project"]["version"]
NEW_AGENT_VERSION = f"{VERSION}-next"  # step 8's second image
NAMESPACE = "cluo-system"
EXAMPLE_NODE = "worker-1"  # step 5's node
REGISTRY_IMAGE = "registry.example.com/cluo-coord:0.1.0"  # the doc's images: entry
EXAMPLE_SERVER = "https://k8s-api.example.com:6443"
EXAMPLE_ARTIFACTS = "https://artifacts.example.com/cluo"
AGENT_UNIT = "cluo-agent.service"
KEYS = Keys()
COMMAND_TIMEOUT = 120.0
REGISTRY_START_TIMEOUT = 30.0
LABEL_TIMEOUT = 60.0  # the agent labels its Node right after start-up
UPDATE_TIMEOUT = 180.0  # download, check, merge, and the restart up to READY=1


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the walk needs root (podman's storage, nspawn hosts)"
    for tool, package in (("docker-registry", "docker-registry"), ("skopeo", "skopeo"),
                          ("podman", "podman"), ("ignition-validate", "ignition")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package}; hack/install-deps.sh installs it)"
    return nspawn_unavailable()


UNAVAILABLE = _unavailable()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.kube,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
    pytest.mark.timeout(BUILD_TIMEOUT + 300),  # a cold build of the coordinator's image
]


# --------------------------------------------------------------------------- the doc

_FENCED = re.compile(r"^```[a-z]*\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def documented(needle: str) -> str:
    """The one fenced block of docs/install.md that contains `needle`."""
    blocks = [block for block in _FENCED.findall(DOC.read_text()) if needle in block]
    assert len(blocks) == 1, f"docs/install.md has {len(blocks)} blocks with {needle!r}, not 1"
    return str(blocks[0])


def substituted(text: str, replacements: Mapping[str, str]) -> str:
    """`text` with the example names replaced; each must be there (the doc still says it)."""
    for old, new in replacements.items():
        assert old in text, f"docs/install.md's block no longer says {old!r}:\n{text}"
        text = text.replace(old, new)
    return text


def run(argv: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=dict(env) if env is not None else None,
                            input=input_text, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT, check=False)
    assert result.returncode == 0, (
        f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's working copy: build/, a copy of deploy/, ignition and .venv linked."""
    folder = tmp_path_factory.mktemp("checkout")
    (folder / "build").mkdir()
    shutil.copytree(REPO / "deploy", folder / "deploy")
    (folder / "ignition").symlink_to(REPO / "ignition")
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return folder


@pytest.fixture(scope="module")
def shell_env(control_plane: ControlPlane) -> dict[str, str]:
    """The build machine's shell: the control plane's kubectl, as its admin."""
    return {**os.environ, "KUBECONFIG": str(control_plane.admin_kubeconfig),
            "PATH": f"{control_plane.binaries}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def coord_image(checkout: Path) -> BuiltImage:
    """Step 2: `make image`'s script, with build/ of the checkout as its output."""
    return build_coord_image(checkout / "build")


@pytest.fixture(scope="module")
def agent_artifact(checkout: Path, agent_image: AgentImage) -> Path:
    """Step 1's output in build/: the image the e2e fixtures built (`make artifact`'s script)."""
    for source in (agent_image.image, agent_image.image.with_name(agent_image.image.name
                                                                  + ".sha512")):
        (checkout / "build" / source.name).symlink_to(source)
    return checkout / "build" / agent_image.image.name


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A fresh docker-registry on loopback, without TLS; yields its host:port."""
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: {address}\n"
    )
    log = tmp_path / "registry.log"
    with log.open("w") as output:
        process = subprocess.Popen(["docker-registry", "serve", str(config)],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"docker-registry exited:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(answers, REGISTRY_START_TIMEOUT, f"docker-registry to answer on {address}/v2/")
        yield address
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def pointed_deploy(checkout: Path) -> Path:
    """Step 4: the doc's images: entry added to the checkout's deploy/kustomization.yaml."""
    deploy = checkout / "deploy"
    with (deploy / "kustomization.yaml").open("a") as kustomization:
        kustomization.write("\n" + documented("newName:"))
    return deploy


@pytest.fixture(scope="module")
def applied_deploy(control_plane: ControlPlane, pointed_deploy: Path) -> Iterator[str]:
    """Step 4: `kubectl apply -k deploy/`; yields its output. The Deployment goes after."""
    yield control_plane.kubectl("apply", "-k", str(pointed_deploy)).stdout
    control_plane.kubectl("delete", "deployment", "cluo-coord", "-n", NAMESPACE,
                          "--ignore-not-found")


@pytest.fixture(scope="module")
def node_check(control_plane: ControlPlane, applied_deploy: str, checkout: Path,
               shell_env: dict[str, str],
               kube_admin: kubernetes.client.ApiClient) -> Iterator[str]:
    """Step 5's block, run by bash in the checkout for a registered Node; yields its output
    (every command in it is meant to be refused)."""
    name = unique_name("check")
    core = kubernetes.client.CoreV1Api(kube_admin)
    core.create_node(kubernetes.client.V1Node(
        metadata=kubernetes.client.V1ObjectMeta(name=name)))
    try:
        control_plane.apply_agent_policy()  # applied by step 4; waits until it is enforced
        script = substituted(documented("--dry-run=server"), {
            f"node={EXAMPLE_NODE}": f"node={name}"})
        result = subprocess.run(["bash", "-c", script], cwd=checkout, env=shell_env,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                check=False)
        yield result.stdout + result.stderr
    finally:
        core.delete_node(name)


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    emulator = KubeletEmulator(kube_admin, heartbeat_interval=2.0)
    emulator.start()
    yield emulator
    emulator.stop(delete_nodes=True)


def first_boot(agent_hosts: AgentHostFactory, kubelet: KubeletEmulator) -> ProvisionedHost:
    """Step 7 on the test bed: a node provisioned from its Ignition config (and given its
    kubelet credential) boots, its Node is registered (the kubelet's part) and the boot
    finishes with the agent ready."""
    provisioned = agent_hosts(unique_name("walk"))
    assert provisioned.root_problems == [], provisioned.root_problems
    kubelet.add_node(provisioned.name, boot_id=provisioned.boot_id)
    assert provisioned.wait_until_running() == "running", provisioned.host.run(
        "systemctl", "--failed", "--no-pager").stdout
    return provisioned


# --------------------------------------------------------------------------- 3. publish


def test_skopeo_copy_pushes_the_archive_under_its_digest(
    registry: str, coord_image: BuiltImage, checkout: Path
) -> None:
    archive = f"build/cluo-coord-{VERSION}.oci.tar"
    assert (checkout / archive).resolve() == coord_image.archive.resolve()
    run(["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{archive}",
         f"docker://{registry}/cluo-coord:{VERSION}"], cwd=checkout)

    pushed = run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                  f"docker://{registry}/cluo-coord:{VERSION}"]).stdout.strip()
    assert pushed == (checkout / f"build/cluo-coord-{VERSION}.oci.digest").read_text().strip()


def test_podman_push_pushes_the_built_image_under_the_same_digest(
    registry: str, coord_image: BuiltImage, checkout: Path
) -> None:
    assert f"localhost/cluo-coord:{VERSION}" in coord_image.names
    run(["podman", "push", "--tls-verify=false", f"localhost/cluo-coord:{VERSION}",
         f"{registry}/cluo-coord:{VERSION}"])

    pushed = run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                  f"docker://{registry}/cluo-coord:{VERSION}"]).stdout.strip()
    assert pushed == (checkout / f"build/cluo-coord-{VERSION}.oci.digest").read_text().strip()


# --------------------------------------------------------------------------- 4. deploy/


def test_kustomize_shows_the_registry_image(
    control_plane: ControlPlane, pointed_deploy: Path
) -> None:
    rendered = control_plane.kubectl("kustomize", str(pointed_deploy)).stdout
    images = [line.strip() for line in rendered.splitlines() if "image:" in line]
    assert images == [f"image: {REGISTRY_IMAGE}"], images


def test_apply_makes_the_deployment_run_the_registry_image(
    applied_deploy: str, control_plane: ControlPlane
) -> None:
    assert "deployment.apps/cluo-coord" in applied_deploy, applied_deploy
    deployment = json.loads(control_plane.kubectl(
        "get", "deployment", "cluo-coord", "-n", NAMESPACE, "-o", "json").stdout)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [REGISTRY_IMAGE]


# --------------------------------------------------------------------------- 5. credential


def test_the_cluster_confines_a_nodes_credential(node_check: str) -> None:
    def said(*parts: str) -> bool:
        return any(all(part in line for part in parts) for line in node_check.splitlines())

    assert said("no - node '", "cannot read all nodes"), node_check  # the Node authorizer
    assert said("is not allowed to modify labels: node-restriction.kubernetes.io/cluo-check"), \
        node_check  # NodeRestriction
    assert said("ValidatingAdmissionPolicy 'cluo-node-keys' with binding 'cluo-node-keys' "
                "denied request"), node_check  # deploy/agent-policy.yaml
    assert not said("labeled") and not said("annotated"), node_check


# --------------------------------------------------------------------------- 6. Ignition


def test_ignition_config_validates_and_carries_no_credential(
    checkout: Path, agent_artifact: Path, agent_image: AgentImage
) -> None:
    run([".venv/bin/python", "ignition/cluo_ignition.py",
         "--artifact-url", f"{EXAMPLE_ARTIFACTS}/cluo-agent-{VERSION}-x86-64.raw",
         "--artifact", f"build/cluo-agent-{VERSION}-x86-64.raw",
         "--node-setting", "drain-timeout=15m",
         "-o", "node.ign"], cwd=checkout)
    run(["ignition-validate", "node.ign"], cwd=checkout)

    config = json.loads((checkout / "node.ign").read_text())
    files = {entry["path"]: entry for entry in config["storage"]["files"]}
    image = files[f"/opt/extensions/cluo-agent/{agent_artifact.name}"]
    assert image["contents"]["source"] == f"{EXAMPLE_ARTIFACTS}/{agent_artifact.name}"
    assert image["contents"]["verification"]["hash"] == f"sha512-{agent_image.sha512}"
    assert set(files) == {image["path"], "/etc/cluo/agent.env"}, "no kubeconfig, no key"
    assert _data_url(files["/etc/cluo/agent.env"]).splitlines()[-2:] == [
        "CLUO_AGENT_KUBECONFIG=/etc/kubernetes/kubelet.conf", "CLUO_AGENT_DRAIN_TIMEOUT=15m"]


def _data_url(entry: dict[str, Any]) -> str:
    source: str = entry["contents"]["source"]
    header, _, data = source.partition(",")
    assert header.startswith("data:"), source[:40]
    if header.endswith(";base64"):
        return base64.b64decode(data).decode()
    return urllib.parse.unquote(data)


# --------------------------------------------------------------------------- 7. first boot


def test_first_boot_shows_the_merged_agent_ready_and_its_node_labelled(
    applied_deploy: str, agent_hosts: AgentHostFactory, kubelet: KubeletEmulator,
    control_plane: ControlPlane
) -> None:
    node = first_boot(agent_hosts, kubelet)
    host = node.host

    assert "cluo-agent" in host.run("systemd-sysext", "status").stdout

    def journal_says_ready() -> bool:
        """systemd logs "Started" at READY=1, which comes before the agent has read and
        labelled its Node; "agent ready" is logged after that."""
        return "agent ready" in host.run("journalctl", "-u", "cluo-agent").stdout

    wait_for(journal_says_ready, LABEL_TIMEOUT, f"'agent ready' in {node.name}'s journal",
             interval=0.5)

    def labels() -> dict[str, str]:
        """The Node's labels once the agent has set its own (empty until then)."""
        shown = yaml.safe_load(
            control_plane.kubectl("get", "node", node.name, "-o", "yaml").stdout)
        found: dict[str, str] = shown["metadata"].get("labels") or {}
        return found if KEYS.id in found else {}

    found = wait_for(labels, LABEL_TIMEOUT, f"the agent to label Node {node.name}")
    assert (found[KEYS.id], found[KEYS.version], found[KEYS.group]) == (
        "flatcar", flatcar.VERSION, flatcar.GROUP), found
    shown = yaml.safe_load(control_plane.kubectl("get", "node", node.name, "-o", "yaml").stdout)
    assert shown["metadata"]["annotations"].get(KEYS.status) == "UPDATE_STATUS_IDLE"


# --------------------------------------------------------------------------- 8. new version


def test_in_place_update_runs_the_new_agent_and_refuses_a_bad_download(
    agent_hosts: AgentHostFactory, kubelet: KubeletEmulator, agent_image: AgentImage,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARTIFACT_VERSION", NEW_AGENT_VERSION)  # hack/build-agent-artifact.sh
    new = build_agent_image(tmp_path / "new-image")
    node = first_boot(agent_hosts, kubelet)
    host = node.host
    old_pid = host.run("systemctl", "show", "-p", "MainPID", "--value", AGENT_UNIT).stdout

    def link() -> str:
        return host.run("readlink", "/etc/extensions/cluo-agent.raw").stdout.strip()

    def update(sha512: str, url_base: str) -> subprocess.CompletedProcess[str]:
        """Step 8's block, run by bash as root on the node."""
        script = substituted(documented("systemd-sysext refresh"), {
            "v=0.2.0": f"v={NEW_AGENT_VERSION}",
            "sha512=<the first field of cluo-agent-0.2.0-x86-64.raw.sha512>": f"sha512={sha512}",
            EXAMPLE_ARTIFACTS: url_base,
        })
        return host.run("bash", "-c", script, check=False, timeout=UPDATE_TIMEOUT)

    def last_line(result: subprocess.CompletedProcess[str]) -> str:
        """What the block's closing `cat /usr/lib/cluo-agent/VERSION` printed."""
        lines = result.stdout.splitlines()
        return lines[-1] if lines else f"(nothing; stderr: {result.stderr})"

    with serve_directory(new.image.parent) as url_base:
        # The old image's sha512 for the new file: the chain stops at the check.
        refused = update(agent_image.sha512, url_base)
        assert "FAILED" in refused.stdout, refused
        assert last_line(refused) == VERSION, refused
        assert link() == f"/opt/extensions/cluo-agent/{agent_image.image.name}"
        assert host.run("systemctl", "show", "-p", "MainPID", "--value",
                        AGENT_UNIT).stdout == old_pid, "the agent was not restarted"

        updated = update(new.sha512, url_base)
    assert last_line(updated) == NEW_AGENT_VERSION, updated
    assert host.run("cat", "/usr/lib/cluo-agent/VERSION").stdout.strip() == NEW_AGENT_VERSION
    assert link() == f"/opt/extensions/cluo-agent/{new.image.name}"
    assert host.run("systemctl", "is-active", AGENT_UNIT,
                    check=False).stdout.strip() == "active"
    assert host.run("systemctl", "show", "-p", "MainPID", "--value",
                    AGENT_UNIT).stdout != old_pid, "the agent was restarted"
