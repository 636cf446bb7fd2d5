"""Where cluo's objects live in the Kubernetes API, and how long one request may take.

Every API path cluo uses is built here, each name percent-encoded as one path segment
(a name can never reach into the path), and every request and watch takes its timeouts
from here.
"""

from __future__ import annotations

from urllib.parse import quote

__all__ = [
    "CONNECT_TIMEOUT",
    "EVENT_NAMESPACE",
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "MERGE_PATCH",
    "NODES_PATH",
    "PODS_PATH",
    "REQUEST_TIMEOUT",
    "RETRY_AFTER_ATTEMPTS",
    "RETRY_AFTER_MAX",
    "WATCH_IDLE_TIMEOUT",
    "WATCH_TIMEOUT_SECONDS",
    "Timeout",
    "events_path",
    "leases_path",
    "node_path",
    "pod_path",
    "segment",
]

Timeout = tuple[float, float]  # (connect, read) seconds

CONNECT_TIMEOUT = 5.0  # seconds to connect, TLS handshake included
REQUEST_TIMEOUT: Timeout = (CONNECT_TIMEOUT, 30.0)  # one request, its answer included
WATCH_TIMEOUT_SECONDS = 300  # the API server ends a watch after this (timeoutSeconds)
# Seconds a watch may stay silent (no event, no bookmark) before it counts as dead and is
# made again. The API server sends a watch that asked for bookmarks one about every 60 s,
# so a healthy watch is never this quiet, and a dead one is noticed within 90 s.
WATCH_IDLE_TIMEOUT = 80.0
# TCP keepalive on every connection: probe a connection idle for KEEPALIVE_IDLE seconds
# every KEEPALIVE_INTERVAL seconds, and give it up after KEEPALIVE_COUNT unanswered probes
# (a peer gone without a word is noticed within a minute, even on an idle pooled one).
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
# A 429 or 5xx answer's Retry-After: a GET is sent again after it at most
# RETRY_AFTER_ATTEMPTS times; any delay is capped at RETRY_AFTER_MAX seconds (a server
# cannot park cluo for an hour), and the caller's own deadline still rules.
RETRY_AFTER_ATTEMPTS = 3
RETRY_AFTER_MAX = 10.0

MERGE_PATCH = "application/merge-patch+json"  # RFC 7386

NODES_PATH = "/api/v1/nodes"
PODS_PATH = "/api/v1/pods"
# Node events live in "default", as the kubelet's do; `kubectl describe node` finds them.
EVENT_NAMESPACE = "default"


def segment(value: str) -> str:
    """One path segment, percent-encoded (a name can never reach into the path)."""
    return quote(value, safe="")


def node_path(name: str) -> str:
    return f"{NODES_PATH}/{segment(name)}"


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{segment(namespace)}/pods/{segment(name)}"


def events_path(namespace: str = EVENT_NAMESPACE) -> str:
    return f"/api/v1/namespaces/{segment(namespace)}/events"


def leases_path(namespace: str, name: str = "") -> str:
    """The Leases (coordination.k8s.io/v1) of ``namespace``, or the one named ``name``."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/{segment(namespace)}/leases"
    return f"{path}/{segment(name)}" if name else path
