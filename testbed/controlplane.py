"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The binaries come from ``KUBEBUILDER_ASSETS`` when it is set, otherwise from
``hack/build-control-plane.sh`` (built once from the Go module proxy, cached outside the
repository). Nothing here is emulated: requests are authorized as on a kubeadm cluster, by
the Node authorizer and RBAC, with the NodeRestriction admission plugin and
ValidatingAdmissionPolicy on; tokens are real ServiceAccount tokens from the TokenRequest
API, node credentials are client certificates of ``system:node:<name>`` signed by the
cluster's CA, and PodDisruptionBudget status is written by the real disruption controller.

Run it by hand with ``python -m testbed.controlplane`` (it prints how to reach it).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client
from kubernetes.client.rest import ApiException

from cluo.kube.client import ApiError, KubeClient
from cluo.kube.config import Component, kubeconfig_client
from cluo.kube.resources import MERGE_PATCH

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"
AGENT_POLICY = REPO_ROOT / "deploy" / "agent-policy.yaml"
AGENT_POLICY_NAME = "cluo-node-keys"  # its ValidatingAdmissionPolicy and binding
POLICY_TIMEOUT = 30.0
HOOK_VARIABLE = '- name: hookAnnotations\n      expression: "[{}]"'
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 90.0


class ControlPlaneError(RuntimeError):
    """A control-plane component could not be built, started or reached."""


def find_binaries() -> Path:
    """Return the folder holding the four binaries, building them if needed."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        folder = Path(assets)
    else:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ControlPlaneError(
                f"building the control plane with {BUILD_SCRIPT} failed:\n{result.stderr[-4000:]}"
            )
        folder = Path(result.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not os.access(folder / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(f"{folder} lacks the executables {', '.join(missing)}")
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {result.stderr}")


@dataclass(frozen=True)
class Pki:
    """Keys and certificates of one control plane, all under ``folder``."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def serving_cert(self) -> Path:
        return self.folder / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.folder / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.folder / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.folder / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.folder / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.folder / "sa.pub"

    @classmethod
    def create(cls, folder: Path) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        pki = cls(folder)
        days = "3650"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                 "-out", "ca.crt", "-days", days, "-subj", "/CN=cluo-test-ca", cwd=folder)
        ext = folder / "serving.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default.svc,IP:10.0.0.1\n"
            "extendedKeyUsage=serverAuth\n"
        )
        pki._signed("apiserver", "/CN=kube-apiserver", ext)
        client_ext = folder / "client.ext"
        client_ext.write_text("extendedKeyUsage=clientAuth\n")
        # system:masters: the admin identity of tests and of the controller manager.
        pki._signed("admin", "/O=system:masters/CN=cluo-test-admin", client_ext)
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
        return pki

    def node_credential(self, node_name: str) -> bytes:
        """A kubelet client certificate and its key in one PEM, as the kubelet keeps them
        in /var/lib/kubelet/pki/kubelet-client-current.pem: CN ``system:node:<name>``,
        O ``system:nodes``, an ECDSA P-256 key (what the kubelet's rotation generates)."""
        name = f"node-{uuid.uuid4().hex[:8]}"
        self._signed(name, f"/O=system:nodes/CN=system:node:{node_name}",
                     self.folder / "client.ext", key=("ec", "-pkeyopt",
                                                      "ec_paramgen_curve:P-256"))
        return (self.folder / f"{name}.crt").read_bytes() + (
            self.folder / f"{name}.key").read_bytes()

    def _signed(self, name: str, subject: str, ext: Path,
                key: Sequence[str] = ("rsa:2048",)) -> None:
        _openssl("req", "-newkey", *key, "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subject, cwd=self.folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650",
                 "-extfile", str(ext), cwd=self.folder)


@dataclass
class _Process:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        logfile = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            logfile.close()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0, *, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (disruption controller only)."""

    binaries: Path
    workdir: Path
    pki: Pki
    etcd_port: int
    apiserver_port: int
    etcd_peer_port: int = 0  # chosen at etcd's first start, kept across its restarts
    # Appended to kube-apiserver's command line (e.g. the bench's audit log flags).
    extra_apiserver_args: tuple[str, ...] = ()
    _processes: dict[str, _Process] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(
        cls, workdir: Path | None = None, *, extra_apiserver_args: Sequence[str] = ()
    ) -> ControlPlane:
        binaries = find_binaries()
        if workdir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            workdir = Path(tempfile.mkdtemp(prefix="cluo-cp-", dir=base))
        plane = cls(
            binaries=binaries,
            workdir=workdir,
            pki=Pki.create(workdir / "pki"),
            etcd_port=free_port(),
            apiserver_port=free_port(),
            extra_apiserver_args=tuple(extra_apiserver_args),
        )
        plane._write_admin_kubeconfig()
        try:
            plane._start_etcd()
            plane.start_apiserver()
            plane._start_controller_manager()
        except BaseException:
            plane.stop()
            raise
        return plane

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self._processes.get(name)
            if process:
                process.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(self, name: str, argv: Sequence[str]) -> _Process:
        process = _Process(name, list(argv), self.workdir / f"{name}.log")
        process.start()
        self._processes[name] = process
        return process

    def _start_etcd(self) -> None:
        peer_port = self.etcd_peer_port = self.etcd_peer_port or free_port()
        process = self._spawn("etcd", [
            str(self.binaries / "etcd"),
            "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ])
        self._wait_http(process, f"http://127.0.0.1:{self.etcd_port}/health", "etcd healthy")

    def start_apiserver(self) -> None:
        """Start (or restart, on the same port and etcd) the API server and wait for /readyz;
        after a restart, the controller manager is restarted too."""
        process = self._spawn("kube-apiserver", [
            str(self.binaries / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
            "--bind-address", "127.0.0.1",
            "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.apiserver_port),
            "--cert-dir", str(self.workdir / "apiserver-certs"),
            "--tls-cert-file", str(self.pki.serving_cert),
            "--tls-private-key-file", str(self.pki.serving_key),
            "--client-ca-file", str(self.pki.ca_cert),
            # As kubeadm runs it: a kubelet's identity (system:node:<name>) is confined to
            # its own Node, pods and Lease by the Node authorizer and NodeRestriction.
            # ValidatingAdmissionPolicy is on by default (deploy/agent-policy.yaml).
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--service-account-issuer", SERVICE_ACCOUNT_ISSUER,
            "--service-account-key-file", str(self.pki.sa_pub),
            "--service-account-signing-key-file", str(self.pki.sa_key),
            "--service-cluster-ip-range", "10.0.0.0/24",
            "--allow-privileged=true",
            # No token controller runs, so pods must not wait for a "default" ServiceAccount.
            "--disable-admission-plugins", "ServiceAccount",
            "--profiling=false",
            "--v", "1",
            *self.extra_apiserver_args,
        ])
        self._wait_https(process, "/readyz", "kube-apiserver ready")
        manager = self._processes.get("kube-controller-manager")
        if manager is not None:
            # A restart: the controller manager's informers would come back only after
            # their backoff (up to about 30 s), and a later test would wait for PDB status
            # the disruption controller has not computed yet. Start it afresh instead.
            manager.stop()
            self._start_controller_manager()

    def stop_apiserver(self) -> None:
        """Kill the API server only (etcd keeps the state), for outage tests.

        SIGKILL: an abrupt outage is the harder case, and a graceful stop waits for open
        watches to drain (up to a minute).
        """
        process = self._processes.get("kube-apiserver")
        if process:
            process.stop(sig=signal.SIGKILL)

    def stop_etcd(self) -> None:
        """Kill etcd only (SIGKILL, as a crash), for outage tests: the API server stays up
        and fails its requests until `start_etcd`."""
        process = self._processes.get("etcd")
        if process:
            process.stop(sig=signal.SIGKILL)

    def start_etcd(self) -> None:
        """Start etcd again on the same ports and data dir (the cluster state survives it)
        and wait until it is healthy and the API server reads through it again."""
        self._start_etcd()
        self._wait_https(self._processes["kube-apiserver"], "/readyz",
                         "kube-apiserver ready after etcd's restart")

    def _start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", [
            str(self.binaries / "kube-controller-manager"),
            "--kubeconfig", str(self.admin_kubeconfig),
            # The disruption controller writes PodDisruptionBudget status, which the
            # Eviction API needs; the replicaset controller keeps ReplicaSets' pods and
            # their status (the health gate's tests). Nothing else runs (no scheduler, no
            # kubelet: a ReplicaSet's template names its node).
            "--controllers", "disruption,replicaset",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--secure-port", "0",
            "--v", "1",
        ])

    def _wait_http(self, process: _Process, url: str, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not process.running():
                raise ControlPlaneError(f"{process.name} exited:\n{process.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise ControlPlaneError(
            f"timed out after {START_TIMEOUT}s waiting for {what}:\n{process.log_tail()}"
        )

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def _wait_https(self, process: _Process, path: str, what: str) -> None:
        context = self._ssl_context()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not process.running():
                raise ControlPlaneError(f"{process.name} exited:\n{process.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2, context=context) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError:
                pass
            except OSError:
                pass
            time.sleep(0.2)
        raise ControlPlaneError(
            f"timed out after {START_TIMEOUT}s waiting for {what}:\n{process.log_tail()}"
        )

    def metrics(self) -> str:
        """The API server's Prometheus metrics text (admin access)."""
        with urllib.request.urlopen(
            self.url + "/metrics", timeout=10, context=self._ssl_context()
        ) as response:
            return str(response.read().decode())

    # -- clients -----------------------------------------------------------------------

    def _write_admin_kubeconfig(self) -> None:
        self.admin_kubeconfig.write_text(
            kubeconfig_text(
                self.url,
                self.pki.ca_cert,
                user={
                    "client-certificate": str(self.pki.admin_cert),
                    "client-key": str(self.pki.admin_key),
                },
            )
        )
        self.admin_kubeconfig.chmod(0o600)

    def _configuration(self) -> kubernetes.client.Configuration:
        config = kubernetes.client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.pki.ca_cert)
        config.verify_ssl = True
        return config

    def admin_api_client(self) -> kubernetes.client.ApiClient:
        config = self._configuration()
        config.cert_file = str(self.pki.admin_cert)
        config.key_file = str(self.pki.admin_key)
        return kubernetes.client.ApiClient(config)

    def service_account_token(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> str:
        """A real token for ServiceAccount namespace/name (created if missing)."""
        with self.admin_api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            with contextlib.suppress(ApiException):
                core.create_namespace(kubernetes.client.V1Namespace(
                    metadata=kubernetes.client.V1ObjectMeta(name=namespace)))
            try:
                core.create_namespaced_service_account(
                    namespace,
                    kubernetes.client.V1ServiceAccount(
                        metadata=kubernetes.client.V1ObjectMeta(name=name)
                    ),
                )
            except ApiException as err:
                if err.status != 409:
                    raise
            request = kubernetes.client.AuthenticationV1TokenRequest(
                spec=kubernetes.client.V1TokenRequestSpec(
                    audiences=[SERVICE_ACCOUNT_ISSUER], expiration_seconds=expiration_seconds
                )
            )
            response = core.create_namespaced_service_account_token(name, namespace, request)
            return str(response.status.token)

    def service_account_api_client(
        self, namespace: str, name: str
    ) -> kubernetes.client.ApiClient:
        config = self._configuration()
        config.api_key = {"authorization": self.service_account_token(namespace, name)}
        config.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(config)

    def node_api_client(self, node_name: str) -> kubernetes.client.ApiClient:
        """An ApiClient authenticated as node ``node_name``, with a client certificate of
        system:node:<name> as its kubelet has (for stand-ins of the agent)."""
        pem = self.workdir / f"node-{node_name}-{uuid.uuid4().hex[:8]}.pem"
        pem.write_bytes(self.pki.node_credential(node_name))
        pem.chmod(0o600)
        config = self._configuration()
        config.cert_file = config.key_file = str(pem)
        return kubernetes.client.ApiClient(config)

    # cluo's own client (cluo.kube.client), built the way cluo builds it: from a
    # kubeconfig. The kubernetes package above is the test bed's admin tool only.

    def kube_client(self, component: Component = "cluo-agent") -> KubeClient:
        """A KubeClient authenticated as admin (client certificate), for cluo's adapters."""
        return kubeconfig_client(self.admin_kubeconfig, component)

    def service_account_kube_client(
        self, namespace: str, name: str, component: Component = "cluo-agent"
    ) -> KubeClient:
        """A KubeClient authenticated by a real token of ServiceAccount namespace/name."""
        path = self.workdir / f"sa-{namespace}-{name}-{uuid.uuid4().hex[:8]}.kubeconfig"
        return kubeconfig_client(
            self.service_account_kubeconfig(namespace, name, path), component
        )

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """Write a kubeconfig (mode 0600) that authenticates as the ServiceAccount."""
        path.write_text(
            kubeconfig_text(
                self.url, self.pki.ca_cert,
                user={"token": self.service_account_token(namespace, name)},
            )
        )
        path.chmod(0o600)
        return path

    def node_kubeconfig(self, node_name: str, path: Path,
                        credential_path: Path | None = None) -> Path:
        """Write a kubelet.conf-shaped kubeconfig (mode 0600) for node ``node_name``.

        As kubeadm writes /etc/kubernetes/kubelet.conf: the CA inline, the client
        certificate and key both pointing at one PEM file, the kubelet's
        kubelet-client-current.pem. The PEM is written beside the kubeconfig
        (``<path>.pem``); ``credential_path`` is the path the kubeconfig names instead,
        for a kubeconfig that will be read on a host where the PEM lies elsewhere (the
        caller then puts the PEM there: ``node_credential_path(path)`` holds it).
        """
        pem = node_credential_path(path)
        pem.write_bytes(self.pki.node_credential(node_name))
        pem.chmod(0o600)
        named = str(credential_path or pem)
        ca = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        path.write_text(
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: kubernetes\n"
            "  cluster:\n"
            f"    server: {self.url}\n"
            f"    certificate-authority-data: {ca}\n"
            "users:\n"
            f"- name: system:node:{node_name}\n"
            "  user:\n"
            f"    client-certificate: {named}\n"
            f"    client-key: {named}\n"
            "contexts:\n"
            f"- name: system:node:{node_name}@kubernetes\n"
            "  context:\n"
            "    cluster: kubernetes\n"
            f"    user: system:node:{node_name}\n"
            f"current-context: system:node:{node_name}@kubernetes\n"
        )
        path.chmod(0o600)
        return path

    def node_kube_client(self, node_name: str, component: Component = "cluo-agent"
                         ) -> KubeClient:
        """A KubeClient authenticated as node ``node_name`` (its kubelet's credential)."""
        path = self.workdir / f"node-{node_name}-{uuid.uuid4().hex[:8]}.kubeconfig"
        return kubeconfig_client(self.node_kubeconfig(node_name, path), component)

    def apply_agent_policy(self, hook_annotations: Sequence[str] = ()) -> None:
        """Apply deploy/agent-policy.yaml and wait until the API server enforces it.

        ``hook_annotations`` are listed in its ``hookAnnotations`` variable, as an
        operator who configures hooks does (docs/security.md). A new or changed
        ValidatingAdmissionPolicy takes effect a moment after it is stored (the API
        server compiles it from an informer): until then a node's write would go through.
        Waits until a server-side dry run of a node writing reboot-ok (or the first hook
        annotation) on itself is refused by the policy.
        """
        text = AGENT_POLICY.read_text()
        hooks = ", ".join(f"'{key}'" for key in hook_annotations)
        listed = text.replace(HOOK_VARIABLE.format(""), HOOK_VARIABLE.format(hooks))
        if listed == text and hook_annotations:
            raise ControlPlaneError(f"{AGENT_POLICY} has no empty hookAnnotations variable")
        self.kubectl("apply", "-f", "-", input_text=listed)
        key = hook_annotations[0] if hook_annotations else (
            "container-linux-update.v1.coreos.com/reboot-ok")
        name = f"cluo-policy-probe-{uuid.uuid4().hex[:8]}"
        with self.admin_api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            core.create_node(kubernetes.client.V1Node(
                metadata=kubernetes.client.V1ObjectMeta(name=name)))
            try:
                with self.node_kube_client(name) as probe:
                    _wait_refused_by_policy(probe, name, key)
            finally:
                core.delete_node(name)

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None,
        kubeconfig: Path | None = None, timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binaries / "kubectl"),
                "--kubeconfig", str(kubeconfig or self.admin_kubeconfig), *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, input=input_text, timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result


def _wait_refused_by_policy(probe: KubeClient, node: str, key: str) -> None:
    patch = {"metadata": {"annotations": {key: "true"}}}
    deadline = time.monotonic() + POLICY_TIMEOUT
    while True:
        try:
            probe.request("PATCH", f"/api/v1/nodes/{node}", query={"dryRun": "All"},
                          body=patch, content_type=MERGE_PATCH)
        except ApiError as err:
            if err.status == 403 and AGENT_POLICY_NAME in err.body:
                return
            raise
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"{AGENT_POLICY} not enforced after {POLICY_TIMEOUT}s: a node may still "
                f"write {key}")
        time.sleep(0.2)


def node_credential_path(kubeconfig: Path) -> Path:
    """Where ``ControlPlane.node_kubeconfig`` writes the PEM of ``kubeconfig``."""
    return kubeconfig.with_name(kubeconfig.name + ".pem")


def kubeconfig_text(server: str, ca_file: Path, *, user: dict[str, str]) -> str:
    user_lines = "".join(f"    {key}: {value}\n" for key, value in user.items())
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: cluo-test\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority: {ca_file}\n"
        "users:\n"
        "- name: cluo-user\n"
        "  user:\n"
        f"{user_lines}"
        "contexts:\n"
        "- name: cluo-test\n"
        "  context:\n"
        "    cluster: cluo-test\n"
        "    user: cluo-user\n"
        "current-context: cluo-test\n"
    )


@contextlib.contextmanager
def running_control_plane(workdir: Path | None = None) -> Iterator[ControlPlane]:
    plane = ControlPlane.start(workdir)
    try:
        yield plane
    finally:
        plane.cleanup()


def main() -> None:  # pragma: no cover - manual helper
    logging.basicConfig(level=logging.INFO)
    started = time.monotonic()
    with running_control_plane() as plane:
        print(f"control plane up in {time.monotonic() - started:.1f}s at {plane.url}")
        print(f"export KUBECONFIG={plane.admin_kubeconfig}")
        print(f"kubectl: {plane.binaries / 'kubectl'}")
        print("Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":  # pragma: no cover
    main()
