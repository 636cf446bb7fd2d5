"""A webhook receiver for tests: a real HTTP server on a loopback port that records what
it is sent.

`HttpReceiver` answers each POST with the next status of its script (``fail_first``
answers of ``fail_status``, with ``Retry-After: retry_after`` when given, then 200) and
records every request (path, headers, body, the status it answered). With ``hang`` it
accepts every connection, reads the request and never answers until it is stopped: a
receiver that is up but dead. `refused_url` names a loopback port nobody listens on.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from testbed.controlplane import free_port

HANG_LIMIT = 60.0  # s: the longest a hanging answer is held back, in case stop never comes


@dataclass(frozen=True)
class Received:
    """One request: its path, headers (names lower-cased), body and the status answered
    (0: none, the receiver hung)."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class HttpReceiver:
    """``with HttpReceiver(fail_first=2) as receiver: ... receiver.url ...``"""

    def __init__(self, *, fail_first: int = 0, fail_status: int = 500,
                 retry_after: str = "", hang: bool = False) -> None:
        self._fail_first = fail_first
        self._fail_status = fail_status
        self._retry_after = retry_after
        self._hang = hang
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._answered = 0  # requests taken so far, hanging ones included
        self._stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                status = owner._next_status()
                if status == 0:
                    owner._record(Received(self.path, headers, body, 0))
                    owner._stopping.wait(HANG_LIMIT)
                    self.close_connection = True
                    return
                owner._record(Received(self.path, headers, body, status))
                self.send_response(status)
                if status != 200 and owner._retry_after:
                    self.send_header("Retry-After", owner._retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return  # no access log

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="http-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def delivered(self) -> list[Any]:
        """The JSON bodies answered with 200, in order."""
        return [request.json() for request in self.received() if request.status == 200]

    def _next_status(self) -> int:
        if self._hang:
            return 0
        with self._lock:
            self._answered += 1
            return self._fail_status if self._answered <= self._fail_first else 200

    def _record(self, request: Received) -> None:
        with self._lock:
            self._received.append(request)


def refused_url() -> str:
    """A loopback URL on a port nobody listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}/hook"
