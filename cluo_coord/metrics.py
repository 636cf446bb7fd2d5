"""Prometheus metrics and health endpoints of cluo-coord, served from a thread.

``/metrics`` is the Prometheus text exposition of the coordinator's own registry (no
process-global collectors); ``/healthz`` answers 200 while the reconcile loop ticks
(a wedged loop fails it, and the kubelet restarts the pod); ``/readyz`` answers 200 once
the Node and Lease caches are synced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cluo_coord.planner import SlotLease
from cluo_coord.webhooks import DELIVERY_RESULTS

log = logging.getLogger(__name__)

HANDOFF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class CoordMetrics:
    """The coordinator's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.nodes_needing_reboot = Gauge(
            "cluo_nodes_needing_reboot", "Nodes whose agent reports reboot-needed=true.",
            registry=r)
        self.nodes_in_flight = Gauge(
            "cluo_nodes_in_flight",
            "Nodes counted against --max-concurrent (holding a slot or granted).", registry=r)
        self.slot_holder_info = Gauge(
            "cluo_slot_holder_info",
            "One series per held reboot slot; the value is the acquire time (Unix seconds).",
            ["slot", "node"], registry=r)
        self.grants = Counter(
            "cluo_grants", "reboot-ok=true grants written by this process.", registry=r)
        self.handoff_seconds = Histogram(
            "cluo_handoff_seconds",
            "Time from a slot's release to the next reboot-ok grant on that slot.",
            buckets=HANDOFF_BUCKETS, registry=r)
        self.stuck_nodes = Gauge(
            "cluo_stuck_nodes", "Slot holders marked stuck (past --reboot-timeout).",
            registry=r)
        self.reconcile_errors = Counter(
            "cluo_reconcile_errors", "Failed reconcile steps, by error kind.", ["kind"],
            registry=r)
        self.events = Counter(
            "cluo_events", "Events posted by this process, by type and reason.",
            ["type", "reason"], registry=r)
        self.nodes_with_malformed_values = Gauge(
            "cluo_nodes_with_malformed_values",
            "Nodes with a value of a cluo key that does not follow the protocol (each is "
            "reported by a MalformedValue Event).", registry=r)
        self.nodes_in_drain_backoff = Gauge(
            "cluo_nodes_in_drain_backoff",
            "Nodes that need a reboot but wait until their drain-retry-at: their last drain "
            "failed (each failure is reported by a DrainBlocked Event).", registry=r)
        self.nodes_out_of_roll = Gauge(
            "cluo_nodes_out_of_roll",
            "Nodes whose drain failed --max-drain-attempts times in a row: they get no "
            "reboot slot until an admin clears them (cluo-coord retry NODE).", registry=r)
        self.group_nodes_in_flight = Gauge(
            "cluo_group_nodes_in_flight",
            "Nodes in flight (holding a slot or granted), by group (--group, else the "
            "nodes' group label, else 'default').", ["group"], registry=r)
        self.group_nodes_queued = Gauge(
            "cluo_group_nodes_queued",
            "Nodes waiting for a reboot slot, by group.", ["group"], registry=r)
        self._groups_seen: set[str] = set()
        self.nodes_unavailable = Gauge(
            "cluo_nodes_unavailable",
            "Nodes that count against --max-unavailable: NotReady, cordoned (by anyone), "
            "being deleted, or in flight (each once).", registry=r)
        self.is_leader = Gauge(
            "cluo_is_leader", "1 while this process holds the leader Lease.", registry=r)
        self.grants_held = Gauge(
            "cluo_grants_held",
            "What holds new reboot slots while nodes wait for one, by kind (paused, "
            "window, blocker, ...): the number of such holds (the status view's holds).",
            ["reason"], registry=r)
        self._hold_kinds: set[str] = set()
        self.blockers_firing = Gauge(
            "cluo_blockers_firing",
            "Blockers firing now (--blocking-pod-selector, --prometheus-query, alerts), "
            "those that cannot be evaluated included.", registry=r)
        self.health_gates_closed = Gauge(
            "cluo_health_gates_closed",
            "Slot holders back from their reboot whose slot waits for their workloads to "
            "recover (the health gate).", registry=r)
        self.roll_paused = Gauge(
            "cluo_roll_paused",
            "1 while the roll is paused, by who paused it: admin (cluo-coord pause, --pause) "
            "or brake (--max-failed-reboots); 0 for the other.", ["by"], registry=r)
        self.failed_reboots = Gauge(
            "cluo_failed_reboots",
            "Nodes on the brake's record: they failed the reboot proof since the last "
            "resume (each reported by a Warning Event).", registry=r)
        self.webhook_deliveries = Counter(
            "cluo_webhook_deliveries",
            "Roll events for a --webhook-url, by how they ended: delivered (a 2xx), refused "
            "(another final answer), failed (no 2xx after the last attempt), dropped (a full "
            "queue, or the coordinator stopped first).", ["result"], registry=r)
        for result in DELIVERY_RESULTS:  # each reads 0 until it happens
            self.webhook_deliveries.labels(result=result)
        self.webhook_retries = Counter(
            "cluo_webhook_retries",
            "Webhook attempts that failed and were tried again (no answer, 429, 5xx).",
            registry=r)

    def observe_cluster(
        self, needing_reboot: int, in_flight: int, slots: Iterable[SlotLease]
    ) -> None:
        self.nodes_needing_reboot.set(needing_reboot)
        self.nodes_in_flight.set(in_flight)
        self.slot_holder_info.clear()
        stuck = 0
        for slot in slots:
            if not slot.holder:
                continue
            since = slot.acquired_at.timestamp() if slot.acquired_at else 0.0
            label = f"{slot.group}/{slot.index}" if slot.group else str(slot.index)
            self.slot_holder_info.labels(slot=label, node=slot.holder).set(since)
            stuck += slot.stuck
        self.stuck_nodes.set(stuck)

    def observe_roll(self, paused_by: str, failed_reboots: int) -> None:
        """``paused_by``: "admin", "brake" or "" (running); an unknown pauser counts as
        admin (a pause written by an older cluo-coord)."""
        by = (paused_by if paused_by in ("admin", "brake") else "admin") if paused_by else ""
        for who in ("admin", "brake"):
            self.roll_paused.labels(by=who).set(1 if who == by else 0)
        self.failed_reboots.set(failed_reboots)

    def observe_groups(self, groups: Iterable[tuple[str, int, int]], unavailable: int) -> None:
        """Planner rule 15: (group, in flight, queued) per group; a group seen before and
        absent now reads 0."""
        seen = set()
        for group, in_flight, queued in groups:
            self.group_nodes_in_flight.labels(group=group).set(in_flight)
            self.group_nodes_queued.labels(group=group).set(queued)
            seen.add(group)
        for group in self._groups_seen - seen:
            self.group_nodes_in_flight.labels(group=group).set(0)
            self.group_nodes_queued.labels(group=group).set(0)
        self._groups_seen |= seen
        self.nodes_unavailable.set(unavailable)

    def observe_drain_backoff(self, in_backoff: int, out_of_roll: int) -> None:
        self.nodes_in_drain_backoff.set(in_backoff)
        self.nodes_out_of_roll.set(out_of_roll)

    def observe_health(self, holds: Iterable[str], blockers: int, closed_gates: int) -> None:
        """``holds``: the kind of each of the plan's holds ("paused", "window",
        "blocker", ...); a kind seen before and not held now reads 0."""
        counts: dict[str, int] = {}
        for kind in holds:
            counts[kind] = counts.get(kind, 0) + 1
        for kind in self._hold_kinds - counts.keys():
            self.grants_held.labels(reason=kind).set(0)
        for kind, count in counts.items():
            self.grants_held.labels(reason=kind).set(count)
        self._hold_kinds |= counts.keys()
        self.blockers_firing.set(blockers)
        self.health_gates_closed.set(closed_gates)

    def webhook_delivery(self, result: str) -> None:
        self.webhook_deliveries.labels(result=result).inc()

    def webhook_retry(self) -> None:
        self.webhook_retries.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """/metrics, /healthz and /readyz on ``host:port`` in a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: CoordMetrics,
        *,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, owner.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = owner.healthy()
                    self._answer(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
                elif path == "/readyz":
                    ok = owner.ready()
                    self._answer(200 if ok else 503, b"ok\n" if ok else b"caches not synced\n")
                else:
                    self._answer(404, b"not found\n")

            def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # no access log

        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics server listening", extra={"PORT": self.port})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
