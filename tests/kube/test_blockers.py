"""Blockers hold every new reboot slot while they fire: the real cluo-coord (the Rig of
tests/kube/test_coordinator.py: its console script, deploy/'s RBAC, emulated nodes and
stand-in agents) against the real control plane and, for the Prometheus blockers, a real
Prometheus (Debian's binary, testbed/prometheus.py) scraping a /metrics endpoint the test
sets.

Each test starts the coordinator while its blocker fires, checks that nothing is granted
and that the hold shows (the log line, the GrantsHeld Event about slot Lease 0, the
``cluo_grants_held{reason="blocker"}`` and ``cluo_blockers_firing`` gauges), then stops
the blocker and sees the node granted, rebooted and released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client import CoreV1Api, V1Container, V1ObjectMeta, V1Pod, V1PodSpec

from cluo.protocol import slot_lease_name
from testbed.controlplane import free_port
from testbed.coordinator import CoordProcess
from testbed.prometheus import MetricsTarget, PrometheusServer
from testbed.waiting import assert_stays, wait_for
from tests.kube.test_coordinator import NAMESPACE, Rig, coord_kubeconfig, rig

__all__ = ["coord_kubeconfig", "rig"]  # the fixtures this module uses

pytestmark = pytest.mark.kube

TIMEOUT = 60.0
HELD_FOR = 3.0  # s: how long nothing may be granted while a blocker fires
BLOCKING_METRIC = "testbed_backup_running"
IGNORED_ALERT = "TestbedWatchdog"  # always firing, as kube-prometheus's Watchdog is
BLOCKING_ALERT = "TestbedBackupRunning"


@pytest.fixture
def metrics_target() -> Iterator[MetricsTarget]:
    with MetricsTarget() as target:
        target.set(BLOCKING_METRIC, 1)
        yield target


@pytest.fixture
def prometheus(metrics_target: MetricsTarget, tmp_path: Path) -> Iterator[PrometheusServer]:
    with PrometheusServer.start(tmp_path / "prometheus", metrics_target.address, alert_rules={
            BLOCKING_ALERT: f"{BLOCKING_METRIC} > 0", IGNORED_ALERT: "vector(1)"}) as server:
        yield server


def holds(coord: CoordProcess) -> list[str]:
    """The holds the coordinator logged as started, in order."""
    return [entry["hold"] for entry in coord.entries()
            if entry.get("msg") == "new reboot slots held"]


def held_events(rig: Rig) -> list[str]:
    events = rig.core.list_namespaced_event(
        NAMESPACE, field_selector=f"involvedObject.name={slot_lease_name(0)}").items
    return [e.message for e in events if e.reason == "GrantsHeld"
            and e.source.component == "cluo-coord"]


def assert_held_then_released(rig: Rig, coord: CoordProcess, node: str, hold: str,
                              stop_blocker: Callable[[], object]) -> None:
    """``hold`` is logged, posted and counted, nothing is granted; then once
    ``stop_blocker()`` ran the node goes through its cycle and the hold ends."""
    wait_for(lambda: hold in holds(coord), TIMEOUT, f"the hold {hold!r} to be logged")
    assert_stays(lambda: not rig.slot_holders(), HELD_FOR, "no slot taken while it fires")
    assert any(hold in message for message in held_events(rig)), held_events(rig)
    assert coord.metric('cluo_grants_held{reason="blocker"}') == 1.0
    assert (coord.metric("cluo_blockers_firing") or 0) >= 1.0
    stop_blocker()
    wait_for(lambda: rig.done(node), TIMEOUT, f"{node} to be granted, rebooted and released")
    wait_for(lambda: any(entry.get("msg") == "reboot slots no longer held"
                         and entry.get("hold") == hold for entry in coord.entries()),
             TIMEOUT, "the end of the hold to be logged")
    assert coord.metric('cluo_grants_held{reason="blocker"}') == 0.0


def test_pods_matching_the_blocking_pod_selector_hold_new_slots_until_they_are_gone(
    rig: Rig, kube_admin: kubernetes.client.ApiClient, namespace: str,
) -> None:
    core = CoreV1Api(kube_admin)
    label = f"backup-{rig.test_id}"
    # Unscheduled (there is no scheduler): it exists, not finished, which is what counts.
    core.create_namespaced_pod(namespace, V1Pod(
        metadata=V1ObjectMeta(name="backup", labels={"job": label}),
        spec=V1PodSpec(containers=[V1Container(name="c", image="busybox")])))
    (node,) = rig.add_nodes(1)
    coord = rig.start("--blocking-pod-selector", f"job={label}",
                      "--blocking-pod-selector", f"job=other-{rig.test_id}",
                      "--blocker-interval", "1s")
    with rig.agents():
        assert_held_then_released(
            rig, coord, node, f"blocker: pods matching job={label} exist",
            lambda: core.delete_namespaced_pod("backup", namespace, grace_period_seconds=0))


def test_a_prometheus_query_with_a_result_holds_new_slots_until_it_has_none(
    rig: Rig, prometheus: PrometheusServer, metrics_target: MetricsTarget,
) -> None:
    wait_for(lambda: prometheus.query(f"{BLOCKING_METRIC} > 0"), TIMEOUT,
             "prometheus to have scraped the blocking value")
    (node,) = rig.add_nodes(1)
    query = f"{BLOCKING_METRIC} > 0"
    coord = rig.start("--prometheus-url", prometheus.url, "--prometheus-query", query,
                      "--alert-filter-regexp", ".*", "--blocker-interval", "1s")
    with rig.agents():
        assert_held_then_released(
            rig, coord, node, f"blocker: prometheus query {query!r} has a result",
            lambda: metrics_target.set(BLOCKING_METRIC, 0))


def test_a_firing_alert_holds_new_slots_unless_the_filter_ignores_it(
    rig: Rig, prometheus: PrometheusServer, metrics_target: MetricsTarget,
) -> None:
    wait_for(lambda: prometheus.firing() == {BLOCKING_ALERT, IGNORED_ALERT}, TIMEOUT,
             "both test alerts to fire in prometheus")
    (node,) = rig.add_nodes(1)
    coord = rig.start("--prometheus-url", prometheus.url,
                      "--alert-filter-regexp", f"^{IGNORED_ALERT}$", "--blocker-interval", "1s")
    with rig.agents():
        # The ignored alert still fires afterwards: only the other one held the roll.
        assert_held_then_released(
            rig, coord, node, f"blocker: alerts firing: {BLOCKING_ALERT}",
            lambda: metrics_target.set(BLOCKING_METRIC, 0))
    assert IGNORED_ALERT in prometheus.firing()


def test_a_prometheus_that_does_not_answer_holds_new_slots_saying_so(rig: Rig) -> None:
    rig.add_nodes(1)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    coord = rig.start("--prometheus-url", url, "--blocker-interval", "1s")
    with rig.agents():
        wait_for(lambda: any("cannot be evaluated" in hold for hold in holds(coord)),
                 TIMEOUT, "the fail-safe hold to be logged")
        assert_stays(lambda: not rig.slot_holders(), HELD_FOR, "no slot taken meanwhile")
    assert coord.metric("cluo_blockers_firing") == 1.0
