"""``cluo-coord status`` (the real CLI process) against a real roll in progress: a holder
that does not come back, two nodes queued in order, a node out of the roll, and an admin's
pause with its reason; the text output and ``-o json``, and the ConfigMap ``kubectl get``
shows. Then whether the status is current: an idle coordinator writes nothing and its
status stays current past the old two-minute limit, while a stopped one's goes stale as
soon as a node changes. The rig of tests/kube/test_coordinator.py."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kubernetes.client import CoreV1Api

from cluo.protocol import STATUS_CONFIGMAP_NAME
from testbed.waiting import wait_for
from tests.kube import test_coordinator
from tests.kube.test_coordinator import KEYS, NAMESPACE, Rig

pytestmark = pytest.mark.kube

# The rig and its fixtures, shared with the coordinator tests.
coord_kubeconfig = test_coordinator.coord_kubeconfig
rig = test_coordinator.rig

TIMEOUT = 30.0


def status_json(rig: Rig) -> dict[str, Any]:
    result = rig.admin_command("status", "-o", "json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_status_shows_the_holder_the_queue_in_order_the_node_out_of_the_roll_and_the_pause(
    rig: Rig,
) -> None:
    holder, first, second, out = rig.add_nodes(4)  # queued in this order
    rig.annotate(out, {KEYS.drain_failures: "5"})  # --max-drain-attempts 5: out of the roll
    identity = f"status-{rig.test_id}"
    rig.start(name=identity)
    with rig.agents(never_return=frozenset({holder})) as agents:
        rig.wait_until_down(holder, agents)

        def published_roll() -> dict[str, Any] | None:
            view = status_json(rig)
            return view if (view.get("coordinator") == identity and not view["stale"]
                            and view["queue"] == [first, second]) else None

        view = wait_for(published_roll, TIMEOUT, "the coordinator to publish the queue")
        assert view["state"] == "running"
        assert [slot["holder"] for slot in view["slots"]] == [holder]
        assert view["slots"][0]["slot"] == "cluo-reboot-slot-0"
        assert view["queue_length"] == 2
        assert view["out_of_roll"] == [out]
        assert view["paused"] is None and view["holds"] == []

        result = rig.admin_command("pause")
        assert result.returncode == 0, result.stderr
        view = wait_for(lambda: (v := status_json(rig))["holds"] and v, TIMEOUT,
                        "the published status to show the hold of the pause")
        assert view["state"] == "paused"
        assert view["paused"]["by"] == "admin"
        assert view["paused"]["reason"] == "cluo-coord pause"
        assert view["paused"]["since"]
        assert view["holds"] == ["paused: the roll is paused, no new reboot slots are granted"]
        assert view["queue"] == [first, second]  # still queued, in order

        text = rig.admin_command("status")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].startswith("Roll:      paused by admin since ")
        assert lines[0].endswith(": cluo-coord pause")
        assert any(line.startswith(f"Computed:  {view['computed_at']} by {identity} (")
                   for line in lines)  # and whether anything changed since
        header = next(line for line in lines if line.startswith("SLOT"))
        row = lines[lines.index(header) + 1]
        assert row.startswith("cluo-reboot-slot-0") and row.index(holder) == header.index(
            "HOLDER")
        assert lines.index(f"    1  {first}") + 1 == lines.index(f"    2  {second}")
        assert f"Out of the roll:   {out}" in lines

        configmap = CoreV1Api(rig.admin).read_namespaced_config_map(
            STATUS_CONFIGMAP_NAME, NAMESPACE)
        assert configmap.data["state"] == "paused"
        assert configmap.data["coordinator"] == identity
        assert json.loads(configmap.data["status.json"])["queue"] == [first, second]
    rig.admin_command("resume")


def status_configmap_version(rig: Rig) -> str:
    configmap = CoreV1Api(rig.admin).read_namespaced_config_map(STATUS_CONFIGMAP_NAME,
                                                                NAMESPACE)
    return str(configmap.metadata.resource_version)


def published_by(rig: Rig, identity: str) -> dict[str, Any]:
    return wait_for(lambda: (v := status_json(rig))["coordinator"] == identity
                    and not v["stale"] and v, TIMEOUT, f"{identity} to publish its status")


OLD_STALE_AFTER = 120.0  # s: the age at which a status used to be shown stale


def test_an_idle_coordinator_writes_no_status_and_it_stays_current_past_two_minutes(
    rig: Rig,
) -> None:
    nodes = rig.add_nodes(2, needing_reboot=False)
    identity = f"idle-{rig.test_id}"
    rig.start(name=identity)
    view = published_by(rig, identity)
    assert view["state"] == "idle"
    version = status_configmap_version(rig)
    started = time.monotonic()

    def written_or_past_the_old_limit() -> str:
        if status_configmap_version(rig) != version:
            return "written"
        return "past" if time.monotonic() - started > OLD_STALE_AFTER + 5 else ""

    # Meanwhile the emulated kubelets report their nodes' status every 5 s.
    assert wait_for(written_or_past_the_old_limit, OLD_STALE_AFTER + 30,
                    "more than two minutes with the status ConfigMap unchanged",
                    interval=2.0) == "past"
    view = status_json(rig)
    assert (view["stale"], view["note"], view["changed_since"]) == (False, "", [])
    assert view["state"] == "idle"
    text = rig.admin_command("status")
    assert text.returncode == 0, text.stderr
    assert f"Computed:  {view['computed_at']} by {identity} (nothing changed since)" in (
        text.stdout.splitlines())

    rig.annotate(nodes[0], {KEYS.reboot_needed: "true"})  # the coordinator is alive
    view = wait_for(lambda: (v := status_json(rig))["inputs"]["nodes_counted"] == 1 and v,
                    TIMEOUT, "the coordinator to publish the node that needs a reboot")
    assert view["stale"] is False, (view, rig.coordinators[0].log_tail())
    assert status_configmap_version(rig) != version


def test_a_stopped_coordinators_status_is_stale_once_a_node_needs_a_reboot(rig: Rig) -> None:
    nodes = rig.add_nodes(2, needing_reboot=False)
    identity = f"stopped-{rig.test_id}"
    coord = rig.start(name=identity)
    published_by(rig, identity)
    coord.stop()
    assert status_json(rig)["stale"] is False  # nothing changed: as current as it was

    rig.annotate(nodes[1], {KEYS.reboot_needed: "true"})
    view = status_json(rig)  # it waits 15 s for a publication that does not come
    assert view["stale"] is True and view["state"] == "unknown"
    assert view["changed_since"] == ["the nodes in the roll (0 then, 1 now)"]
    assert "the coordinator did not publish within 15s: it may be down" in view["note"]
    text = rig.admin_command("status")
    assert text.stdout.splitlines()[0].startswith("WARNING: the published status is ")
