"""Prometheus's HTTP API, as the blockers read it: instant queries and the alert list.

Only two GETs (https://prometheus.io/docs/prometheus/latest/querying/api/):
``/api/v1/query?query=...`` and ``/api/v1/alerts``, each bounded by ``TIMEOUT``. Both
return the decoded JSON envelope (``status``, ``data``, or ``errorType`` and ``error``);
a bad query comes back as such an envelope (HTTP 400 or 422 with a JSON body), for
cluo_coord.health to read. A server that does not answer, or answers something that is
not JSON, raises `PrometheusError`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from cluo.errors import CluoError

QUERY_PATH = "/api/v1/query"
ALERTS_PATH = "/api/v1/alerts"
TIMEOUT = 10.0  # seconds for one request, the answer included


class PrometheusError(CluoError):
    """Prometheus could not be asked (down, unreachable, not Prometheus)."""


class Prometheus:
    """One Prometheus server, by its base URL (``http://prometheus:9090``)."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        self._url = url.rstrip("/")
        self._timeout = timeout

    @property
    def url(self) -> str:
        return self._url

    def query(self, promql: str) -> Mapping[str, Any]:
        """The envelope of an instant query at the server's current time."""
        return self._get(QUERY_PATH, {"query": promql}, f"querying {promql!r}")

    def alerts(self) -> Mapping[str, Any]:
        """The envelope of the active (pending and firing) alerts."""
        return self._get(ALERTS_PATH, {}, "listing the alerts")

    def _get(self, path: str, query: Mapping[str, str], action: str) -> Mapping[str, Any]:
        url = self._url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        where = f"{action} on Prometheus at {self._url}"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as answer:
                text = answer.read()
        except urllib.error.HTTPError as err:  # a bad query: a JSON error envelope
            text = err.read()
            if not text:
                raise PrometheusError(f"{where}: HTTP {err.code}", kind="unavailable") from err
        except (OSError, ValueError) as err:
            raise PrometheusError(f"{where}: {err}", kind="unavailable") from err
        try:
            body = json.loads(text)
        except ValueError as err:
            raise PrometheusError(f"{where}: the answer is not JSON", kind="invalid") from err
        if not isinstance(body, dict):
            raise PrometheusError(f"{where}: the answer is not a JSON object", kind="invalid")
        return body
