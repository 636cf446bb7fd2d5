"""The in-house API client and its kubeconfig reader against a real kube-apiserver."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cluo.backoff import Backoff
from cluo.errors import ConfigError, KubeError
from cluo.kube.client import REQUEST_ERRORS, ApiError, FileToken, KubeClient, kube_error
from cluo.kube.config import kubeconfig_client
from cluo.kube.nodes import KubeNodes
from cluo.kube.objects import name_of
from cluo.kube.resources import WATCH_IDLE_TIMEOUT
from cluo.kube.watch import Watch, WatchLoop
from cluo.protocol import Keys
from testbed.controlplane import ControlPlane
from testbed.waiting import wait_for

pytestmark = pytest.mark.kube

REVIEW = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


def whoami(client: KubeClient) -> str:
    review = client.request("POST", REVIEW, body={
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return str(review["status"]["userInfo"]["username"])


def configmaps(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps"


def configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    def flow(mapping: dict[str, Any]) -> str:
        return "{" + ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}"
                               for k, v in mapping.items()).replace("True", "true") + "}"

    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "contexts:\n- name: c\n  context: {cluster: k, user: u}\n"
        f"clusters:\n- name: k\n  cluster: {flow(cluster)}\n"
        f"users:\n- name: u\n  user: {flow(user)}\n"
    )
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# -- requests and errors ---------------------------------------------------------------


def test_answers_outside_2xx_are_api_errors_with_status_and_reason(
    kube_client: KubeClient, namespace: str
) -> None:
    with pytest.raises(ApiError) as missing:
        kube_client.request("GET", f"{configmaps(namespace)}/absent")
    assert (missing.value.status, missing.value.reason) == (404, "Not Found")
    assert '"absent" not found' in str(missing.value)

    created = kube_client.request("POST", configmaps(namespace), body=configmap("c1", a="1"))
    assert created["metadata"]["name"] == "c1"
    with pytest.raises(ApiError) as exists:
        kube_client.request("POST", configmaps(namespace), body=configmap("c1"))
    assert (exists.value.status, exists.value.reason) == (409, "Conflict")
    wrapped = kube_error("creating configmap 'c1'", exists.value)
    assert (wrapped.kind, wrapped.status, wrapped.reason) == ("conflict", 409, "AlreadyExists")

    # A replace from a stale resourceVersion: the compare-and-swap cluo relies on.
    stale = created["metadata"]["resourceVersion"]
    kube_client.request("PUT", f"{configmaps(namespace)}/c1", body={
        **configmap("c1", a="2"), "metadata": {"name": "c1", "resourceVersion": stale}})
    with pytest.raises(ApiError) as conflict:
        kube_client.request("PUT", f"{configmaps(namespace)}/c1", body={
            **configmap("c1", a="3"), "metadata": {"name": "c1", "resourceVersion": stale}})
    assert conflict.value.status == 409
    assert kube_error("replacing configmap 'c1'", conflict.value).kind == "conflict"


def test_the_user_agent_reaches_the_api_server(
    control_plane: ControlPlane, kube_client: KubeClient, namespace: str
) -> None:
    with control_plane.kube_client("cluo-coord") as coord:
        coord.request("POST", configmaps(namespace), body=configmap("ua", who="coord"))
    obj = kube_client.request("GET", f"{configmaps(namespace)}/ua")
    # The API server names the field manager after the user agent's product.
    assert [entry["manager"] for entry in obj["metadata"]["managedFields"]] == ["cluo-coord"]


# -- watches ---------------------------------------------------------------------------


def test_a_watch_streams_events_and_closes_from_another_thread(
    kube_client: KubeClient, namespace: str
) -> None:
    listed = kube_client.request("GET", configmaps(namespace))
    stream = kube_client.watch(configmaps(namespace), query={
        "watch": True, "resourceVersion": listed["metadata"]["resourceVersion"],
        "allowWatchBookmarks": True, "timeoutSeconds": 120,
    }, timeout=(5.0, 150.0))
    seen: list[str] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for event in stream:
                if event["type"] != "BOOKMARK":
                    seen.append(f'{event["type"]} {event["object"]["metadata"]["name"]}')
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    kube_client.request("POST", configmaps(namespace), body=configmap("w1"))
    wait_for(lambda: seen, 20, "the watch to deliver the new ConfigMap")
    assert seen == ["ADDED w1"]
    stream.close()
    thread.join(10)  # the read timeout is 150 s: only close() ends it this soon
    assert not thread.is_alive(), "close() did not end the blocked read"
    assert errors == []


class Proxy:
    """A TCP proxy to the API server, listening on ``host``. ``freeze()`` makes the
    connections open then stop forwarding without closing (a peer gone silent: a host
    powered off, a NAT entry dropped); connections made later are forwarded."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.port = self._listener.getsockname()[1]
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, threading.Event]] = []
        self.connections = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        with self._lock:
            for _, frozen in self._open:
                frozen.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for sock, _ in self._open:
                sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            frozen = threading.Event()
            with self._lock:
                self.connections += 1
                self._open += [(client, frozen), (upstream, frozen)]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, frozen),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, frozen: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and not frozen.is_set():
                sink.sendall(data)
            if not frozen.is_set():
                sink.shutdown(socket.SHUT_WR)
        self._stop.wait()  # frozen: keep both ends open, say nothing


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[Proxy]:
    proxy = Proxy(control_plane.apiserver_port)
    yield proxy
    proxy.close()


def admin_tls(control_plane: ControlPlane) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=control_plane.pki.ca_cert)
    context.load_cert_chain(control_plane.pki.admin_cert, control_plane.pki.admin_key)
    return context


def test_a_watch_whose_connection_dies_silently_is_noticed_and_made_again(
    control_plane: ControlPlane, kube_client: KubeClient, proxy: Proxy, namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A peer that stops answering without closing: only the watch's idle deadline (in
    # production WATCH_IDLE_TIMEOUT, here a few seconds) ends the blocked read. Without
    # it the read waits for the server's end of the watch (timeoutSeconds, 5 minutes).
    # The next watch goes over a new connection. The writes go straight to the API
    # server (kube_client), not through the proxy.
    seen: list[str] = []
    with KubeClient(f"https://127.0.0.1:{proxy.port}", user_agent="cluo-agent/test",
                    tls=admin_tls(control_plane)) as client:
        loop = WatchLoop(
            "test-watch",
            open_watch=lambda version: Watch(client, configmaps(namespace),
                                             action="watching configmaps",
                                             resource_version=version, idle_timeout=3.0),
            on_event=lambda event: seen.append(name_of(event.object)),
            backoff=Backoff(initial=0.2, maximum=0.2), log_fields={},
            failed_message="watch failed", expired_message="watch expired",
        )
        with caplog.at_level(logging.INFO, "cluo.kube.watch"):
            loop.start()
            try:
                kube_client.request("POST", configmaps(namespace), body=configmap("before"))
                wait_for(lambda: "before" in seen, 20, "the watch to see 'before'")
                connections = proxy.connections
                proxy.freeze()
                kube_client.request("POST", configmaps(namespace), body=configmap("during"))
                wait_for(lambda: "during" in seen, 30,
                         "a new watch, after the silent one was given up, to see 'during'")
            finally:
                loop.stop(10)
    assert proxy.connections > connections
    assert "the watch stayed silent, watching again" in [r.getMessage() for r in caplog.records]
    assert WATCH_IDLE_TIMEOUT <= 90  # in production: a dead watch noticed within 90 s


# -- credentials -----------------------------------------------------------------------


def test_a_rotated_token_file_is_picked_up(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(control_plane.service_account_token(namespace, "first"))
    source = FileToken(token, refresh_period=0.5)
    tls = ssl.create_default_context(cafile=control_plane.pki.ca_cert)
    with KubeClient(control_plane.url, user_agent="cluo-coord/test", tls=tls,
                    token=source) as client:
        assert whoami(client) == f"system:serviceaccount:{namespace}:first"
        token.write_text(control_plane.service_account_token(namespace, "second"))
        time.sleep(0.6)
        assert whoami(client) == f"system:serviceaccount:{namespace}:second"


def test_kubeconfig_token_file_and_relative_paths(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    shutil.copy(control_plane.pki.ca_cert, tmp_path / "pki" / "ca.crt")
    (tmp_path / "token").write_text(control_plane.service_account_token(namespace, "agent"))
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url, "certificate-authority": "pki/ca.crt"},
                      {"tokenFile": "token"})
    with kubeconfig_client(path) as client:
        assert whoami(client) == f"system:serviceaccount:{namespace}:agent"


def test_kubeconfig_with_embedded_certificates_leaves_no_key_on_disk(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key is loaded from memory (memfd): with no temporary folder at all, a client
    # that wrote the key to a temporary file could not be built.
    pki = control_plane.pki
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url, "certificate-authority-data": b64(pki.ca_cert)},
                      {"client-certificate-data": b64(pki.admin_cert),
                       "client-key-data": b64(pki.admin_key)})
    with kubeconfig_client(path) as client:
        assert whoami(client) == "cluo-test-admin"
    assert not (tmp_path / "no-such-folder").exists()


def test_kubeconfig_with_certificate_files(control_plane: ControlPlane, tmp_path: Path) -> None:
    pki = control_plane.pki
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url, "certificate-authority": str(pki.ca_cert)},
                      {"client-certificate": str(pki.admin_cert),
                       "client-key": str(pki.admin_key)})
    with kubeconfig_client(path, "cluo-agent") as client:
        assert whoami(client) == "cluo-test-admin"
        KubeNodes(client, Keys())  # what the agent builds from it


def test_the_server_certificate_is_verified_by_name(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    pki = control_plane.pki
    user = {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)}
    port = control_plane.apiserver_port

    def connect(cluster: dict[str, Any]) -> Callable[[], str]:
        path = kubeconfig(tmp_path / "kubeconfig", cluster, user)
        client = kubeconfig_client(path)
        return lambda: whoami(client)

    # By host name, and by a tls-server-name the certificate names.
    assert connect({"server": f"https://localhost:{port}",
                    "certificate-authority": str(pki.ca_cert)})() == "cluo-test-admin"
    assert connect({"server": control_plane.url, "certificate-authority": str(pki.ca_cert),
                    "tls-server-name": "kubernetes"})() == "cluo-test-admin"
    # A name the certificate does not carry fails, and so does a CA that did not sign it.
    wrong_name = connect({"server": control_plane.url, "certificate-authority": str(pki.ca_cert),
                          "tls-server-name": "elsewhere.example"})
    with pytest.raises(ssl.SSLCertVerificationError):
        wrong_name()
    system_cas = connect({"server": control_plane.url})
    with pytest.raises(ssl.SSLCertVerificationError) as untrusted:
        system_cas()
    error = kube_error("reading node 'n1'", untrusted.value)
    assert isinstance(error, KubeError) and error.kind == "unavailable"
    # insecure-skip-tls-verify: no check at all (the kubeconfig asked for it).
    assert connect({"server": control_plane.url, "insecure-skip-tls-verify": True})() == (
        "cluo-test-admin")


def credential_plugin(path: Path, status: dict[str, str]) -> Path:
    """A credential plugin printing an ExecCredential with ``status``."""
    answer = json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                         "kind": "ExecCredential", "status": status})
    path.write_text(f"#!{sys.executable}\nprint({answer!r})\n")
    path.chmod(0o755)
    return path


def client_certificate(control_plane: ControlPlane, folder: Path, user: str) -> bytes:
    """A client certificate for ``user`` signed by the cluster's CA, and its key, in one
    PEM (as the kubelet keeps kubelet-client-current.pem)."""
    ca = control_plane.pki
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{user}.key", "-out", f"{user}.csr", "-subj", f"/CN={user}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{user}.csr", "-CA", str(ca.ca_cert),
             "-CAkey", str(ca.folder / "ca.key"), "-CAcreateserial", "-CAserial",
             f"{user}.srl", "-days", "1", "-extfile", "client.ext", "-out", f"{user}.crt",
             cwd=folder)
    return (folder / f"{user}.crt").read_bytes() + (folder / f"{user}.key").read_bytes()


def test_a_rotated_client_certificate_file_is_picked_up(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    # As the kubelet rotates its credential: a new file, the kubelet-client-current.pem
    # symlink moved to it; or the file replaced (renamed over). The kubeconfig names the
    # one PEM as both certificate and key.
    for user in ("first-user", "second-user", "third-user"):
        (tmp_path / f"{user}.pem").write_bytes(client_certificate(control_plane, tmp_path, user))
    current = tmp_path / "kubelet-client-current.pem"
    current.symlink_to("first-user.pem")
    path = kubeconfig(tmp_path / "kubelet.conf",
                      {"server": control_plane.url,
                       "certificate-authority-data": b64(control_plane.pki.ca_cert)},
                      {"client-certificate": str(current), "client-key": str(current)})
    with kubeconfig_client(path) as client:
        assert whoami(client) == "first-user"
        (tmp_path / "next.pem").symlink_to("second-user.pem")
        (tmp_path / "next.pem").replace(current)
        wait_for(lambda: whoami(client) == "second-user", 30,
                 "the client to sign in with the certificate the symlink now names")
        (tmp_path / "third-user.pem").replace(current)
        wait_for(lambda: whoami(client) == "third-user", 30,
                 "the client to sign in with the certificate file put in its place")


def test_a_plugin_certificate_the_server_refuses_is_fetched_again(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    # The plugin's first certificate is signed by a CA the API server does not trust
    # (say, revoked by rotating the CA): 401. As client-go, cluo runs the plugin again
    # and sends the request once more with its new certificate.
    pki = control_plane.pki
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "stranger.key", "-out", "stranger.crt", "-days", "1",
             "-subj", "/CN=stranger", cwd=tmp_path)
    answers = []
    for cert, key in ((tmp_path / "stranger.crt", tmp_path / "stranger.key"),
                      (pki.admin_cert, pki.admin_key)):
        answers.append(json.dumps({
            "apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
            "status": {"clientCertificateData": cert.read_text(),
                       "clientKeyData": key.read_text()}}))
    plugin = tmp_path / "get-cert"
    plugin.write_text(
        f"#!{sys.executable}\nfrom pathlib import Path\n"
        f"runs = Path({str(tmp_path / 'runs')!r})\n"
        "count = len(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text('x' * (count + 1))\n"
        f"print({answers!r}[min(count, 1)])\n")
    plugin.chmod(0o755)
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url, "certificate-authority": str(pki.ca_cert)},
                      {"exec": {"command": str(plugin),
                                "apiVersion": "client.authentication.k8s.io/v1beta1"}})
    with kubeconfig_client(path) as client:
        assert whoami(client) == "cluo-test-admin"
    assert (tmp_path / "runs").read_text() == "xx"


# -- a CA that is an intermediate ---------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _intermediate_pki(folder: Path) -> None:
    """root (self-signed) -> intermediate CA -> a serving certificate for 127.0.0.1."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca_ext = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
    (folder / "ca.ext").write_text(ca_ext + "subjectKeyIdentifier=hash\n"
                                   "authorityKeyIdentifier=keyid\n")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                       "extendedKeyUsage=serverAuth\n")
    _openssl("req", "-x509", *ec, "-keyout", "root.key", "-out", "root.crt", "-days", "1",
             "-subj", "/CN=cluo test root", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    for name, issuer, ext, subject in (("intermediate", "root", "ca.ext", "cluo test intermediate"),
                                       ("server", "intermediate", "server.ext", "127.0.0.1")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={subject}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.crt",
                 "-CAkey", f"{issuer}.key", "-CAcreateserial", "-days", "1",
                 "-extfile", ext, "-out", f"{name}.crt", cwd=folder)
    chain = (folder / "server.crt").read_bytes() + (folder / "intermediate.crt").read_bytes()
    (folder / "chain.crt").write_bytes(chain)


class _VersionHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"major": "1", "minor": "34", "gitVersion": "v1.34.4"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def test_a_ca_that_is_an_intermediate_is_trusted_as_kubectl_trusts_it(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The kubeconfig names the intermediate CA that signed the server's certificate, not
    the root: Go (kubectl) trusts it; Python 3.11/3.12 refuse the chain unless
    VERIFY_X509_PARTIAL_CHAIN is set."""
    _intermediate_pki(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.crt", tmp_path / "server.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VersionHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        path = kubeconfig(tmp_path / "kubeconfig",
                          {"server": url, "certificate-authority": "intermediate.crt"},
                          {"token": "not-needed-here"})
        with kubeconfig_client(path) as client:
            assert client.request("GET", "/version")["gitVersion"] == "v1.34.4"
        kubectl = control_plane.kubectl("get", "--raw", "/version", kubeconfig=path)
        assert json.loads(kubectl.stdout)["gitVersion"] == "v1.34.4"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- cluo reads a kubeconfig as kubectl does ---------------------------------------------

REFUSED = "<refused>"
EXEC_V1BETA1 = "client.authentication.k8s.io/v1beta1"


class Bed:
    """What a case builds its kubeconfig from; ``stack`` closes what it starts."""

    def __init__(self, control_plane: ControlPlane, namespace: str, folder: Path,
                 stack: contextlib.ExitStack) -> None:
        self.control_plane = control_plane
        self.pki = control_plane.pki
        self.namespace = namespace
        self.folder = folder
        self.stack = stack

    def account(self, name: str) -> tuple[str, str]:
        """A ServiceAccount token, and the user name it signs in as."""
        return (self.control_plane.service_account_token(self.namespace, name),
                f"system:serviceaccount:{self.namespace}:{name}")

    def cluster(self, **fields: Any) -> dict[str, Any]:
        return {"server": self.control_plane.url,
                "certificate-authority": str(self.pki.ca_cert), **fields}

    def admin(self, **fields: Any) -> dict[str, Any]:
        return {"client-certificate": str(self.pki.admin_cert),
                "client-key": str(self.pki.admin_key), **fields}

    def write(self, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
        return kubeconfig(self.folder / "kubeconfig", cluster, user)


Case = Callable[[Bed], tuple[Path, str]]  # the kubeconfig, and who it signs in as


def ca_file_and_data(bed: Bed) -> tuple[Path, str]:
    return bed.write(bed.cluster(**{"certificate-authority-data": b64(bed.pki.ca_cert)}),
                     bed.admin()), REFUSED


def certificate_file_and_data(bed: Bed) -> tuple[Path, str]:
    other = bed.folder / "other.pem"
    other.write_bytes(client_certificate(bed.control_plane, bed.folder, "someone-else"))
    return bed.write(bed.cluster(), bed.admin(**{"client-certificate-data": b64(other)})), \
        REFUSED


def key_file_and_data(bed: Bed) -> tuple[Path, str]:
    return bed.write(bed.cluster(), bed.admin(**{"client-key-data": b64(bed.pki.admin_key)})), \
        REFUSED


def token_and_token_file(bed: Bed) -> tuple[Path, str]:
    token, user = bed.account("agent")
    (bed.folder / "token").write_text(token)
    return bed.write(bed.cluster(), {"token": bed.account("other")[0], "tokenFile": "token"}), \
        user


def exec_token(bed: Bed) -> tuple[Path, str]:
    token, user = bed.account("admin-laptop")
    credential_plugin(bed.folder / "get-token", {"token": token})
    return bed.write(bed.cluster(), {"exec": {"command": "./get-token",  # beside it
                                              "apiVersion": EXEC_V1BETA1}}), user


def exec_certificate(bed: Bed) -> tuple[Path, str]:
    credential_plugin(bed.folder / "get-cert", {
        "clientCertificateData": bed.pki.admin_cert.read_text(),
        "clientKeyData": bed.pki.admin_key.read_text()})
    return bed.write(bed.cluster(), {"exec": {"command": str(bed.folder / "get-cert"),
                                              "apiVersion": EXEC_V1BETA1}}), "cluo-test-admin"


def exec_expiring_token(bed: Bed) -> tuple[Path, str]:
    token, user = bed.account("short-lived")
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    credential_plugin(bed.folder / "get-token", {
        "token": token, "expirationTimestamp": expires.isoformat().replace("+00:00", "Z")})
    return bed.write(bed.cluster(), {"exec": {"command": "./get-token",
                                              "apiVersion": EXEC_V1BETA1}}), user


def intermediate_ca(bed: Bed) -> tuple[Path, str]:
    # The cluster's CA as an intermediate: its name and key, signed by another root (so
    # not self-signed). Go trusts it as an anchor; OpenSSL only with a partial chain.
    folder = bed.folder
    (folder / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\n"
                                   "keyUsage=critical,keyCertSign,cRLSign\n"
                                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "root.key", "-out", "root.crt", "-days", "1",
             "-subj", "/CN=another root", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _openssl("req", "-new", "-key", str(bed.pki.folder / "ca.key"), "-subj", "/CN=cluo-test-ca",
             "-out", "intermediate.csr", cwd=folder)
    _openssl("x509", "-req", "-in", "intermediate.csr", "-CA", "root.crt", "-CAkey", "root.key",
             "-CAcreateserial", "-days", "1", "-extfile", "ca.ext", "-out", "intermediate.crt",
             cwd=folder)
    return bed.write(bed.cluster(**{"certificate-authority": "intermediate.crt"}),
                     bed.admin()), "cluo-test-admin"


def server_by_another_name(bed: Bed) -> tuple[Path, str]:
    return bed.write(bed.cluster(**{"tls-server-name": "kubernetes"}), bed.admin()), \
        "cluo-test-admin"


def server_name_the_certificate_lacks(bed: Bed) -> tuple[Path, str]:
    return bed.write(bed.cluster(**{"tls-server-name": "elsewhere.example"}), bed.admin()), \
        REFUSED


def ipv6_server(bed: Bed) -> tuple[Path, str]:
    # The serving certificate names no ::1 (and testbed/controlplane.py binds 127.0.0.1):
    # a proxy on [::1] in front of it, the certificate checked for "localhost".
    proxy = Proxy(bed.control_plane.apiserver_port, host="::1")
    bed.stack.callback(proxy.close)
    return bed.write(bed.cluster(server=f"https://[::1]:{proxy.port}",
                                 **{"tls-server-name": "localhost"}), bed.admin()), \
        "cluo-test-admin"


def cluo_identity(path: Path) -> str:
    try:
        with kubeconfig_client(path) as client:
            return whoami(client)
    except (ConfigError, *REQUEST_ERRORS):
        return REFUSED


def kubectl_identity(control_plane: ControlPlane, path: Path) -> str:
    done = control_plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                                 kubeconfig=path, check=False, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else REFUSED


@pytest.mark.parametrize("case", [
    ca_file_and_data, certificate_file_and_data, key_file_and_data, token_and_token_file,
    exec_token, exec_certificate, exec_expiring_token, intermediate_ca, server_by_another_name,
    server_name_the_certificate_lacks, ipv6_server,
], ids=lambda case: case.__name__)
def test_a_kubeconfig_signs_in_as_kubectl_says_or_is_refused_as_by_kubectl(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, case: Case
) -> None:
    with contextlib.ExitStack() as stack:
        path, expected = case(Bed(control_plane, namespace, tmp_path, stack))
        assert (cluo_identity(path), kubectl_identity(control_plane, path)) == (
            expected, expected)
