"""cluo's errors: each says what was being done and carries a small fixed ``kind``.

The kind is for logs (the journald field ``ERROR_KIND``), metrics and retry decisions
(``transient``); the text is for people. This module imports no I/O library, so the pure
core and every adapter can use it. Turning what the Kubernetes client raised into a
``KubeError`` is the client's job (``cluo.kube.client.kube_error``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

ErrorKind = Literal[
    "conflict",  # someone else wrote first (HTTP 409): re-read and retry
    "not_found",  # the object does not exist (404)
    "forbidden",  # not authenticated or not authorized (401, 403)
    "unavailable",  # the server or the connection failed (5xx, refused, reset)
    "invalid",  # the request or the configuration is wrong (400, 422, bad kubeconfig)
    "timeout",  # no answer in time (408, 504, client-side timeouts)
    "blocked",  # refused for now: throttled (429) or a budget says no
    "expired",  # a watch's resourceVersion is too old (410): list again
]
KINDS: frozenset[str] = frozenset(get_args(ErrorKind))

# Kinds that may go away by themselves: retrying later (after a re-read) is sensible.
TRANSIENT_KINDS: frozenset[ErrorKind] = frozenset(
    {"conflict", "unavailable", "timeout", "blocked", "expired"}
)


class CluoError(Exception):
    """Base of cluo's errors. ``kind`` is one of ``KINDS``."""

    kind: ErrorKind = "unavailable"
    # Seconds the server asked to wait before trying again (its Retry-After), if it did:
    # a caller's backoff waits at least that long.
    retry_after: float | None = None

    def __init__(self, message: str, *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


class ConfigError(CluoError):
    """A configuration file is missing, unreadable or invalid."""

    kind: ErrorKind = "invalid"


class KubeError(CluoError):
    """A Kubernetes API call failed; ``action`` says what cluo was doing."""

    def __init__(
        self,
        action: str,
        detail: str,
        *,
        kind: ErrorKind,
        status: int | None = None,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        text = f"{action}: {detail}" if detail else action
        if status is not None:
            text += f" (HTTP {status}{' ' + reason if reason else ''})"
        super().__init__(text, kind=kind)
        self.action = action
        self.detail = detail
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class WatchExpired(KubeError):
    """The watch's resourceVersion is too old (410 Gone): list (get) again, then watch."""

    kind: ErrorKind = "expired"

    def __init__(self, action: str, detail: str, resource_version: str | None) -> None:
        super().__init__(action, detail, kind="expired", status=410, reason="Expired")
        self.resource_version = resource_version


_STATUS_KINDS: dict[int, ErrorKind] = {
    400: "invalid",
    401: "forbidden",
    403: "forbidden",
    404: "not_found",
    408: "timeout",
    409: "conflict",
    410: "expired",
    422: "invalid",
    429: "blocked",
    504: "timeout",
}


def kind_for_status(status: int) -> ErrorKind:
    if status in _STATUS_KINDS:
        return _STATUS_KINDS[status]
    if status >= 500 or status == 0:
        return "unavailable"
    return "invalid"


@dataclass(frozen=True)
class StatusDetails:
    """The parts of a metav1.Status response body that say why a request failed."""

    message: str = ""
    reason: str = ""
    causes: tuple[tuple[str, str], ...] = ()  # (cause reason, cause message)
    retry_after_seconds: int | None = None  # details.retryAfterSeconds, if positive


def status_details(body: object) -> StatusDetails:
    """Read a metav1.Status response body; anything else gives (at most) a message."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body:
        return StatusDetails()
    try:
        data: Any = json.loads(body)
    except ValueError:
        return StatusDetails(message=body.strip()[:300])
    if not isinstance(data, dict):
        return StatusDetails()
    causes: list[tuple[str, str]] = []
    retry_after: int | None = None
    details = data.get("details")
    if isinstance(details, dict):
        for cause in details.get("causes") or []:
            if isinstance(cause, dict):
                causes.append((str(cause.get("reason") or ""), str(cause.get("message") or "")))
        seconds = details.get("retryAfterSeconds")
        if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0:
            retry_after = seconds
    return StatusDetails(
        message=str(data.get("message") or ""),
        reason=str(data.get("reason") or ""),
        causes=tuple(causes),
        retry_after_seconds=retry_after,
    )
