"""A real Prometheus for the blocker tests, and a /metrics endpoint the test controls.

`MetricsTarget` serves ``/metrics`` (the text exposition format) on a loopback port from
a thread; the test sets each gauge's value (``set``). `PrometheusServer.start` runs
Debian's ``prometheus`` binary (hack/install-deps.sh installs it; never its systemd
service) in a directory of its own, on a free loopback port, scraping that target every
``SCRAPE_INTERVAL`` and evaluating the given alerting rules as often; it returns once
``/-/ready`` answers 200 and the target was scraped once. `stop` sends SIGTERM, then kills
(the control plane's process handling, testbed.controlplane).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from testbed.controlplane import _Process, free_port
from testbed.waiting import wait_for

BINARY_NAMES = ("prometheus",)
SEARCH_PATH = ("/usr/bin", "/usr/local/bin")
SCRAPE_INTERVAL = "1s"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
JOB = "testbed"


class PrometheusNotFound(RuntimeError):
    """No prometheus binary: install Debian's package (hack/install-deps.sh)."""


def find_prometheus() -> Path:
    """``$CLUO_PROMETHEUS``, else ``prometheus`` on PATH or in /usr/bin."""
    override = os.environ.get("CLUO_PROMETHEUS")
    if override:
        return Path(override)
    for name in BINARY_NAMES:
        found = shutil.which(name) or next(
            (str(Path(d) / name) for d in SEARCH_PATH if (Path(d) / name).is_file()), None)
        if found:
            return Path(found)
    raise PrometheusNotFound("no prometheus binary: apt-get install prometheus "
                             "(hack/install-deps.sh)")


class MetricsTarget:
    """Gauges the test sets, served as ``/metrics`` on 127.0.0.1 (``address``)."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = owner.exposition().encode()
                self.send_response(200 if self.path.startswith("/metrics") else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="metrics-target", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = value

    def exposition(self) -> str:
        with self._lock:
            return "".join(f"# TYPE {name} gauge\n{name} {value}\n"
                           for name, value in sorted(self._values.items()))

    def __enter__(self) -> MetricsTarget:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass
class PrometheusServer:
    """``prometheus`` as a process; its API at ``url``."""

    process: _Process
    url: str

    @classmethod
    def start(cls, workdir: Path, target: str, *,
              alert_rules: Mapping[str, str] | None = None) -> PrometheusServer:
        """Scrape ``target`` (HOST:PORT); ``alert_rules``: alert name -> PromQL, each
        firing as soon as its expression has a result (``for`` 0)."""
        workdir.mkdir(parents=True, exist_ok=True)
        rules = workdir / "rules.yml"
        rules.write_text(json.dumps({"groups": [{"name": JOB, "rules": [
            {"alert": name, "expr": expr} for name, expr in (alert_rules or {}).items()]}]}))
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": JOB,
                                "static_configs": [{"targets": [target]}]}],
        }))
        port = free_port()
        process = _Process("prometheus", [
            str(find_prometheus()), f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            workdir / "prometheus.log")
        process.start()
        server = cls(process, f"http://127.0.0.1:{port}")
        try:
            wait_for(lambda: server._ready() or not process.running(), READY_TIMEOUT,
                     "prometheus to answer /-/ready")
            if not process.running():
                raise RuntimeError(f"prometheus exited:\n{process.log_tail()}")
            wait_for(lambda: server.query(f'up{{job="{JOB}"}} == 1'), READY_TIMEOUT,
                     "prometheus to scrape the test's target once")
        except BaseException:
            server.stop()
            raise
        return server

    def query(self, promql: str) -> list[Any]:
        """The result of an instant query (empty when it has none)."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        return list(body["data"]["result"])

    def firing(self) -> set[str]:
        """The names of the alerts firing now."""
        body = self._get("/api/v1/alerts")
        return {alert["labels"]["alertname"] for alert in body["data"]["alerts"]
                if alert["state"] == "firing"}

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=5) as answer:
            return dict(json.loads(answer.read()))

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as answer:
                return int(answer.status) == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def stop(self) -> None:
        self.process.stop(STOP_TIMEOUT)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
