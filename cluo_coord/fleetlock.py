"""cluo-coord's FleetLock server: the HTTP side of Zincati's reboot-lock protocol.

FleetLock (coreos/zincati, docs/development/fleetlock/protocol.md) is two endpoints
below a base URL, both ``POST`` with a JSON body ``{"client_params": {"id": ...,
"group": ...}}`` and the header ``fleet-lock-protocol: true``:

- ``/v1/pre-reboot``: the client asks for a reboot slot (a recursive lock: the holder
  asking again is answered yes again);
- ``/v1/steady-state``: the client gives its slot back, if it holds one.

Any 2xx is a yes. Every no is a non-2xx answer with a JSON body ``{"kind": ..., "value":
...}``: ``kind`` a short identifier from a small fixed set (Zincati counts it in its
metrics), ``value`` a sentence for the admin (Zincati logs it). Zincati asks again later
after a no, so "not yet" is a no too.

This module parses requests and writes answers; what the answer is for a valid request
comes from a ``FleetLockBackend`` (cluo_coord.fleetlock_nodes: the node's reboot cycle on
the coordinator's reboot slots). It also holds the one rule that maps a Zincati client to
its Node: Zincati's ``id`` is the host's machine id made application-specific
(``app_specific_id``). Only the leader answers; a standby says ``not_leader``.
See docs/fleetlock.md.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

PRE_REBOOT_PATH = "/v1/pre-reboot"
STEADY_STATE_PATH = "/v1/steady-state"
PROTOCOL_HEADER = "fleet-lock-protocol"
# Zincati's application id (src/identity/mod.rs): its client id is the machine id made
# specific to it, as sd_id128_get_machine_app_specific() does.
ZINCATI_APP_ID = "de35106b6ec24688b63afddaa156679b"
# A request body is a few dozen bytes; anything this large is not FleetLock.
MAX_BODY_BYTES = 16 * 1024
CLIENT_TIMEOUT = 30.0  # s a connection may stay silent (Zincati sends at once)
# The protocol's group label; Zincati refuses other groups before it sends them.
_GROUP = re.compile(r"^[a-zA-Z0-9.-]+$")
_MACHINE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


def app_specific_id(machine_id: str, app_id: str = ZINCATI_APP_ID) -> str:
    """The id Zincati sends for the host whose /etc/machine-id is ``machine_id``.

    systemd's ``sd_id128_get_machine_app_specific``: HMAC-SHA256 keyed with the 16 bytes
    of the machine id over the 16 bytes of the application id, the first 16 bytes of the
    digest made a version-4 UUID (variant 1), written as 32 lower-case hex digits
    (Zincati's ``Id128::lower_hex``). Raises ValueError for a malformed machine id.
    """
    if not _MACHINE_ID.match(machine_id):
        raise ValueError(f"not a machine id (32 hex digits): {machine_id!r}")
    digest = bytearray(hmac.new(bytes.fromhex(machine_id), bytes.fromhex(app_id),
                                hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40  # version 4
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant 1 (RFC 4122)
    return digest.hex()


class Endpoint(enum.StrEnum):
    PRE_REBOOT = "pre-reboot"
    STEADY_STATE = "steady-state"


ENDPOINTS = {PRE_REBOOT_PATH: Endpoint.PRE_REBOOT, STEADY_STATE_PATH: Endpoint.STEADY_STATE}


def endpoint_of(path: str) -> Endpoint | None:
    """The endpoint a request path names, below any base path (Zincati's ``base_url``
    may have one, e.g. behind a proxy: ``https://host/fleetlock/`` asks
    ``/fleetlock/v1/pre-reboot``)."""
    path = path.split("?", 1)[0]
    for suffix, endpoint in ENDPOINTS.items():
        if path.endswith(suffix):
            return endpoint
    return None


class Kind(enum.StrEnum):
    """Every ``kind`` an answer carries: a small fixed set, as the protocol asks."""

    OK = "ok"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_FOUND = "not_found"
    MISSING_PROTOCOL_HEADER = "missing_protocol_header"
    BAD_REQUEST = "bad_request"
    UNKNOWN_GROUP = "unknown_group"
    UNKNOWN_CLIENT = "unknown_client"
    NOT_LEADER = "not_leader"
    WAITING_FOR_SLOT = "waiting_for_slot"  # pre-reboot: queued, another node holds the slot
    DRAINING = "draining"  # pre-reboot: granted, cordoning and draining first
    CYCLE_OPEN = "cycle_open"  # pre-reboot: the last reboot's cycle is not over yet
    SLOT_HELD = "slot_held"  # steady-state: the node still holds its slot
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class ClientParams:
    id: str
    group: str


@dataclass(frozen=True)
class Request:
    endpoint: Endpoint
    client: ClientParams


@dataclass(frozen=True)
class Answer:
    """One answer: 200 with kind ``ok``, or an error status with its kind."""

    status: int
    kind: Kind
    value: str

    @classmethod
    def ok(cls, value: str) -> Answer:
        return cls(200, Kind.OK, value)

    @property
    def body(self) -> bytes:
        return json.dumps({"kind": self.kind.value, "value": self.value}).encode() + b"\n"


class FleetLockBackend(Protocol):
    """What a valid request is answered (cluo_coord.fleetlock_nodes.FleetLockNodes)."""

    def answer(self, request: Request) -> Answer: ...


def parse_request(method: str, path: str, headers: Mapping[str, str],
                  body: bytes) -> Request | Answer:
    """A FleetLock request, or the error answer it gets. ``headers`` keys in lower case."""
    endpoint = endpoint_of(path)
    if endpoint is None:
        return Answer(404, Kind.NOT_FOUND,
                      f"no FleetLock endpoint at {path!r}: POST {PRE_REBOOT_PATH} or "
                      f"{STEADY_STATE_PATH}")
    if method != "POST":
        return Answer(405, Kind.METHOD_NOT_ALLOWED,
                      f"{method} is not allowed on {path}: FleetLock requests are POST")
    if headers.get(PROTOCOL_HEADER, "").strip().lower() != "true":
        return Answer(400, Kind.MISSING_PROTOCOL_HEADER,
                      f"a FleetLock request carries the header '{PROTOCOL_HEADER}: true'")
    try:
        document: Any = json.loads(body)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError both
        return Answer(400, Kind.BAD_REQUEST, f"the body is not JSON: {err}")
    params = document.get("client_params") if isinstance(document, dict) else None
    if not isinstance(params, dict):
        return Answer(400, Kind.BAD_REQUEST,
                      'the body is not {"client_params": {"id": ..., "group": ...}}')
    client_id, group = params.get("id"), params.get("group")
    if not isinstance(client_id, str) or not client_id.strip():
        return Answer(400, Kind.BAD_REQUEST, "client_params.id is missing or empty")
    if not isinstance(group, str) or not _GROUP.match(group):
        return Answer(400, Kind.BAD_REQUEST,
                      f"client_params.group {group!r} is not a group label "
                      f"(^[a-zA-Z0-9.-]+$)")
    return Request(endpoint, ClientParams(client_id, group))


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        """A server context; raises OSError or ssl.SSLError for unreadable files."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


class FleetLockServer:
    """The FleetLock endpoints on ``host:port`` (TLS with ``tls``), in daemon threads."""

    def __init__(
        self,
        host: str,
        port: int,
        backend: FleetLockBackend,
        *,
        is_leader: Callable[[], bool],
        registry: CollectorRegistry,
        tls: TlsFiles | None = None,
    ) -> None:
        self._backend = backend
        self._is_leader = is_leader
        self.tls = tls is not None
        self.requests = Counter(
            "cluo_fleetlock_requests",
            "FleetLock requests answered, by endpoint and result (the answer's kind: ok, "
            "or why not).", ["endpoint", "result"], registry=registry)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = CLIENT_TIMEOUT  # a client that stalls does not keep its thread

            def do_POST(self) -> None:
                self._handle()

            def do_GET(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

            def do_DELETE(self) -> None:
                self._handle()

            def do_PATCH(self) -> None:
                self._handle()

            def _handle(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    self.close_connection = True
                    answer = Answer(400, Kind.BAD_REQUEST,
                                    f"the body must have a Content-Length of at most "
                                    f"{MAX_BODY_BYTES} bytes")
                    self._send(answer)
                    return
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                self._send(owner.handle(self.command, self.path, headers, body))

            def _send(self, answer: Answer) -> None:
                body = answer.body
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if answer.kind is Kind.METHOD_NOT_ALLOWED:
                    self.send_header("Allow", "POST")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # handle() logs every request with its fields

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            # The handshake happens in the request's thread (on its first read), not in
            # accept(): a client that never completes one cannot stall the server.
            self._server.socket = tls.context().wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fleetlock-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> Answer:
        """One request's answer, counted and logged."""
        parsed = parse_request(method, path, headers, body)
        if isinstance(parsed, Answer):
            answer, endpoint, client = parsed, endpoint_of(path), None
        else:
            endpoint, client = parsed.endpoint, parsed.client
            answer = self._answer(parsed)
        self.requests.labels(endpoint.value if endpoint else "other", answer.kind.value).inc()
        fields = {"ENDPOINT": endpoint.value if endpoint else path[:100], "METHOD": method,
                  "STATUS": answer.status, "KIND": answer.kind.value, "ANSWER": answer.value}
        if client is not None:
            fields |= {"CLIENT_ID": client.id, "GROUP": client.group}
        log.info("FleetLock request answered", extra=fields)
        return answer

    def _answer(self, request: Request) -> Answer:
        if not self._is_leader():
            return Answer(503, Kind.NOT_LEADER,
                          "this cluo-coord replica is a standby: only the leader answers "
                          "FleetLock (point the Service at the leader; docs/fleetlock.md)")
        try:
            return self._backend.answer(request)
        except Exception as err:  # a bug must not leave the client without an answer
            log.exception("FleetLock request failed", extra={
                "ENDPOINT": request.endpoint.value, "CLIENT_ID": request.client.id})
            return Answer(500, Kind.INTERNAL_ERROR, f"cluo-coord failed: {err}")
