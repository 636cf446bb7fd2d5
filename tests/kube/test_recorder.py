"""The test bed's in-flight recorder (testbed/recorder.py) across an API server restart.

A restart ends every watch and starts the API server's watch cache anew, so the recorder
cannot resume from a resourceVersion older than the cache (410 Gone): it lists that kind
again, the list replaces its view, and the stretch in between is reported as a gap, which the
summaries refuse unless the caller accepts it. The Nodes and the slot Lease are plain
objects written by the test (no kubelet, no coordinator): only the recorder is under test.

It restarts the session's kube-apiserver.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import kubernetes.client
import pytest
from kubernetes.client import CoordinationV1Api, CoreV1Api

from cluo.protocol import SLOT_LEASE_LABEL, Keys, slot_lease_name
from testbed.controlplane import ControlPlane
from testbed.recorder import InFlightRecorder, RecorderBlind
from testbed.waiting import wait_for

pytestmark = pytest.mark.kube

KEYS = Keys()
SELECTOR_LABEL = "cluo-recorder-test"


@pytest.fixture
def nodes(kube_admin: kubernetes.client.ApiClient) -> Iterator[tuple[str, list[str]]]:
    """Two Nodes labelled for this test (its selector, their names), deleted afterwards."""
    test_id = uuid.uuid4().hex[:8]
    core = CoreV1Api(kube_admin)
    names = [f"r{test_id}-{i}" for i in range(2)]
    for name in names:
        core.create_node({"metadata": {"name": name, "labels": {SELECTOR_LABEL: test_id}}})
    yield f"{SELECTOR_LABEL}={test_id}", names
    for name in names:
        core.delete_node(name)


def test_recorder_relists_after_an_api_server_restart_and_reports_the_gap(
    control_plane: ControlPlane, kube_admin: kubernetes.client.ApiClient,
    nodes: tuple[str, list[str]], namespace: str,
) -> None:
    selector, (first, second) = nodes
    core = CoreV1Api(kube_admin)
    leases = CoordinationV1Api(kube_admin)
    slot = slot_lease_name(0)
    leases.create_namespaced_lease(namespace, {
        "metadata": {"name": slot, "labels": {SLOT_LEASE_LABEL: "true"}}, "spec": {}})

    def hand_slot(released: str | None, holder: str) -> None:
        """As the coordinator does: reboot-ok=false, the slot to the next, reboot-ok=true."""
        if released:
            core.patch_node(released, {"metadata": {"annotations": {KEYS.reboot_ok: "false"}}})
        leases.patch_namespaced_lease(slot, namespace, {"spec": {"holderIdentity": holder}})
        core.patch_node(holder, {"metadata": {"annotations": {KEYS.reboot_ok: "true"}}})

    recorder = InFlightRecorder(kube_admin, selector, namespace, KEYS).start()
    try:
        hand_slot(None, first)
        wait_for(lambda: recorder.history()[-1].in_flight == {first}, 10,
                 "the recorder to see the first node in flight")
        assert not recorder.lost_sight

        control_plane.stop_apiserver()
        try:
            wait_for(lambda: {e.split()[1] for e in recorder.errors} == {"nodes:", "leases:"},
                     15, "both of the recorder's watches to fail")
        finally:
            restarting = time.monotonic()
            control_plane.start_apiserver()
        # Right after the restart, while the recorder may still be waiting to retry.
        hand_slot(first, second)

        # Granted too, not only in flight: the slot Lease alone makes it in flight, and its
        # event may come before the Node's reboot-ok=true.
        wait_for(lambda: (recorder.history()[-1].in_flight == {second}
                          and recorder.history()[-1].granted == {second}
                          and not recorder.history()[-1].blind), 30,
                 "the recorder to see the second node in flight and granted, and only it, "
                 "after the restart")
    finally:
        recorder.stop()

    gaps = recorder.gaps
    # The Lease's last change is older than where the new watch cache begins: its watch
    # cannot resume. The Nodes' watch resumes if the last write before the restart was
    # theirs (nothing was missed then, and no gap is reported).
    assert "lease" in {gap.kind for gap in gaps}, gaps
    for gap in gaps:
        assert gap.relisted is not None and gap.until is not None, gap
        assert gap.since < restarting < gap.until, gap  # it spans the outage
        assert "watching" in gap.error
    assert recorder.lost_sight and recorder.blind_seconds() > 0
    assert recorder.relists == len(gaps)
    with pytest.raises(RecorderBlind, match="lost sight"):
        recorder.max_in_flight()
    with pytest.raises(RecorderBlind):
        recorder.grant_order()
    # Outside the gaps: one node at a time, in the order they were granted.
    assert recorder.max_in_flight(allow_gaps=True) == 1
    assert recorder.grant_order(allow_gaps=True) == [first, second]
    assert all(moment.blind <= {"node", "lease"} for moment in recorder.history())
