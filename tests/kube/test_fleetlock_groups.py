"""FleetLock and cluo-coord's groups: with ``--group`` configured, a client whose group is
none of them (nor ``default``) is refused with ``unknown_group``; a client of a known
group is served (the real cluo-coord, Zincati's own client: tests/kube/test_fleetlock.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kube.test_coordinator import SELECTOR_LABEL, Rig, rig
from tests.kube.test_fleetlock import client_binary, coord_kubeconfig, fleetlock_node, start

__all__ = ["client_binary", "coord_kubeconfig", "rig"]  # fixtures

pytestmark = pytest.mark.kube


def test_a_client_of_no_configured_group_is_refused_and_one_of_a_group_is_served(
    rig: Rig, client_binary: Path,
) -> None:
    fleetlock_node(rig, f"fg{rig.test_id}", "a" * 32)
    _, client = start(rig, client_binary, "--group", f"blue:{SELECTOR_LABEL}={rig.test_id}")
    wrong = client.ask("a" * 32, "red", "pre-reboot")
    assert (wrong.ok, wrong.status, wrong.kind) == (False, 400, "unknown_group")
    assert "blue" in wrong.value and "default" in wrong.value
    served = client.ask("a" * 32, "blue", "pre-reboot")
    assert (served.ok, served.status, served.kind) == (False, 409, "waiting_for_slot")
