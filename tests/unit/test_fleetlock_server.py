"""The FleetLock server's HTTP side on a loopback port (cluo_coord/fleetlock.py): only the
leader answers, a failing backend still answers in the protocol's shape, an oversized
body is refused, every request is counted, and with TLS files it speaks HTTPS only."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cluo_coord.fleetlock import Answer, FleetLockServer, Request, TlsFiles
from tests.unit.test_kube_client import server_certificate

__all__ = ["server_certificate"]  # the fixture: a self-signed certificate for 127.0.0.1

BODY = json.dumps({"client_params": {"id": "a" * 32, "group": "default"}}).encode()
HEADERS = {"fleet-lock-protocol": "true"}


class Backend:
    def __init__(self) -> None:
        self.asked: list[Request] = []
        self.fail = False

    def answer(self, request: Request) -> Answer:
        self.asked.append(request)
        if self.fail:
            raise RuntimeError("a bug")
        return Answer.ok("reboot now")


class Leadership:
    leader = True

    def __call__(self) -> bool:
        return self.leader


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def leadership() -> Leadership:
    return Leadership()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def server(backend: Backend, leadership: Leadership, registry: CollectorRegistry
           ) -> Iterator[FleetLockServer]:
    running = FleetLockServer("127.0.0.1", 0, backend, is_leader=leadership,
                              registry=registry)
    running.start()
    yield running
    running.stop()


def post(port: int, path: str = "/v1/pre-reboot", body: bytes = BODY,
         headers: dict[str, str] = HEADERS, context: ssl.SSLContext | None = None
         ) -> tuple[int, dict[str, Any]]:
    connection = (http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
                  if context else http.client.HTTPConnection("127.0.0.1", port, timeout=5))
    try:
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def test_the_leader_answers_from_the_backend(server: FleetLockServer, backend: Backend,
                                             registry: CollectorRegistry) -> None:
    assert post(server.port) == (200, {"kind": "ok", "value": "reboot now"})
    assert [r.client.id for r in backend.asked] == ["a" * 32]
    assert registry.get_sample_value("cluo_fleetlock_requests_total",
                                     {"endpoint": "pre-reboot", "result": "ok"}) == 1


def test_a_standby_answers_not_leader_and_asks_nothing(
    server: FleetLockServer, backend: Backend, leadership: Leadership,
    registry: CollectorRegistry,
) -> None:
    leadership.leader = False
    status, error = post(server.port, "/v1/steady-state")
    assert (status, error["kind"]) == (503, "not_leader")
    assert backend.asked == []
    assert registry.get_sample_value("cluo_fleetlock_requests_total",
                                     {"endpoint": "steady-state", "result": "not_leader"}) == 1


def test_a_failing_backend_is_an_internal_error_in_the_protocols_shape(
    server: FleetLockServer, backend: Backend,
) -> None:
    backend.fail = True
    status, error = post(server.port)
    assert (status, error["kind"]) == (500, "internal_error")
    assert "a bug" in error["value"]


def test_an_oversized_body_is_refused_unread(server: FleetLockServer, backend: Backend) -> None:
    status, error = post(server.port, body=b"x" * 20_000)
    assert (status, error["kind"]) == (400, "bad_request")
    assert backend.asked == []


def test_with_tls_files_the_server_speaks_https_only(
    backend: Backend, leadership: Leadership, server_certificate: tuple[Path, Path],
) -> None:
    cert, key = server_certificate
    running = FleetLockServer("127.0.0.1", 0, backend, is_leader=leadership,
                              registry=CollectorRegistry(), tls=TlsFiles(cert, key))
    running.start()
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        # A client that connects and never shakes hands does not stall the others.
        with socket.create_connection(("127.0.0.1", running.port), timeout=5):
            assert post(running.port, context=trusting)[0] == 200
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            post(running.port)
    finally:
        running.stop()
