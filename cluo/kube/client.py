"""A small Kubernetes API client on the standard library: JSON requests and watches.

cluo reads and writes API objects as plain JSON (dicts with the API server's camelCase
keys), so it needs no generated models and no HTTP library: ``KubeClient.request`` sends
one call over ``http.client`` and returns the parsed answer, ``KubeClient.watch`` streams
a watch's events one JSON line at a time.

- Errors: an answer outside 2xx raises ``ApiError`` (status, reason, body, and the
  server's ``Retry-After`` advice); a broken connection, a timeout or a garbled answer
  raises one of ``TRANSPORT_ERRORS``. ``kube_error`` turns either into a ``KubeError``
  that says what cluo was doing, and ``KubeClient.call`` is ``request`` with that done:
  what adapters use.
- A 429 or 5xx answer with a ``Retry-After`` (API priority and fairness throttling, an
  API server shutting down) is waited out and sent again for a read (GET), a few times
  and within the request's read timeout; a write raises, and the delay on the error
  (``retry_after``, capped at ``RETRY_AFTER_MAX``) tells the caller's backoff how long
  to wait at least.
- Connections are kept alive in a small lock-protected pool shared by the threads; a
  watch has a connection of its own. Every connection has TCP keepalive on (a peer gone
  silently is noticed within a minute). A kept-alive connection that turns out closed is
  retried once on a fresh connection only when the server cannot have acted on the
  request: it could not be written, or it is a read. A write (POST, PUT, PATCH, DELETE)
  that went out before the connection broke may have been received: it is never sent
  twice (a compare-and-swap PUT sent again would turn its own success into a 409), and
  raises ``NoAnswer`` naming the method and path.
- The bearer token comes from a ``TokenSource``; ``FileToken`` re-reads its file about
  every minute, so rotated (bound ServiceAccount) tokens keep working. A token never
  appears in a log, an error text or a repr. When the server answers 401 (it rejected
  the token, so it did nothing else), a source that can fetch a new token (a credential
  plugin, see kube_config) is asked to, and the request (or the watch) is sent once
  more, whatever its method.
- The TLS context may come from a ``TlsSource``, asked before each new connection: a
  credential plugin's client certificate is replaced when it expires, a rotated
  certificate file is loaded again, and kept-alive connections made with the old one
  are not reused. When the server answers 401 to a request made with a client
  certificate, the source is told (a plugin runs again) and, if it has another
  certificate, the request is sent once more, as with a token.

Building a client from a kubeconfig or from a pod's ServiceAccount is kube_config's job;
API paths and timeouts are in kube.resources, reading watch events is kube.watch's job.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, NamedTuple, Protocol, Self, TypeVar
from urllib.parse import urlencode, urlsplit

from cluo.errors import ErrorKind, KubeError, kind_for_status, status_details
from cluo.kube.resources import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    REQUEST_TIMEOUT,
    RETRY_AFTER_ATTEMPTS,
    RETRY_AFTER_MAX,
    Timeout,
)

__all__ = [
    "JSON",
    "REQUEST_ERRORS",
    "TRANSPORT_ERRORS",
    "ApiError",
    "ClosableStream",
    "CredentialError",
    "FileToken",
    "KubeClient",
    "MalformedResponse",
    "NoAnswer",
    "Query",
    "StaticToken",
    "TlsSource",
    "TokenSource",
    "WatchSilent",
    "WatchStream",
    "kube_error",
]

log = logging.getLogger(__name__)

JSON = "application/json"
TOKEN_REFRESH_PERIOD = 60.0  # seconds between re-reads of a token file (as client-go)
IDLE_LIMIT = 45.0  # seconds a kept-alive connection may idle and still be reused
# Kept-alive connections kept for reuse: as many as the coordinator has requests in
# flight at once (its apply pool's 8 workers, cluo_coord.apply.WORKERS, its 4 Event
# posters, cluo_coord.event_poster.WORKERS, the health gate's read-ahead and the status
# loop), so its requests in parallel need no new TLS handshake.
MAX_IDLE_CONNECTIONS = 16
READ_SIZE = 64 * 1024  # bytes asked for per read of a watch stream
# Reads (RFC 9110 safe methods): sent again after a connection broke before the answer,
# or after a Retry-After. Idempotent writes are not: a PUT sent twice with the same
# resourceVersion fails the second time although the first succeeded.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Query = Mapping[str, str | int | bool | None]
_Item = TypeVar("_Item")


class Closing:
    """``with`` closes it: for the client, its watches and the watches built on them."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ClosableStream(Closing, Generic[_Item]):
    """A stream to iterate once, which ``close()`` stops from any thread: a read blocked
    in another thread ends and the iteration finishes quietly.

    A subclass reads in ``_events`` and unblocks a read in ``_interrupt``.
    """

    def __init__(self) -> None:
        self._started = False
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        self._interrupt()

    def __iter__(self) -> Iterator[_Item]:
        if self._started:
            raise RuntimeError("a watch can be iterated only once; start a new watch")
        self._started = True
        return self._events()

    def _events(self) -> Iterator[_Item]:
        raise NotImplementedError

    def _interrupt(self) -> None:
        raise NotImplementedError


class ApiError(Exception):
    """The API server answered outside 2xx. ``body`` is its text, usually a metav1.Status.

    ``retry_after``: the seconds a 429 or 5xx answer asked to wait before trying again
    (its ``Retry-After``, or its Status's ``details.retryAfterSeconds``), capped at
    ``RETRY_AFTER_MAX``; None when it gave no such advice.
    """

    def __init__(
        self, status: int, reason: str, body: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.body = body
        self.retry_after = retry_after

    def __str__(self) -> str:
        message = status_details(self.body).message
        text = f"HTTP {self.status} {self.reason}".rstrip()
        return f"{text}: {message}" if message else text


class MalformedResponse(http.client.HTTPException):
    """A 2xx answer (or a watch line) that is not the JSON object it should be."""


class WatchSilent(TimeoutError):
    """A watch stream said nothing (no event, no bookmark) for longer than its read
    timeout: its connection may have died without a word, or the server had nothing to
    say and sent no bookmark (it sends them only once it has seen a change of that kind
    since it started). Either way, make the watch again."""


class NoAnswer(http.client.HTTPException):
    """The connection broke after the request went out and before its answer came.

    The server may have received the request and acted on it; a write is therefore not
    sent again (the caller reads and decides), and the text says so. ``method`` and
    ``path`` name the request.
    """

    def __init__(self, method: str, path: str) -> None:
        again = ("" if method in SAFE_METHODS else
                 "; it may have reached the server, so it was not sent again")
        super().__init__(f"{method} {path}: the connection closed before an answer{again}")
        self.method = method
        self.path = path


class CredentialError(Exception):
    """The credentials for a request could not be had (a credential plugin failed).

    Nothing was sent. The text says what failed and never quotes a credential; ``kind``
    is an ``errors.ErrorKind`` (``not_found``: no such plugin, ``invalid``: it answered
    nonsense, ``unavailable``: it failed or took too long).
    """

    def __init__(self, message: str, *, kind: ErrorKind = "unavailable") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


# What a request can raise besides ApiError: socket, TLS and timeout errors (all OSError),
# http.client's protocol errors (a cut-off body, a garbled status line) and a failure to
# get the credentials (CredentialError). None of them has an answer from the server.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, CredentialError)
# Everything a request can raise: an answer outside 2xx, or no answer at all.
REQUEST_ERRORS = (ApiError, *TRANSPORT_ERRORS)

# A kept-alive connection the server closed while it idled fails with one of these before
# any answer arrives.
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


def kube_error(action: str, err: BaseException) -> KubeError:
    """The ``KubeError`` for what a request raised (one of ``REQUEST_ERRORS``) while cluo
    was doing ``action``. Use as ``raise kube_error("patching node 'n1'", err) from err``.
    """
    if isinstance(err, ApiError):
        details = status_details(err.body)
        reason = details.reason or err.reason
        return KubeError(
            action, details.message or reason, kind=kind_for_status(err.status),
            status=err.status, reason=reason, retry_after=err.retry_after,
        )
    if isinstance(err, CredentialError):  # it says what kind it is
        return KubeError(action, f"{type(err).__name__}: {err}", kind=err.kind)
    if _is_timeout(err):
        return KubeError(action, f"no answer in time ({type(err).__name__})", kind="timeout")
    return KubeError(action, f"{type(err).__name__}: {err}", kind="unavailable")


def _is_timeout(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it was raised from is a timeout (``socket.timeout`` is
    the built-in TimeoutError; ``ssl`` and ``http.client`` wrap nothing else)."""
    for _ in range(5):
        if err is None:
            return False
        if isinstance(err, TimeoutError):
            return True
        err = err.__cause__ or err.__context__
    return False


class _Status(Protocol):
    @property
    def status(self) -> int: ...


_Answered = TypeVar("_Answered", bound=_Status)


class _Answer(NamedTuple):
    """A request's whole answer."""

    status: int
    reason: str
    body: bytes
    retry_after: float | None


def _retry_after(status: int, header: str | None, body: bytes | str) -> float | None:
    """The delay a 429 or 5xx answer asks for: its ``Retry-After`` in seconds (the API
    server sends no HTTP date), else its Status's ``details.retryAfterSeconds``; capped
    at ``RETRY_AFTER_MAX``. None: no advice, or another status."""
    if status != 429 and status < 500:
        return None
    seconds: float | None = None
    if header is not None:
        with contextlib.suppress(ValueError):
            seconds = int(header.strip())
    if seconds is None:
        seconds = status_details(body).retry_after_seconds
    if seconds is None or seconds <= 0:
        return None
    return min(float(seconds), RETRY_AFTER_MAX)


class TokenSource(Protocol):
    """Where the bearer token comes from; ``get`` is called for every request.

    ``reject`` is called when the server answered 401 to a request that carried
    ``token``: True if ``get`` may now give a different one (the request is then sent
    once more), False if there is no point. ``get`` may raise ``CredentialError``.
    """

    def get(self) -> str: ...

    def reject(self, token: str) -> bool: ...


class TlsSource(Protocol):
    """Where the TLS context (CA, client certificate) comes from; ``context`` is asked
    before each new connection, and a changed answer retires the kept-alive connections.

    ``reject_context`` is called when the server answered 401 to a request made with
    ``context`` (it refused the client certificate): True if ``context`` may now give
    another one (the request is then sent once more), False if there is no point.
    ``context`` may raise ``CredentialError``.
    """

    def context(self) -> ssl.SSLContext: ...

    def reject_context(self, context: ssl.SSLContext) -> bool: ...


class _FixedTls:
    """One TLS context, for good."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context

    def context(self) -> ssl.SSLContext:
        return self._context

    def reject_context(self, context: ssl.SSLContext) -> bool:
        return False


class StaticToken:
    """A bearer token given once (a kubeconfig's ``token``)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the token is empty")
        self._token = token

    def get(self) -> str:
        return self._token

    def reject(self, token: str) -> bool:
        return False

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"


class FileToken:
    """A bearer token read from a file, and read again every ``refresh_period`` seconds.

    Bound ServiceAccount tokens are rotated in place by the kubelet; a re-read that fails
    keeps the last token (logged), as client-go does. The first read raises ``OSError``,
    or ``ValueError`` when the file is empty.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        refresh_period: float = TOKEN_REFRESH_PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._refresh_period = refresh_period
        self._clock = clock
        self._lock = threading.Lock()
        self._token = self._read()
        self._read_at = clock()

    def get(self) -> str:
        with self._lock:
            now = self._clock()
            if now - self._read_at >= self._refresh_period:
                self._read_at = now
                try:
                    self._token = self._read()
                except (OSError, ValueError) as err:
                    log.warning("could not read the token file again, keeping the last token",
                                extra={"PATH": str(self.path), "ERROR": type(err).__name__})
            return self._token

    def reject(self, token: str) -> bool:
        return False  # the file is re-read on its own schedule, as client-go does

    def _read(self) -> str:
        token = self.path.read_text().strip()
        if not token:
            raise ValueError(f"the token file {str(self.path)!r} is empty")
        return token

    def __repr__(self) -> str:
        return f"FileToken({str(self.path)!r})"


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS whose certificate is checked against ``server_name`` (tls-server-name), if set."""

    def __init__(
        self, host: str, port: int, *, timeout: float, context: ssl.SSLContext,
        server_name: str | None,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.tls_context = context
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self.tls_context.wrap_socket(
            self.sock, server_hostname=self._server_name or self.host
        )


def _keep_alive(sock: socket.socket) -> None:
    """Turn on TCP keepalive (``KEEPALIVE_*``): a peer that vanished without closing the
    connection (a host gone, a NAT entry dropped) fails a blocked read or the next use of
    a pooled connection instead of hanging it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's timers apply
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle connection was closed by the server (it is readable: EOF or junk)."""
    sock = connection.sock
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _query_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class KubeClient(Closing):
    """JSON requests and watches to one API server, as one user (thread-safe).

    ``server``: ``https://host[:port][/prefix]`` (``http://`` only for tests). ``tls``:
    the TLS context (CA, client certificate), or a ``TlsSource`` giving the current one
    before each new connection; None uses the system's CAs. ``token``: the bearer
    token, if any. ``user_agent``: names the component and version in API server logs,
    audit events and managedFields. ``sleep`` waits out a Retry-After (default: a wait
    that ``close()`` cuts short).
    """

    def __init__(
        self,
        server: str,
        *,
        user_agent: str,
        tls: ssl.SSLContext | TlsSource | None = None,
        token: TokenSource | None = None,
        tls_server_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"the server {server!r} is not an https:// URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the server URL may not carry a query, fragment or user name")
        self.server = server.rstrip("/")
        self.user_agent = user_agent
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)  # ValueError if invalid
        self._prefix = parts.path.rstrip("/")
        self._tls: TlsSource | None = None
        if self._https:
            if tls is None or isinstance(tls, ssl.SSLContext):
                self._tls = _FixedTls(tls or ssl.create_default_context())
            else:
                self._tls = tls
        self._tls_server_name = tls_server_name
        self._token = token
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._closed = False
        self._closing = threading.Event()
        self._sleep = sleep or self._closing.wait

    def __repr__(self) -> str:
        return f"KubeClient({self.server!r}, user_agent={self.user_agent!r})"

    def close(self) -> None:
        """Close the idle connections; later requests open (and close) their own."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        self._closing.set()
        for connection, _ in idle:
            connection.close()

    # -- requests ------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: Timeout = REQUEST_TIMEOUT,
    ) -> Any:
        """Send one request; return the answer's JSON ({} for an empty body).

        ``body`` (if not None) is sent as JSON with ``content_type`` (e.g. a merge
        patch). Raises ``ApiError`` for an answer outside 2xx, one of
        ``TRANSPORT_ERRORS`` when the request or the answer did not get through. A read
        answered with a Retry-After is sent again after it, up to
        ``RETRY_AFTER_ATTEMPTS`` times and ``timeout[1]`` seconds of waiting in all.
        """
        method = method.upper()
        target = self._target(path, query)
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        sent_type = content_type if payload is not None else None
        waited, attempts = 0.0, 0
        while True:
            answer = self._authorized(lambda token: self._exchange(
                method, target, payload, self._headers(sent_type, token), timeout))
            if 200 <= answer.status <= 299:
                break
            error = ApiError(answer.status, answer.reason,
                             answer.body.decode("utf-8", "replace"),
                             retry_after=answer.retry_after)
            delay = error.retry_after
            if (method not in SAFE_METHODS or delay is None or attempts >= RETRY_AFTER_ATTEMPTS
                    or waited + delay > timeout[1] or self._closing.is_set()):
                raise error
            log.info("the API server asked to try again later", extra={
                "METHOD": method, "STATUS": answer.status, "RETRY_IN": delay})
            self._sleep(delay)
            waited, attempts = waited + delay, attempts + 1
        if not answer.body:
            return {}
        try:
            return json.loads(answer.body)
        except ValueError:
            raise MalformedResponse(
                f"{method} answered {answer.status} with a body that is not JSON"
            ) from None

    def call(
        self,
        action: str,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: Timeout = REQUEST_TIMEOUT,
    ) -> Any:
        """``request``, raising a ``KubeError`` that says what cluo was doing (``action``,
        e.g. "reading node 'n1'") for whatever ``request`` raises."""
        try:
            return self.request(method, path, query=query, body=body,
                                content_type=content_type, timeout=timeout)
        except REQUEST_ERRORS as err:
            raise kube_error(action, err) from err

    def watch(
        self,
        path: str,
        *,
        query: Query | None = None,
        timeout: Timeout = REQUEST_TIMEOUT,
    ) -> WatchStream:
        """A streaming GET (``watch=true`` belongs in ``query``), on its own connection.

        Nothing is sent until the result is iterated; ``timeout[1]`` is how long the
        stream may stay silent before it counts as dead (``WatchSilent``), so it should
        exceed the time between the server's bookmarks (``allowWatchBookmarks``).
        """
        return WatchStream(self, self._target(path, query), timeout)

    # -- connections ---------------------------------------------------------------------

    def _target(self, path: str, query: Query | None) -> str:
        if not path.startswith("/"):
            raise ValueError(f"an API path starts with '/', not {path[:1]!r}")
        target = self._prefix + path
        items = [(k, _query_value(v)) for k, v in (query or {}).items() if v is not None]
        return f"{target}?{urlencode(items)}" if items else target

    def _bearer(self) -> str | None:
        """The token for the next request, if any (may raise ``CredentialError``)."""
        return self._token.get() if self._token is not None else None

    def _renew(self, token: str | None, context: ssl.SSLContext | None) -> bool:
        """After a 401 to a request made with ``token`` and ``context``: whether the
        token source or the TLS source has a new credential to try (both are told)."""
        renewed = token is not None and self._token is not None and self._token.reject(token)
        if context is not None and self._tls is not None:
            renewed = self._tls.reject_context(context) or renewed
        return renewed

    def _authorized(self, send: Callable[[str | None], _Answered]) -> _Answered:
        """``send(token)`` with the current credentials and, if the server answers 401
        and the token source or the TLS source (a client certificate) has a new one,
        once more with that.

        The server rejected the credentials before acting on the request: sending it
        again, even a POST, cannot do it twice.
        """
        token = self._bearer()
        context = self._tls.context() if self._tls is not None else None
        answer = send(token)
        if answer.status == 401 and self._renew(token, context):
            log.info("the API server rejected the credentials, retrying with new ones")
            answer = send(self._bearer())
        return answer

    def _exchange(
        self, method: str, target: str, payload: bytes | None, headers: dict[str, str],
        timeout: Timeout,
    ) -> _Answer:
        """One request and its whole answer, on an idle kept-alive connection if any.

        A kept-alive connection that turns out closed is retried once on a fresh
        connection when the server cannot have acted on the request: it could not be
        written (not all of it left), or it is a read. A request that went out before
        the connection broke raises ``NoAnswer`` otherwise.
        """
        fresh = False
        while True:
            connection, reused = self._checkout(timeout, fresh=fresh)
            written = False
            try:
                connection.request(method, target, body=payload, headers=headers)
                written = True
                response = connection.getresponse()
                data = response.read()
            except _STALE_CONNECTION_ERRORS as err:
                connection.close()
                if reused and not fresh and (not written or method in SAFE_METHODS):
                    # The server closed it while it idled: so did it, likely, the others.
                    log.debug("a kept-alive connection was closed by the server, "
                              "reconnecting", extra={"METHOD": method, "WRITTEN": written})
                    self._drop_idle()
                    fresh = True
                    continue
                if not written:
                    raise
                raise NoAnswer(method, target.split("?", 1)[0]) from err
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                self._checkin(connection)
            return _Answer(response.status, response.reason, data, _retry_after(
                response.status, response.getheader("Retry-After"), data))

    def _headers(self, content_type: str | None, token: str | None) -> dict[str, str]:
        headers = {"Accept": JSON, "User-Agent": self.user_agent}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _connect(self, timeout: Timeout) -> http.client.HTTPConnection:
        """A new connection, connected (TLS handshake included) within ``timeout[0]``."""
        connection: http.client.HTTPConnection
        if self._tls is not None:
            connection = _HTTPSConnection(
                self._host, self._port, timeout=timeout[0], context=self._tls.context(),
                server_name=self._tls_server_name,
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout[0])
        try:
            connection.connect()
            _keep_alive(connection.sock)
            connection.sock.settimeout(timeout[1])
        except BaseException:
            connection.close()
            raise
        return connection

    def _checkout(
        self, timeout: Timeout, *, fresh: bool
    ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection (reused=True), or a new one.

        An idle connection made with another TLS context than the current one (an
        expired client certificate was replaced) is closed, not reused.
        """
        now = self._clock()
        context = self._tls.context() if self._tls is not None else None
        while not fresh:
            with self._lock:
                if not self._idle:
                    break
                connection, since = self._idle.pop()
            if (now - since <= IDLE_LIMIT
                    and getattr(connection, "tls_context", None) is context
                    and not _dropped(connection)):
                connection.sock.settimeout(timeout[1])
                return connection, True
            connection.close()
        return self._connect(timeout), False

    def _checkin(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append((connection, self._clock()))
                return
        connection.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()


class WatchStream(ClosableStream[dict[str, Any]]):
    """One watch request: iterate once for its events (decoded JSON objects).

    The iteration ends when the server ends the watch (its ``timeoutSeconds``).
    ``close()``, from any thread, stops it: a read blocked in another thread ends and
    the iteration finishes quietly.
    """

    def __init__(self, client: KubeClient, target: str, timeout: Timeout) -> None:
        super().__init__()
        self._client = client
        self._target = target
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def _interrupt(self) -> None:
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _events(self) -> Iterator[dict[str, Any]]:
        if self._closed.is_set():
            return
        try:
            response = self._client._authorized(self._send)
            if not 200 <= response.status <= 299:
                body = response.read().decode("utf-8", "replace")
                raise ApiError(response.status, response.reason, body, retry_after=_retry_after(
                    response.status, response.getheader("Retry-After"), body))
            try:
                yield from _json_lines(response)
            except TimeoutError as err:
                raise WatchSilent(f"the watch stayed silent (no event, no bookmark) for "
                                  f"{self._timeout[1]:g} s") from err
        except TRANSPORT_ERRORS:
            if self._closed.is_set():
                return
            raise
        finally:
            self._disconnect()

    def _send(self, token: str | None) -> http.client.HTTPResponse:
        """Send the watch request on a new connection (closing the one of an attempt
        whose token was rejected) and read the answer's head."""
        self._disconnect()
        connection = self._connection = self._client._connect(self._timeout)
        if self._closed.is_set():  # closed while connecting: there was no socket to shut
            raise ConnectionAbortedError("the watch was closed")
        connection.request("GET", self._target, headers=self._client._headers(None, token))
        return connection.getresponse()

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _json_lines(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a newline-delimited stream, each as soon as its line is in.

    ``read1`` rather than ``readline``: on a chunked stream cut off mid-way (the server
    died) http.client's ``readline`` returns b"" as at a clean end, ``read1`` raises
    ``IncompleteRead``.
    """
    pending: list[bytes] = []
    while True:
        data = response.read1(READ_SIZE)
        if not data:
            if any(part.strip() for part in pending):
                raise MalformedResponse("the watch stream ended in the middle of an event")
            return
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line = b"".join((*pending, data[start:end])) if pending else data[start:end]
            pending.clear()
            start = end + 1
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                raise MalformedResponse("a watch event is not JSON") from None
            if not isinstance(event, dict):
                raise MalformedResponse("a watch event is not a JSON object")
            yield event
        if start < len(data):
            pending.append(data[start:])
