"""The in-house API client and its kubeconfig reader against a real kube-apiserver."""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluo.errors import KubeError
from cluo.kube.client import ApiError, FileToken, KubeClient, kube_error
from cluo.kube.config import kubeconfig_client
from cluo.kube.nodes import KubeNodes
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


def test_a_token_file_wins_over_a_token_as_with_kubectl(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(control_plane.service_account_token(namespace, "agent"))
    other = control_plane.service_account_token(namespace, "other")
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url,
                       "certificate-authority-data": b64(control_plane.pki.ca_cert)},
                      {"token": other, "tokenFile": "token"})
    with kubeconfig_client(path) as client:
        assert whoami(client) == f"system:serviceaccount:{namespace}:agent"
    whoami_kubectl = control_plane.kubectl("auth", "whoami", "-o",
                                           "jsonpath={.status.userInfo.username}",
                                           kubeconfig=path)
    assert whoami_kubectl.stdout.strip() == f"system:serviceaccount:{namespace}:agent"


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


def test_kubeconfig_with_a_credential_plugin_token(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    token = control_plane.service_account_token(namespace, "admin-laptop")
    credential_plugin(tmp_path / "get-token", {"token": token})
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url,
                       "certificate-authority": str(control_plane.pki.ca_cert)},
                      {"exec": {"command": "./get-token",
                                "apiVersion": "client.authentication.k8s.io/v1beta1"}})
    with kubeconfig_client(path, "cluo-coord") as client:  # ./get-token: next to it
        assert whoami(client) == f"system:serviceaccount:{namespace}:admin-laptop"


def test_kubeconfig_with_a_credential_plugin_client_certificate(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    pki = control_plane.pki
    credential_plugin(tmp_path / "get-cert", {
        "clientCertificateData": pki.admin_cert.read_text(),
        "clientKeyData": pki.admin_key.read_text()})
    path = kubeconfig(tmp_path / "kubeconfig",
                      {"server": control_plane.url, "certificate-authority": str(pki.ca_cert)},
                      {"exec": {"command": str(tmp_path / "get-cert"),
                                "apiVersion": "client.authentication.k8s.io/v1beta1"}})
    with kubeconfig_client(path) as client:
        assert whoami(client) == "cluo-test-admin"


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
