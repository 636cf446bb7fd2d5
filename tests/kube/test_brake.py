"""The brake on bad releases on the real coordinator: after --max-failed-reboots failed
reboot proofs the roll pauses itself, visibly, until ``cluo-coord resume``.

The rig of tests/kube/test_coordinator.py: cluo-coord as its console script with the
ServiceAccount of deploy/, emulated nodes, stand-in agents. One node never comes back from
its reboot; another comes back on the OS version it ran before, older than the
``new-version`` it announced (its stand-in leaves the os-release ``version`` label alone,
as a host that booted its old partition again would report it).
"""

from __future__ import annotations

import json

import pytest
from kubernetes.client import CoordinationV1Api

from cluo.protocol import (
    FAILED_REBOOTS_ANNOTATION,
    LEADER_LEASE_NAME,
    PAUSED_ANNOTATION,
    PAUSED_BY_ANNOTATION,
    PAUSED_REASON_ANNOTATION,
)
from testbed.recorder import InFlightRecorder
from testbed.waiting import assert_stays, wait_for
from tests.kube import test_coordinator
from tests.kube.test_coordinator import KEYS, NAMESPACE, Rig

pytestmark = pytest.mark.kube

# The rig and its fixtures, shared with the coordinator tests.
coord_kubeconfig = test_coordinator.coord_kubeconfig
recorder = test_coordinator.recorder
rig = test_coordinator.rig

OLD = "4081.2.0"
NEW = "4152.0.0"


def leader_annotations(rig: Rig) -> dict[str, str]:
    lease = CoordinationV1Api(rig.admin).read_namespaced_lease(LEADER_LEASE_NAME, NAMESPACE)
    return dict(lease.metadata.annotations or {})


def test_the_roll_pauses_itself_after_two_failed_reboot_proofs_until_resumed(
    rig: Rig, recorder: InFlightRecorder
) -> None:
    lost, rolled_back, nxt = rig.add_nodes(3, needing_reboot=False)
    rig.core.patch_node(rolled_back, {"metadata": {"labels": {KEYS.version: OLD}}})
    rig.annotate(rolled_back, {KEYS.new_version: NEW})
    for i, name in enumerate((lost, rolled_back)):
        rig.annotate(name, {KEYS.reboot_needed: "true",
                            KEYS.last_checked_time: str(1_700_000_000 + i)})
    coord = rig.start("--max-concurrent", "2", "--reboot-timeout", "6s",
                      "--max-failed-reboots", "2", leader_elect=True)
    with rig.agents(never_return=frozenset({lost})) as agents:
        # The node back on its old version: recorded, and its cycle finishes.
        wait_for(lambda: rig.events(rolled_back, "RebootRolledBack"), 30,
                 "a RebootRolledBack Warning event for the node back on its old version")
        assert rig.events(rolled_back, "RebootRolledBack")[0].type == "Warning"
        wait_for(lambda: rig.done(rolled_back), 30, "the rolled-back node's cycle to finish")
        assert not leader_annotations(rig).get(PAUSED_ANNOTATION)  # one failure, limit two

        # The node that never comes back is the second failure: the roll pauses itself.
        wait_for(lambda: rig.events(lost, "RollPaused"), 30,
                 "a RollPaused Warning event once the lost node timed out")
        assert rig.events(lost, "RollPaused")[0].type == "Warning"
        annotations = leader_annotations(rig)
        assert annotations[PAUSED_ANNOTATION] == "true"
        assert annotations[PAUSED_BY_ANNOTATION] == "brake"
        assert "2 node(s) failed the reboot proof" in annotations[PAUSED_REASON_ANNOTATION]
        failed = {f["node"]: f["why"] for f in json.loads(annotations[FAILED_REBOOTS_ANNOTATION])}
        assert failed[rolled_back] == f"came back on {OLD}, older than the announced {NEW}"
        assert failed[lost].startswith("did not come back within --reboot-timeout")
        wait_for(lambda: coord.metric('cluo_roll_paused{by="brake"}') == 1, 10,
                 "cluo_roll_paused{by=brake} to be 1")
        assert coord.metric('cluo_roll_paused{by="admin"}') == 0
        assert coord.metric("cluo_failed_reboots") == 2
        assert any(e.get("msg") == "roll paused" and e.get("by") == "brake"
                   for e in coord.entries())

        # Paused: a node that needs a reboot now gets no slot, though one is free.
        rig.annotate(nxt, {KEYS.reboot_needed: "true"})
        assert_stays(lambda: nxt not in rig.slot_holders().values(), 3.0,
                     "no slot for the next node while the roll is paused")

        result = rig.admin_command("resume")
        assert result.returncode == 0, result.stderr
        assert "record of 2 failed reboot(s) is cleared" in result.stdout
        wait_for(lambda: rig.done(nxt), 30, "the next node to reboot once resumed")
        annotations = leader_annotations(rig)
        assert PAUSED_ANNOTATION not in annotations
        assert FAILED_REBOOTS_ANNOTATION not in annotations
        # The lost node still holds its slot, marked stuck once: it is not counted again.
        assert list(rig.slot_holders().values()) == [lost]
        wait_for(lambda: coord.metric('cluo_roll_paused{by="brake"}') == 0, 10,
                 "cluo_roll_paused{by=brake} back to 0")
        assert coord.metric("cluo_failed_reboots") == 0
    assert not agents.errors
    assert recorder.max_in_flight() <= 2
