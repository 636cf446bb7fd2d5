"""The in-house API client against a scripted HTTP server on loopback.

What the real API server cannot be made to do on cue (close a kept-alive connection
just as a request goes out, hold a watch silent, reject a token once) is played here by
a small ``http.server`` (over TLS for credential plugins: cluo sends credentials over
https only); tests/kube/test_kube_client.py covers the rest against a real
kube-apiserver.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cluo.kube import config as kube_config
from cluo.kube.client import (
    TRANSPORT_ERRORS,
    ApiError,
    CredentialError,
    FileToken,
    KubeClient,
    MalformedResponse,
    NoAnswer,
    StaticToken,
    WatchSilent,
    kube_error,
)
from cluo.kube.config import kubeconfig_client
from cluo.kube.resources import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    RETRY_AFTER_ATTEMPTS,
    RETRY_AFTER_MAX,
)
from testbed.waiting import wait_for
from tests.unit.test_kube_config import V1, FakePlugin, exec_user

SECRET = "s3cr3t-bearer-token-value"


class Seen:
    """One request as the server saw it."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes,
                 connection: int) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.connection = connection


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: ScriptedServer
    connections: ClassVar[int] = 0

    def setup(self) -> None:
        super().setup()
        Handler.connections += 1
        self.connection_id = Handler.connections
        self.served = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.served += 1
        self.server.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body,
                                     self.connection_id))
        if self.served > 1 and self.server.drop_kept_alive > 0:
            # The race a kept-alive connection loses: the server closes it as the request
            # arrives, without an answer.
            self.server.drop_kept_alive -= 1
            self.close_connection = True
            return
        if self.path.startswith("/watch") and not self.server.answers:
            self._watch()
            return
        status, payload, *more = (self.server.answers.pop(0) if self.server.answers
                                  else self.server.answer)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (more[0] if more else {}).items():  # extra headers
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunks = self.server.watch_chunks or [
            line.encode() + b"\n" for line in self.server.watch_lines]
        for data in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        if self.server.watch_hold:
            self.server.release.wait(30)  # silent, like a watch with nothing to say
        if not self.server.watch_cut:  # else the server dies: no last chunk
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[Seen] = []
        self.answer: tuple[Any, ...] = (200, {"kind": "Thing"})
        # given first, one per request: (status, body) or (status, body, headers)
        self.answers: list[tuple[Any, ...]] = []
        self.drop_kept_alive = 0
        self.watch_lines: list[str] = []
        self.watch_hold = False
        self.watch_cut = False
        self.watch_chunks: list[bytes] = []  # raw chunks, instead of one per line
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[KubeClient]:
    with KubeClient(server.url, user_agent="cluo-agent/9.9") as client:
        yield client


def test_a_request_returns_the_json_answer_and_sends_json(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.answer = (201, {"metadata": {"name": "n1"}})
    got = client.request("PATCH", "/api/v1/nodes/n1", query={"fieldManager": "me", "dryRun": None,
                                                              "watch": True},
                         body={"a": 1}, content_type="application/merge-patch+json")
    assert got == {"metadata": {"name": "n1"}}
    (seen,) = server.seen
    assert seen.method == "PATCH"
    assert seen.path == "/api/v1/nodes/n1?fieldManager=me&watch=true"
    assert seen.headers["Content-Type"] == "application/merge-patch+json"
    assert seen.headers["Accept"] == "application/json"
    assert json.loads(seen.body) == {"a": 1}


def test_the_user_agent_names_the_component(server: ScriptedServer, client: KubeClient) -> None:
    client.request("GET", "/api")
    assert server.seen[0].headers["User-Agent"] == "cluo-agent/9.9"


def test_an_answer_outside_2xx_is_an_api_error_with_status_reason_and_body(
    server: ScriptedServer, client: KubeClient
) -> None:
    status = {"kind": "Status", "reason": "Conflict", "code": 409,
              "message": "the object has been modified"}
    server.answer = (409, status)
    with pytest.raises(ApiError) as caught:
        client.request("PUT", "/x", body={})
    assert caught.value.status == 409
    assert caught.value.reason == "Conflict"
    assert json.loads(caught.value.body) == status
    assert "the object has been modified" in str(caught.value)
    wrapped = kube_error("replacing x", caught.value)
    assert (wrapped.kind, wrapped.status) == ("conflict", 409)


def test_a_2xx_answer_that_is_not_json_is_a_transport_error(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.answer = (200, b"<html>proxy says hi</html>")
    with pytest.raises(MalformedResponse) as caught:
        client.request("GET", "/x")
    assert isinstance(caught.value, TRANSPORT_ERRORS)
    assert kube_error("reading x", caught.value).kind == "unavailable"


def test_requests_share_one_kept_alive_connection(
    server: ScriptedServer, client: KubeClient
) -> None:
    for _ in range(5):
        client.request("GET", "/x")
    assert len({seen.connection for seen in server.seen}) == 1


def test_a_get_on_a_connection_the_server_closed_is_sent_again_on_a_new_one(
    server: ScriptedServer, client: KubeClient
) -> None:
    client.request("GET", "/x")
    server.drop_kept_alive = 1
    assert client.request("GET", "/x") == {"kind": "Thing"}
    assert [seen.method for seen in server.seen] == ["GET", "GET", "GET"]
    first, dropped, retried = (seen.connection for seen in server.seen)
    assert first == dropped != retried


def test_a_post_on_a_connection_the_server_closed_is_never_sent_twice(
    server: ScriptedServer, client: KubeClient
) -> None:
    client.request("GET", "/x")
    server.drop_kept_alive = 1
    with pytest.raises(TRANSPORT_ERRORS) as caught:
        client.request("POST", "/x", body={"kind": "Event"})
    assert [seen.method for seen in server.seen] == ["GET", "POST"]
    assert kube_error("recording an event", caught.value).kind == "unavailable"
    # The next request gets a fresh connection and goes through.
    assert client.request("POST", "/x", body={}) == {"kind": "Thing"}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_a_write_the_server_may_have_received_is_never_sent_twice(
    server: ScriptedServer, client: KubeClient, method: str
) -> None:
    # The server read the request, then closed the connection without an answer: it may
    # have acted on it. Sent again, a compare-and-swap PUT would fail with 409 although
    # it succeeded.
    client.request("GET", "/x")
    server.drop_kept_alive = 1
    with pytest.raises(NoAnswer) as caught:
        client.request(method, "/api/v1/nodes/n1", query={"fieldManager": "cluo"}, body={})
    assert [seen.method for seen in server.seen] == ["GET", method]
    assert str(caught.value).startswith(f"{method} /api/v1/nodes/n1: the connection closed")
    assert "not sent again" in str(caught.value)
    assert isinstance(caught.value, TRANSPORT_ERRORS)
    assert kube_error("replacing node 'n1'", caught.value).kind == "unavailable"


def test_a_write_that_could_not_be_written_on_a_reused_connection_goes_on_a_new_one(
    server: ScriptedServer, client: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pooled connection breaks while the request is being written (the server reset
    # it as it idled): not all of it left, so the server cannot have acted on it.
    client.request("GET", "/x")
    ((pooled, _),) = client._idle

    def broken_pipe(*args: Any, **kwargs: Any) -> None:
        raise BrokenPipeError("broken pipe")

    monkeypatch.setattr(pooled, "request", broken_pipe)
    assert client.request("PUT", "/x", body={"a": 1}) == {"kind": "Thing"}
    assert [seen.method for seen in server.seen] == ["GET", "PUT"]
    assert server.seen[0].connection != server.seen[1].connection


def test_every_connection_has_tcp_keepalive(server: ScriptedServer, client: KubeClient) -> None:
    client.request("GET", "/x")
    ((connection, _),) = client._idle
    sock = connection.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (
        KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    # A peer gone silently is noticed within about a minute.
    assert KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT <= 90


# -- Retry-After -----------------------------------------------------------------------

THROTTLED = {"kind": "Status", "code": 429, "reason": "TooManyRequests",
             "message": "too many requests, please try again later"}


@pytest.fixture
def pauses(server: ScriptedServer) -> Iterator[tuple[KubeClient, list[float]]]:
    """A client whose Retry-After waits are recorded, not waited."""
    waited: list[float] = []
    with KubeClient(server.url, user_agent="cluo-agent/9.9", sleep=waited.append) as client:
        yield client, waited


def test_a_read_answered_with_retry_after_is_sent_again_after_it(
    server: ScriptedServer, pauses: tuple[KubeClient, list[float]]
) -> None:
    client, waited = pauses
    server.answers = [(429, THROTTLED, {"Retry-After": "2"}),
                      (503, b"shutting down", {"Retry-After": "1"})]
    assert client.request("GET", "/x") == {"kind": "Thing"}
    assert waited == [2.0, 1.0]
    assert [seen.method for seen in server.seen] == ["GET", "GET", "GET"]


def test_a_read_is_sent_again_a_few_times_only_and_within_its_read_timeout(
    server: ScriptedServer, pauses: tuple[KubeClient, list[float]]
) -> None:
    client, waited = pauses
    server.answer = (429, THROTTLED, {"Retry-After": "1"})
    with pytest.raises(ApiError) as caught:
        client.request("GET", "/x")
    assert waited == [1.0] * RETRY_AFTER_ATTEMPTS
    assert caught.value.retry_after == 1.0
    server.seen.clear()
    waited.clear()
    server.answer = (429, THROTTLED, {"Retry-After": "4"})
    with pytest.raises(ApiError):
        client.request("GET", "/x", timeout=(5.0, 9.0))  # 4 + 4, not a third 4
    assert waited == [4.0, 4.0]


def test_a_write_answered_with_retry_after_is_not_sent_again_but_says_how_long_to_wait(
    server: ScriptedServer, pauses: tuple[KubeClient, list[float]]
) -> None:
    client, waited = pauses
    server.answer = (429, THROTTLED, {"Retry-After": "3"})
    with pytest.raises(ApiError) as caught:
        client.request("POST", "/api/v1/namespaces/a/pods/p/eviction", body={})
    assert (caught.value.status, caught.value.retry_after) == (429, 3.0)
    assert waited == []
    assert len(server.seen) == 1
    error = kube_error("evicting pod 'a/p'", caught.value)
    assert (error.kind, error.retry_after) == ("blocked", 3.0)


@pytest.mark.parametrize(("answer", "retry_after"), [
    ((429, THROTTLED, {"Retry-After": "86400"}), RETRY_AFTER_MAX),  # capped
    ((429, {**THROTTLED, "details": {"retryAfterSeconds": 7}}), 7.0),  # from the Status
    ((500, b"oops", {"Retry-After": "2"}), 2.0),
    ((429, THROTTLED, {"Retry-After": "0"}), None),
    ((429, THROTTLED, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), None),
    ((409, {"kind": "Status"}, {"Retry-After": "2"}), None),  # only 429 and 5xx
    ((429, THROTTLED), None),
])
def test_the_retry_after_of_an_answer(
    server: ScriptedServer, pauses: tuple[KubeClient, list[float]], answer: tuple[Any, ...],
    retry_after: float | None,
) -> None:
    client, _ = pauses
    server.answer = answer
    with pytest.raises(ApiError) as caught:
        client.request("PUT", "/x", body={})
    assert caught.value.retry_after == retry_after
    assert 0 < RETRY_AFTER_MAX <= 60


def test_a_watch_refused_with_retry_after_says_how_long_to_wait(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.answers = [(429, THROTTLED, {"Retry-After": "5"})]
    with pytest.raises(ApiError) as caught:
        list(client.watch("/watch"))
    assert caught.value.retry_after == 5.0


def test_a_watch_yields_events_and_ends_with_the_stream(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.watch_lines = ['{"type": "ADDED", "object": {}}', "", '{"type": "BOOKMARK"}']
    with client.watch("/watch", query={"watch": True, "timeoutSeconds": 5}) as stream:
        events = list(stream)
    assert [event["type"] for event in events] == ["ADDED", "BOOKMARK"]
    assert server.seen[0].path == "/watch?watch=true&timeoutSeconds=5"
    with pytest.raises(RuntimeError):
        iter(stream)


def test_watch_events_split_across_chunks_are_put_back_together(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.watch_chunks = [b'{"type": "ADD', b'ED", "object": {"a": 1}}\n{"type"',
                           b': "DELETED"}\n\n{"type": ', b'"MODIFIED"}', b"\n"]
    events = list(client.watch("/watch"))
    assert events == [{"type": "ADDED", "object": {"a": 1}}, {"type": "DELETED"},
                      {"type": "MODIFIED"}]


def test_a_garbled_watch_line_is_a_transport_error(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.watch_lines = ['{"type": "ADDED", "object": {}}', '{"type": "MODI']
    with pytest.raises(MalformedResponse):
        list(client.watch("/watch"))


def test_a_watch_stream_cut_off_is_a_transport_error_not_an_end(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.watch_lines = ['{"type": "ADDED", "object": {}}']
    server.watch_cut = True
    events: list[dict[str, Any]] = []
    with pytest.raises(http.client.IncompleteRead) as caught:
        events.extend(client.watch("/watch"))
    assert [event["type"] for event in events] == ["ADDED"]
    assert kube_error("watching node 'n1'", caught.value).kind == "unavailable"


def test_a_silent_watch_closed_from_another_thread_ends_quietly(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.watch_lines = ['{"type": "ADDED", "object": {}}']
    server.watch_hold = True
    stream = client.watch("/watch", timeout=(5.0, 60.0))
    events: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            events.extend(stream)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    wait_for(lambda: events, 10, "the first event", interval=0.01)
    stream.close()
    thread.join(5)  # the read timeout is 60 s: only close() ends it this soon
    assert not thread.is_alive(), "close() did not end the blocked read"
    assert errors == []
    assert stream.closed


def test_a_silent_watch_times_out_after_its_read_timeout(
    server: ScriptedServer, client: KubeClient
) -> None:
    server.watch_hold = True
    with pytest.raises(WatchSilent) as caught:
        list(client.watch("/watch", timeout=(5.0, 0.3)))
    assert "silent (no event, no bookmark) for 0.3 s" in str(caught.value)
    assert kube_error("watching node 'n1'", caught.value).kind == "timeout"


def test_a_token_file_is_read_again_after_the_refresh_period(
    server: ScriptedServer, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    now = [0.0]
    token = FileToken(path, refresh_period=60.0, clock=lambda: now[0])
    with KubeClient(server.url, user_agent="t/1", token=token) as client:
        client.request("GET", "/x")
        path.write_text("second-token\n")  # the kubelet rotated it
        now[0] = 59.0
        client.request("GET", "/x")
        now[0] = 61.0
        client.request("GET", "/x")
        path.unlink()  # a failed re-read keeps the last token
        now[0] = 200.0
        client.request("GET", "/x")
    assert [seen.headers["Authorization"] for seen in server.seen] == [
        "Bearer first-token", "Bearer first-token", "Bearer second-token",
        "Bearer second-token",
    ]


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        FileToken(path)


def test_the_token_never_shows_in_a_repr_or_an_error(
    server: ScriptedServer, tmp_path: Path
) -> None:
    server.answer = (401, {"kind": "Status", "reason": "Unauthorized", "code": 401,
                           "message": "Unauthorized"})
    path = tmp_path / "token"
    path.write_text(SECRET)
    texts: list[str] = []
    for token in (StaticToken(SECRET), FileToken(path)):
        with KubeClient(server.url, user_agent="t/1", token=token) as client:
            texts += [repr(client), repr(token)]
            with pytest.raises(ApiError) as refused:
                client.request("GET", "/x")
            texts += [str(refused.value), repr(refused.value),
                      str(kube_error("reading x", refused.value))]
        with KubeClient("http://127.0.0.1:1", user_agent="t/1", token=token) as unreachable, \
                pytest.raises(TRANSPORT_ERRORS) as failed:
            unreachable.request("GET", "/x")
        texts += [str(failed.value), str(kube_error("reading x", failed.value))]
    assert server.seen[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert all(SECRET not in text for text in texts), texts


def test_a_server_url_must_be_http_or_https() -> None:
    for bad in ("ftp://example.com", "127.0.0.1:6443", "https://", "https://h:99999",
                "https://user@h"):
        with pytest.raises(ValueError):
            KubeClient(bad, user_agent="t/1")


def test_a_server_path_prefix_is_kept(server: ScriptedServer) -> None:
    with KubeClient(server.url + "/k8s/clusters/c1/", user_agent="t/1") as client:
        client.request("GET", "/api/v1/nodes/n1")
    assert server.seen[0].path == "/k8s/clusters/c1/api/v1/nodes/n1"


def test_transport_errors_cover_http_client_and_socket_failures() -> None:
    assert issubclass(http.client.RemoteDisconnected, TRANSPORT_ERRORS)
    assert issubclass(http.client.IncompleteRead, TRANSPORT_ERRORS)
    assert issubclass(TimeoutError, TRANSPORT_ERRORS)
    assert issubclass(ConnectionRefusedError, TRANSPORT_ERRORS)
    assert kube_error("x", TimeoutError("timed out")).kind == "timeout"
    assert kube_error("x", ConnectionRefusedError(111, "refused")).kind == "unavailable"
    wrapped = ssl.SSLError("wrapped")
    wrapped.__cause__ = TimeoutError("the read timed out")
    assert kube_error("x", wrapped).kind == "timeout", "a timeout it was raised from counts"


# -- credential plugins ------------------------------------------------------------------

UNAUTHORIZED = (401, {"kind": "Status", "code": 401, "reason": "Unauthorized",
                      "message": "Unauthorized"})
EXPIRY = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and cluo-test.example, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=cluo",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:cluo-test.example"],
        cwd=folder, check=True, capture_output=True,
    )
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def tls_server(server: ScriptedServer, server_certificate: tuple[Path, Path]) -> ScriptedServer:
    """The scripted server, speaking https (its url still says http)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*server_certificate)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def plugin_kubeconfig(
    folder: Path, server: ScriptedServer, ca: Path, plugin: FakePlugin, *,
    cluster: str = "", **exec_fields: Any,
) -> Path:
    path = folder / "kubeconfig"
    url = server.url.replace("http://", "https://")
    path.write_text(
        "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\n"
        f"clusters:\n- name: k\n  cluster: {{server: '{url}', certificate-authority: '{ca}'"
        f"{cluster}}}\n"
        f"users:\n- name: u\n  user: {{{exec_user(plugin.path, **exec_fields)}}}\n"
    )
    return path


def bearers(server: ScriptedServer) -> list[str]:
    return [seen.headers.get("Authorization", "") for seen in server.seen]


def test_a_plugin_token_is_sent_and_kept_until_shortly_before_it_expires(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    plugin = FakePlugin(tmp_path)
    plugin.answer(token="token-{run}", expires=EXPIRY.isoformat())
    now = [EXPIRY.timestamp() - 3600]
    path = plugin_kubeconfig(tmp_path, tls_server, server_certificate[0], plugin)
    with kubeconfig_client(path, clock=lambda: now[0]) as client:
        client.request("GET", "/x")
        now[0] = EXPIRY.timestamp() - 60
        client.request("GET", "/x")
        now[0] = EXPIRY.timestamp() - 10  # about to expire: fetched again
        client.request("GET", "/x")
        client.request("GET", "/x")
    assert bearers(tls_server) == ["Bearer token-1", "Bearer token-1", "Bearer token-2",
                                   "Bearer token-2"]
    assert len(plugin.runs) == 2


def test_a_plugin_token_without_expiry_is_kept_until_the_server_rejects_it(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    plugin = FakePlugin(tmp_path)  # answers token-{run}, no expirationTimestamp
    now = [0.0]
    path = plugin_kubeconfig(tmp_path, tls_server, server_certificate[0], plugin)
    with kubeconfig_client(path, clock=lambda: now[0]) as client:
        client.request("GET", "/x")
        now[0] = 10 * 365 * 86400.0
        client.request("GET", "/x")
        # Rejected: the plugin runs again and the POST, which the server did not act
        # on, is sent once more with the new token.
        tls_server.answers = [UNAUTHORIZED]
        assert client.request("POST", "/x", body={"a": 1}) == {"kind": "Thing"}
        client.request("GET", "/x")
    assert [(seen.method, bearer) for seen, bearer in zip(tls_server.seen, bearers(tls_server),
                                                          strict=True)] == [
        ("GET", "Bearer token-1"), ("GET", "Bearer token-1"), ("POST", "Bearer token-1"),
        ("POST", "Bearer token-2"), ("GET", "Bearer token-2"),
    ]
    assert len(plugin.runs) == 2


def test_a_token_rejected_again_after_a_refresh_is_an_error_not_a_loop(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    plugin = FakePlugin(tmp_path)
    tls_server.answer = UNAUTHORIZED
    path = plugin_kubeconfig(tmp_path, tls_server, server_certificate[0], plugin)
    with kubeconfig_client(path) as client, pytest.raises(ApiError) as caught:
        client.request("PATCH", "/x", body={})
    assert caught.value.status == 401
    assert bearers(tls_server) == ["Bearer token-1", "Bearer token-2"]
    assert len(plugin.runs) == 2


def test_a_rejected_static_token_is_not_sent_again(server: ScriptedServer) -> None:
    server.answer = UNAUTHORIZED
    with KubeClient(server.url, user_agent="t/1", token=StaticToken(SECRET)) as client, \
            pytest.raises(ApiError):
        client.request("POST", "/x", body={})
    assert len(server.seen) == 1


def test_a_watch_whose_token_is_rejected_starts_again_with_a_new_one(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    plugin = FakePlugin(tmp_path)
    path = plugin_kubeconfig(tmp_path, tls_server, server_certificate[0], plugin)
    tls_server.watch_lines = ['{"type": "ADDED", "object": {}}']
    with kubeconfig_client(path) as client:
        tls_server.answers = [UNAUTHORIZED]  # to the watch's first attempt
        events = list(client.watch("/watch"))
    assert [event["type"] for event in events] == ["ADDED"]
    assert bearers(tls_server) == ["Bearer token-1", "Bearer token-2"]


def _request_after_the_plugin_broke(
    tls_server: ScriptedServer, certificate: Path, tmp_path: Path,
    breaks: Callable[[FakePlugin], None],
) -> CredentialError:
    """A request once the plugin's first token expired and ``breaks`` spoiled its next run."""
    plugin = FakePlugin(tmp_path)
    plugin.answer(token=SECRET, expires=EXPIRY.isoformat())
    now = [EXPIRY.timestamp() - 3600]
    path = plugin_kubeconfig(tmp_path, tls_server, certificate, plugin)
    with kubeconfig_client(path, clock=lambda: now[0]) as client:
        client.request("GET", "/x")
        breaks(plugin)
        now[0] = EXPIRY.timestamp()
        with pytest.raises(TRANSPORT_ERRORS) as caught:
            client.request("GET", "/x")
    assert isinstance(caught.value, CredentialError)
    assert len(tls_server.seen) == 1  # nothing sent without credentials
    return caught.value


def test_a_plugin_that_fails_later_fails_the_request_as_a_transport_error(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    failed = _request_after_the_plugin_broke(
        tls_server, server_certificate[0], tmp_path,
        lambda plugin: plugin.answer(exit=1, stderr="error: the SSO session has expired\n",
                                     stdout=json.dumps({"status": {"token": SECRET}})))
    error = kube_error("reading node 'n1'", failed)
    assert error.kind == "unavailable"
    assert "the SSO session has expired" in str(error)
    assert SECRET not in str(error)


def test_a_plugin_gone_later_fails_the_request_with_its_own_kind(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # Uninstalled meanwhile: no retry will bring it back.
    failed = _request_after_the_plugin_broke(
        tls_server, server_certificate[0], tmp_path, lambda plugin: plugin.path.unlink())
    error = kube_error("reading node 'n1'", failed)
    assert error.kind == failed.kind == "not_found"
    assert not error.transient


def test_provide_cluster_info_hands_the_plugin_the_cluster(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    ca = server_certificate[0]
    plugin = FakePlugin(tmp_path)
    extension = ("extensions: [{name: client.authentication.k8s.io/exec, "
                 "extension: {audience: cluo, scopes: [a, b]}}], "
                 "tls-server-name: cluo-test.example")
    path = plugin_kubeconfig(tmp_path, tls_server, ca, plugin, cluster=", " + extension,
                             provideClusterInfo=True)
    with kubeconfig_client(path) as client:
        client.request("GET", "/x")  # verified against tls-server-name, with the token
    assert bearers(tls_server) == ["Bearer token-1"]
    (run,) = plugin.runs
    assert run["info"] == {
        "apiVersion": V1, "kind": "ExecCredential",
        "spec": {"interactive": False, "cluster": {
            "server": tls_server.url.replace("http://", "https://"),
            "tls-server-name": "cluo-test.example",
            "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
            "config": {"audience": "cluo", "scopes": ["a", "b"]},
        }},
    }


def test_a_plugin_client_certificate_is_fetched_again_when_the_server_rejects_it(
    tls_server: ScriptedServer, server_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # As client-go: any 401 runs the plugin again, even for a certificate without expiry.
    cert, key = server_certificate  # any certificate and key will do as the client's
    plugin = FakePlugin(tmp_path)
    plugin.answer(cert=cert.read_text(), key=key.read_text())
    path = plugin_kubeconfig(tmp_path, tls_server, cert, plugin)
    with kubeconfig_client(path) as client:
        client.request("GET", "/x")
        tls_server.answers = [UNAUTHORIZED]
        assert client.request("POST", "/x", body={"a": 1}) == {"kind": "Thing"}
        tls_server.answer = UNAUTHORIZED  # rejected again after a new run: an error
        with pytest.raises(ApiError) as caught:
            client.request("GET", "/x")
    assert caught.value.status == 401
    methods = [seen.method for seen in tls_server.seen]
    assert methods == ["GET", "POST", "POST", "GET", "GET"]
    assert len(plugin.runs) == 3
    # The POST went again over a new connection, made with the new certificate.
    assert tls_server.seen[1].connection != tls_server.seen[2].connection
    assert bearers(tls_server) == [""] * 5


# -- client certificate files ------------------------------------------------------------


def _client_pair(folder: Path, name: str) -> bytes:
    """A self-signed certificate and its key, in one PEM."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1",
         "-subj", f"/CN={name}"], cwd=folder, check=True, capture_output=True)
    return (folder / f"{name}.crt").read_bytes() + (folder / f"{name}.key").read_bytes()


def test_a_rotated_certificate_file_is_loaded_again_and_a_broken_one_keeps_the_last(
    server_certificate: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As the kubelet rotates kubelet-client-current.pem: a new file, the symlink moved.
    (tmp_path / "first.pem").write_bytes(_client_pair(tmp_path, "first"))
    (tmp_path / "second.pem").write_bytes(_client_pair(tmp_path, "second"))
    current = tmp_path / "current.pem"
    current.symlink_to("first.pem")
    now = [0.0]
    endpoint = kube_config._Endpoint(server="https://127.0.0.1:1", ca_file=server_certificate[0],
                                     cert_file=current, key_file=current)
    source = kube_config._FileTls(endpoint, check_period=5.0, clock=lambda: now[0])
    first = source.context()
    (tmp_path / "next").symlink_to("second.pem")
    (tmp_path / "next").replace(current)
    now[0] = 4.0
    assert source.context() is first  # not checked before the period is over
    now[0] = 5.0
    second = source.context()
    assert second is not first
    now[0] = 10.0
    assert source.context() is second  # nothing changed: nothing loaded

    current.unlink()
    current.write_bytes(b"-----BEGIN CERTIFICATE-----\nhalf-written")
    now[0] = 15.0
    with caplog.at_level(logging.WARNING, logger="cluo.kube.config"):
        assert source.context() is second
        now[0] = 20.0
        assert source.context() is second
    assert [r.getMessage() for r in caplog.records].count(
        "the client certificate files changed but do not load, keeping the last ones") == 1
    # A refused certificate has the files checked at once.
    current.write_bytes((tmp_path / "first.pem").read_bytes())
    assert source.reject_context(second)
    assert source.context() is not second
