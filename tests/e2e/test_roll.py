"""A rolling reboot of three real systemd hosts by the real cluo-coord.

Three nspawn hosts provisioned by the real Ignition from the generated config run the agent
from the sysext image against the real control plane; the kubelet emulator follows each
host's up and down. cluo-coord runs as its console script with a token of the deploy/
cluo-coord ServiceAccount, --max-concurrent 1. update_engine (a dbusmock unit inside each
host) reports NEED_REBOOT on all three at once, and the roll is watched
(`testbed/roll.py`, which `make demo` shares): each host drains, reboots for real
through logind (nspawn exits 133, the host is booted again), comes back with a new boot id
and is uncordoned, one at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from testbed.controlplane import ControlPlane
from testbed.nspawn import EXIT_REBOOT
from testbed.nspawn import unavailable_reason as nspawn_unavailable
from testbed.roll import AgentImage, Roll, RollResult, RollSettings
from testbed.waiting import wait_for

UNAVAILABLE = nspawn_unavailable()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.kube,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
    pytest.mark.timeout(600),
]

HOSTS = 3
ROLL_TIMEOUT = 180.0


@pytest.fixture
def roll(control_plane: ControlPlane, agent_base_root: Path, agent_image: AgentImage,
         artifact_url_base: str, tmp_path: Path) -> Iterator[Roll]:
    settings = RollSettings(hosts=HOSTS, prefix="roll", roll_timeout=ROLL_TIMEOUT)
    with Roll(control_plane, tmp_path, settings, base_root=agent_base_root,
              image=agent_image, url_base=artifact_url_base) as the_roll:
        the_roll.setup()
        yield the_roll


def phases(entries: list[dict[str, str]], node: str) -> list[str]:
    return [e["PHASE"] for e in entries
            if e.get("MESSAGE") == "phase changed" and e.get("NODE") == node]


def _in_order(seen: list[str], expected: list[str]) -> bool:
    position = 0
    for item in seen:
        if position < len(expected) and item == expected[position]:
            position += 1
    return position == len(expected)


def _idle_again(roll: Roll, name: str, boot_id: str) -> bool:
    """The agent's last phase in boot ``boot_id`` is Idle (its journal may lag its writes)."""
    member = next(m for m in roll.members if m.name == name)
    seen = phases(roll.agent_journal(member, boot_id), name)
    return bool(seen) and seen[-1] == "Idle"


def test_three_hosts_reboot_for_real_one_at_a_time(roll: Roll) -> None:
    result: RollResult = roll.run()
    names = [member.name for member in roll.members]

    # Each host rebooted exactly once, for real: one nspawn exit 133, a new boot id.
    for node in result.nodes:
        assert node.exits == [EXIT_REBOOT], (node.name, node.exits)
        assert len(node.new_boot_ids) == 1 and node.new_boot_ids[0] != node.old_boot_id
        assert (node.granted_at is not None and node.rebooted_at is not None
                and node.back_at is not None and node.released_at is not None), node
        assert node.granted_at < node.rebooted_at < node.back_at < node.released_at, node

    # Never two in flight, over every state the watches saw; each node granted once. (The
    # agents report NEED_REBOOT concurrently, so the queue's order is theirs, not asserted.)
    assert result.max_in_flight == 1
    assert sorted(result.grant_order) == sorted(names), result.grant_order
    assert roll.recorder is not None and not roll.recorder.errors, roll.recorder.errors
    history = roll.recorder.history()
    assert any(len(m.in_flight) == 1 for m in history), "the history saw the roll"
    by_name = {node.name: node for node in result.nodes}
    for earlier, later in itertools.pairwise(result.grant_order):
        released = by_name[earlier].released_at
        granted = by_name[later].granted_at
        assert released is not None and granted is not None and released <= granted, (
            f"{later} granted before {earlier} was done")

    # All schedulable, nothing left to do, the pods drained through the Eviction API.
    snapshot = roll.snapshot()
    assert [v.phase for v in snapshot.nodes] == ["done"] * HOSTS, snapshot
    assert not any(v.cordoned for v in snapshot.nodes)
    assert snapshot.slot_holder is None
    assert snapshot.evicted == HOSTS * roll.settings.pods_per_node
    for member in roll.members:
        assert roll.annotation(member.name, "agent-made-unschedulable") in (None, "false")

    # Each agent's journal shows its cycle: the grant, the drain and the reboot in the
    # first boot; the proof of the reboot and idle again in the second.
    for member in roll.members:
        first, second = (boot.boot_id for boot in member.follower.boots)
        before = phases(roll.agent_journal(member, first), member.name)
        wait_for(partial(_idle_again, roll, member.name, second), 20,
                 f"{member.name}'s agent to log Idle in its second boot")
        # WaitingForGrant may be skipped: the grant can come with the echo of the agent's own
        # reboot-needed write, and RebootNeeded goes straight to Granted then.
        assert _in_order(before, ["Idle", "RebootNeeded", "Granted", "Draining", "Rebooting"]), (
            member.name, before)
        ready = [e for e in roll.agent_journal(member) if e.get("MESSAGE") == "agent ready"]
        assert [e["BOOT_ID"] for e in ready] == [first, second], member.name

    # The coordinator granted each node once, and says so in its log and metrics.
    assert roll.coord is not None
    granted = [e["node"] for e in roll.coord.entries() if e.get("msg") == "reboot granted"]
    assert granted == result.grant_order
    assert roll.coord.metric("cluo_grants_total") == HOSTS
    assert roll.coord.metric("cluo_nodes_in_flight") == 0
    print("\nroll: " + ", ".join(f"{k} {v:.1f}s" for k, v in roll.timings.items())
          + f", roll {result.finished - result.started:.1f}s")
