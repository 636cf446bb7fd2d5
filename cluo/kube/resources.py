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
    "MERGE_PATCH",
    "NODES_PATH",
    "PODS_PATH",
    "REQUEST_TIMEOUT",
    "WATCH_READ_GRACE",
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
WATCH_READ_GRACE = 30.0  # seconds a watch may stay silent beyond its timeoutSeconds

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
