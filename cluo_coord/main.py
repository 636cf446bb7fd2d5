"""Entry point of cluo-coord (composition root).

``cluo-coord [FLAGS]`` runs the coordinator. Admin subcommands, run with an admin's
kubeconfig (``--kubeconfig``, else ``$CLUO_COORD_KUBECONFIG``, else ``$KUBECONFIG``, else
``~/.kube/config``):

- ``cluo-coord release NODE``: set ``release-slot=true`` on the node, so the coordinator
  frees the reboot slot of a node that did not come back;
- ``cluo-coord pause`` / ``cluo-coord resume``: set or clear the global pause (the
  annotation ``cluo.flatcar-linux.net/paused`` on the leader Lease).

Exit codes: 0 after a clean stop (SIGTERM, SIGINT) and after ``--help`` (of the program or
of an admin command), 1 on an unexpected failure, 2 on a configuration error or a bad or
unknown flag.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from cluo.errors import CluoError, ConfigError
from cluo.kube.client import KubeClient
from cluo.kube.config import in_cluster_client, kubeconfig_client
from cluo.kube.nodes import KubeNodes
from cluo.protocol import PAUSED_ANNOTATION
from cluo.settings import CommandLineExit
from cluo_coord.cluster import ClusterCache, ClusterWriter
from cluo_coord.config import ADMIN_COMMANDS, CoordSettings, load_admin_settings, load_settings
from cluo_coord.coordinator import Coordinator, Leadership
from cluo_coord.leader import LeaderElector, set_paused
from cluo_coord.leases import KubeSlots
from cluo_coord.metrics import CoordMetrics, HealthServer

log = logging.getLogger("cluo_coord")

_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, msg, logger and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key.lower()] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ
    if args and args[0] in ADMIN_COMMANDS:
        return admin(args, environ)
    try:
        settings = load_settings(args, environ)
    except CommandLineExit as done:  # --help (0), or a bad or unknown flag (2)
        return done.show(sys.stdout, sys.stderr)
    except ConfigError as err:
        print(f"cluo-coord: {err}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        api = (
            kubeconfig_client(settings.kubeconfig, "cluo-coord")
            if settings.kubeconfig
            else in_cluster_client("cluo-coord")
        )
    except ConfigError as err:
        log.error("cannot configure the kubernetes client", extra={"ERROR": str(err)})
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"SIGNAL": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run(settings, api, stop)
    except OSError as err:  # the metrics port is taken, typically
        log.error("coordinator failed to start", extra={"ERROR": str(err)})
        return 1
    finally:
        api.close()
    return 0


def run(settings: CoordSettings, api: KubeClient, stop: threading.Event) -> None:
    """Build the adapters, run until ``stop`` is set, then stop every thread."""
    keys = settings.policy.keys
    metrics = CoordMetrics()
    wake = threading.Event()  # placeholder until the coordinator exists
    coordinator_box: list[Coordinator] = []

    def on_change(*_: object) -> None:
        if coordinator_box:
            coordinator_box[0].wake()
        else:
            wake.set()

    cache = ClusterCache(
        api, settings.namespace, keys, node_selector=settings.node_selector,
        coordinator_node=settings.node_name, resync_period=settings.resync_period,
        on_change=on_change,
    )
    elector: LeaderElector | None = None
    leadership: Leadership | None = None
    if settings.leader_elect:
        elector = LeaderElector(api, settings.namespace, settings.identity, on_change=on_change)
        leadership = elector
    coordinator = Coordinator(
        cache, writer=ClusterWriter(api, settings.namespace, keys),
        slots=KubeSlots(api, settings.namespace), nodes=KubeNodes(api, keys),
        policy=settings.policy, metrics=metrics, leadership=leadership,
    )
    coordinator_box.append(coordinator)
    server: HealthServer | None = None
    if settings.metrics_port >= 0:
        server = HealthServer(settings.metrics_host, settings.metrics_port, metrics,
                              healthy=coordinator.healthy, ready=lambda: cache.synced)
        server.start()
    log.info("coordinator starting", extra={
        "NAMESPACE": settings.namespace, "MAX_CONCURRENT": settings.policy.max_concurrent,
        "WINDOWS": str(settings.policy.windows), "LEADER_ELECT": settings.leader_elect,
        "IDENTITY": settings.identity, "PREFIX": keys.prefix})
    cache.start()
    if elector is not None:
        elector.start()
    try:
        coordinator.run(stop)
    finally:
        if elector is not None:
            elector.stop()
        cache.stop()
        if server is not None:
            server.stop()
        log.info("coordinator stopped")


def admin(args: Sequence[str], environ: Mapping[str, str]) -> int:
    """``release NODE``, ``pause``, ``resume`` with an admin's kubeconfig."""
    try:
        options = load_admin_settings(args, environ)
        api = kubeconfig_client(options.kubeconfig, "cluo-coord")
    except CommandLineExit as done:  # --help (0), or a bad or unknown flag (2)
        return done.show(sys.stdout, sys.stderr)
    except ConfigError as err:
        print(f"cluo-coord {args[0]}: {err}", file=sys.stderr)
        return 2
    keys = options.keys
    try:
        if args[0] == "release":
            KubeNodes(api, keys).patch_metadata(options.node, {keys.release_slot: "true"})
            print(f"node {options.node}: {keys.release_slot}=true; the coordinator frees its "
                  "reboot slot")
        else:
            set_paused(api, options.namespace, args[0] == "pause", PAUSED_ANNOTATION)
            print("paused: no new reboot slots are granted" if args[0] == "pause"
                  else "resumed: reboot slots are granted again")
    except CluoError as err:
        print(f"cluo-coord {args[0]}: {err}", file=sys.stderr)
        return 1
    finally:
        api.close()
    return 0
