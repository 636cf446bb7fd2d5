"""Entry point of cluo-coord (composition root).

``cluo-coord [FLAGS]`` runs the coordinator. Admin subcommands, run with an admin's
kubeconfig (``--kubeconfig``, else ``$CLUO_COORD_KUBECONFIG``, else ``$KUBECONFIG``, else
``~/.kube/config``):

- ``cluo-coord release NODE``: set ``release-slot=true`` on the node, so the coordinator
  frees the reboot slot of a node that did not come back; if the Node is gone, free the
  slots that name it directly (a compare-and-swap on each slot Lease);
- ``cluo-coord slots``: list the reboot slots (holder, since when, stuck);
  ``--free SLOT|NODE`` frees one (by its Lease's name or its holder) as ``release`` does;
- ``cluo-coord retry NODE``: remove the node's ``drain-failures`` and ``drain-retry-at``,
  so a node whose drains failed (in backoff or out of the roll) queues again at once;
- ``cluo-coord pause`` / ``cluo-coord resume``: set or clear the global pause (the
  annotation ``cluo.flatcar-linux.net/paused`` on the leader Lease, with who paused, why
  and since when); ``resume`` also clears the brake's record of failed reboot proofs;
- ``cluo-coord status [-o json]``: the roll's state, slots, queue, backoff and failures
  (cluo_coord.status).

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

from cluo.errors import CluoError, ConfigError, KubeError
from cluo.kube.client import KubeClient
from cluo.kube.config import in_cluster_client, kubeconfig_client
from cluo.kube.nodes import KubeNodes
from cluo.protocol import (
    NO_DRAIN_FAILURES,
    Keys,
    drain_backoff_annotations,
)
from cluo.settings import CommandLineExit, log_aliases_used
from cluo_coord.apply import Pooled
from cluo_coord.blockers import (
    AlertBlocker,
    Blocker,
    BlockerWatch,
    PodSelectorBlocker,
    QueryBlocker,
)
from cluo_coord.cluster import ClusterCache, ClusterWriter
from cluo_coord.config import ADMIN_COMMANDS, CoordSettings, load_admin_settings, load_settings
from cluo_coord.coordinator import Coordinator, Leadership
from cluo_coord.event_poster import EventPoster
from cluo_coord.fleetlock_nodes import FleetLockService
from cluo_coord.health_config import HealthConfig
from cluo_coord.leader import (
    KubeRollState,
    LeaderElector,
    read_roll_state,
    set_paused,
)
from cluo_coord.leases import KubeSlots, lease_name
from cluo_coord.metrics import CoordMetrics, HealthServer
from cluo_coord.planner import ReleaseSlot, SlotLease
from cluo_coord.prometheus import Prometheus
from cluo_coord.status import StatusPublisher, read_status, render_json, render_text
from cluo_coord.webhooks import WebhookNotifier
from cluo_coord.workloads import KubeWorkloads, WorkloadGates

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
    log_aliases_used(log, settings.aliases_used)
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
    status = StatusPublisher(
        api, settings.namespace, settings.identity,
        node_selector=settings.node_selector)
    webhooks = WebhookNotifier(settings.webhooks, metrics, coordinator=settings.identity,
                               namespace=settings.namespace)
    blockers = BlockerWatch(blockers_of(api, settings.health),
                            settings.health.blocker_interval.total_seconds(), on_change=on_change)
    events = EventPoster(KubeNodes(api, keys))  # node Events off the grant's path
    runner = Pooled()  # different nodes' changes side by side (cluo_coord.apply)
    slots = KubeSlots(api, settings.namespace)  # one: the gate knows the records it writes
    coordinator = Coordinator(
        cache, writer=ClusterWriter(api, settings.namespace, keys),
        slots=slots, nodes=events,
        policy=settings.policy, metrics=metrics, leadership=leadership,
        roll=KubeRollState(api, settings.namespace, written=cache.put_lease), status=status,
        notifier=webhooks,
        gates=health_gates(api, settings, slots), blockers=blockers if blockers.active else None,
        runner=runner,
    )
    coordinator_box.append(coordinator)
    server: HealthServer | None = None
    if settings.metrics_port >= 0:
        server = HealthServer(settings.metrics_host, settings.metrics_port, metrics,
                              healthy=coordinator.healthy, ready=lambda: cache.synced)
        server.start()
    fleetlock: FleetLockService | None = None
    if settings.fleetlock.enabled:  # docs/fleetlock.md
        fleetlock = FleetLockService.build(
            api, settings.fleetlock, namespace=settings.namespace, keys=keys,
            node_selector=settings.node_selector, registry=metrics.registry,
            is_leader=lambda: leadership is None or leadership.is_leader,
            groups=[spec.name for spec in settings.policy.groups.specs])
    log.info("coordinator starting", extra={
        "NAMESPACE": settings.namespace, "MAX_CONCURRENT": settings.policy.max_concurrent,
        "WINDOWS": str(settings.policy.windows), "LEADER_ELECT": settings.leader_elect,
        "IDENTITY": settings.identity, "PREFIX": keys.prefix,
        "MAX_FAILED_REBOOTS": settings.policy.max_failed_reboots})
    cache.start()
    blockers.start()
    webhooks.start()
    events.start()
    status.start()
    if elector is not None:
        elector.start()
    if fleetlock is not None:
        fleetlock.start()
    try:
        coordinator.run(stop)
    finally:
        if fleetlock is not None:
            fleetlock.stop()
        status.stop()
        if elector is not None:
            elector.stop()
        cache.stop()
        if server is not None:
            server.stop()
        webhooks.stop()  # the events queued last get SHUTDOWN_GRACE to go out
        events.stop()  # the same for the Kubernetes Events
        runner.close()
        blockers.stop()
        log.info("coordinator stopped")


def health_gates(api: KubeClient, settings: CoordSettings,
                 slots: KubeSlots) -> WorkloadGates | None:
    """The health gate's adapter (None: --health-gate=false), on the coordinator's
    ``slots``."""
    if not settings.health.gate:
        return None
    return WorkloadGates(KubeWorkloads(api, settings.health.pdbs), slots)


def blockers_of(api: KubeClient, config: HealthConfig) -> list[Blocker]:
    """One blocker per --blocking-pod-selector and --prometheus-query, and the alert
    blocker when there is a --prometheus-url."""
    found: list[Blocker] = [PodSelectorBlocker(api, selector, config.blocking_pod_namespace)
                            for selector in config.blocking_pod_selectors]
    if config.prometheus_url:
        prometheus = Prometheus(config.prometheus_url)
        found += [QueryBlocker(prometheus, query) for query in config.prometheus_queries]
        found.append(AlertBlocker(prometheus, config.alert_filter))
    return found


def admin(args: Sequence[str], environ: Mapping[str, str]) -> int:
    """``release NODE``, ``slots``, ``retry NODE``, ``pause``, ``resume``, ``status`` with
    an admin's kubeconfig."""
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
            release(api, options.namespace, keys, options.node)
        elif args[0] == "retry":
            KubeNodes(api, keys).patch_metadata(
                options.node, drain_backoff_annotations(keys, NO_DRAIN_FAILURES))
            print(f"node {options.node}: {keys.drain_failures} and {keys.drain_retry_at} "
                  "removed; it queues for a reboot slot again")
        elif args[0] == "slots":
            if options.free:
                free_slot(api, options.namespace, keys, options.free)
            else:
                print_slots(KubeSlots(api, options.namespace).list()[0])
        elif args[0] == "status":
            print(status_view(api, options.namespace, keys, options.output))
        elif args[0] == "pause":
            state = set_paused(api, options.namespace, True)
            print(f"{state.describe_pause()}: no new reboot slots are granted")
        else:
            before = read_roll_state(api, options.namespace)
            set_paused(api, options.namespace, False)
            cleared = (f"; the record of {len(before.failed)} failed reboot(s) is cleared"
                       if before.failed else "")
            print(f"resumed: reboot slots are granted again{cleared}")
    except CluoError as err:
        print(f"cluo-coord {args[0]}: {err}", file=sys.stderr)
        return 1
    finally:
        api.close()
    return 0


def release(api: KubeClient, namespace: str, keys: Keys, node: str) -> None:
    """Release the slot of ``node``: through the coordinator (``release-slot=true``, which
    resets ``reboot-ok`` first) while the Node exists, directly once it is gone."""
    try:
        KubeNodes(api, keys).patch_metadata(node, {keys.release_slot: "true"})
    except KubeError as err:
        if err.kind != "not_found":
            raise
    else:
        print(f"node {node}: {keys.release_slot}=true; the coordinator frees its reboot slot")
        return
    slots = KubeSlots(api, namespace)
    held = [slot for slot in slots.list()[0] if slot.holder == node]
    if not held:
        raise CluoError(f"node {node!r} does not exist and holds no reboot slot",
                        kind="not_found")
    for slot in held:
        assert slot.resource_version is not None  # read from the API server
        slots.release(ReleaseSlot(slot.index, node, slot.resource_version, datetime.now(UTC),
                                  group=slot.group))
        print(f"node {node} is gone: reboot slot {lease_name(slot.index, slot.group)} freed")


def free_slot(api: KubeClient, namespace: str, keys: Keys, target: str) -> None:
    """``slots --free``: ``target`` is a slot Lease's name or its holder's node name."""
    listed = KubeSlots(api, namespace).list()[0]
    named = [slot for slot in listed if lease_name(slot.index, slot.group) == target]
    if named and not named[0].holder:
        print(f"reboot slot {target} is free already")
        return
    holders = {slot.holder for slot in named} or {
        slot.holder for slot in listed if slot.holder == target}
    if not holders:
        raise CluoError(f"no reboot slot is named {target!r} or held by a node of that name",
                        kind="not_found")
    for holder in sorted(h for h in holders if h):
        release(api, namespace, keys, holder)


def print_slots(slots: Sequence[SlotLease]) -> None:
    """One line per slot Lease: name, holder, acquire time, stuck."""
    rows = [("SLOT", "HOLDER", "SINCE", "STUCK")]
    for slot in slots:
        since = slot.acquired_at.isoformat(timespec="seconds") if slot.acquired_at else "-"
        rows.append((lease_name(slot.index, slot.group), slot.holder or "-",
                     since if slot.holder else "-",
                     ("yes" if slot.stuck else "no") if slot.holder else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def status_view(api: KubeClient, namespace: str, keys: Keys, output: str) -> str:
    """``cluo-coord status``: the published status with the live slots and pause, current
    or not by the live Nodes."""
    slots = KubeSlots(api, namespace).list()[0]
    view = read_status(api, namespace, slots, read_roll_state(api, namespace),
                       datetime.now(UTC), keys=keys)
    return render_json(view) if output == "json" else render_text(view)
