"""``cluo-coord status`` (the real CLI process) against a real roll in progress: a holder
that does not come back, two nodes queued in order, a node out of the roll, and an admin's
pause with its reason; the text output and ``-o json``, and the ConfigMap ``kubectl get``
shows. The rig of tests/kube/test_coordinator.py."""

from __future__ import annotations

import json
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
        assert f"Computed:  {view['computed_at']} by {identity}" in lines
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
