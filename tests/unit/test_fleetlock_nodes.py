"""A FleetLock node's virtual agent (cluo_coord/fleetlock_nodes.py) on fake time, with the
agent's in-memory node and pods (tests/unit/agent_rig.py): the answers a polling client
gets in order, the yes only after the pods are gone, a waiting client withdrawing with
steady-state, and a holder told its slot is still held."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from cluo.cycle.agent_core import AgentConfig
from cluo.cycle.drainer import DrainTuning
from cluo_coord.fleetlock import Answer, Kind
from cluo_coord.fleetlock_nodes import VirtualAgent, VirtualAgentConfig
from cluo_coord.planner import SlotLease
from cluo_host.config import load_settings
from tests.unit.agent_rig import HOST, NODE, FakeNode, FakePods, Journal, workload
from tests.unit.virtual_time import elapsed, run

CLIENT = "975228d46dc94622b9bbe16671e2b58d"
POLL = 10.0  # fake seconds between two requests of the client


class Slots:
    def __init__(self, *holders: str) -> None:
        self.holders = holders

    def list(self) -> tuple[list[SlotLease], str]:
        return [SlotLease(i, holder) for i, holder in enumerate(self.holders)], "1"


@dataclass
class Rig:
    node: FakeNode
    pods: FakePods
    journal: Journal
    answers: list[tuple[float, Answer]] = field(default_factory=list)


def with_agent(script: Callable[[Rig, VirtualAgent], Coroutine[Any, Any, None]]) -> Rig:
    settings = load_settings(["--node-name", NODE], {})
    journal = Journal()
    rig = Rig(FakeNode(settings, journal, annotations={}, cordoned=False), FakePods(journal),
              journal)

    async def main() -> None:
        workload(rig.pods)
        agent = VirtualAgent(NODE, CLIENT, nodes=rig.node, pods=rig.pods, is_leader=lambda: True,
                             config=VirtualAgentConfig(AgentConfig(), DrainTuning(),
                                                       settings.keys))
        running = asyncio.create_task(agent.run())
        await script(rig, agent)
        agent.stop()
        await running

    run(main())
    return rig


def grant_when_asked(rig: Rig) -> None:
    """The planner: reboot-ok=true once the node says reboot-needed=true."""
    keys = rig.node.keys
    if rig.node.annotations.get(keys.reboot_needed) == "true" \
            and keys.reboot_ok not in rig.node.annotations:
        rig.node.patch_metadata(NODE, {keys.reboot_ok: "true"})


def test_pre_reboot_says_wait_then_draining_then_yes_once_the_pods_are_gone() -> None:
    async def client(rig: Rig, agent: VirtualAgent) -> None:
        while not rig.answers or rig.answers[-1][1].status != 200:
            rig.answers.append((elapsed(), await agent.pre_reboot()))
            grant_when_asked(rig)
            await asyncio.sleep(POLL)

    rig = with_agent(client)
    kinds = [answer.kind for _, answer in rig.answers]
    assert kinds[0] is Kind.WAITING_FOR_SLOT
    assert Kind.DRAINING in kinds and kinds[-1] is Kind.OK
    assert kinds.index(Kind.DRAINING) < len(kinds) - 1
    yes_at = rig.answers[-1][0]
    evicted = rig.journal.of("evict")
    assert {c.detail for c in evicted} == {"web-1", "web-2"}
    gone_at = [rig.pods.pods[name].gone_at for name in ("web-1", "web-2", "leaving")]
    assert all(at is not None and at <= yes_at for at in gone_at), \
        "yes before the pods were gone"
    assert rig.journal.times("cordon")[0] < yes_at
    keys = rig.node.keys
    assert rig.node.annotations[keys.boot_id_before_reboot] == HOST.boot_id
    assert rig.node.annotations[keys.reboot_reason] == f"FleetLock pre-reboot from {CLIENT}"
    assert "Rebooting" in [reason for reason, _ in rig.node.events]


def test_a_waiting_client_withdraws_its_reboot_with_steady_state() -> None:
    async def client(rig: Rig, agent: VirtualAgent) -> None:
        rig.answers.append((elapsed(), await agent.pre_reboot()))
        await asyncio.sleep(POLL)  # the reboot is announced; no slot is free
        rig.answers.append((elapsed(), await agent.steady_state(Slots("other-node"))))
        await asyncio.sleep(POLL)

    rig = with_agent(client)
    assert [a.kind for _, a in rig.answers] == [Kind.WAITING_FOR_SLOT, Kind.OK]
    keys = rig.node.keys
    assert rig.node.annotations[keys.reboot_needed] == "false"
    assert keys.reboot_reason not in rig.node.annotations
    assert rig.journal.of("cordon", "evict") == []


def test_a_holder_is_told_its_slot_is_still_held() -> None:
    async def client(rig: Rig, agent: VirtualAgent) -> None:
        await agent.pre_reboot()
        await asyncio.sleep(POLL)
        grant_when_asked(rig)
        await agent.pre_reboot()
        await asyncio.sleep(POLL)
        rig.answers.append((elapsed(), await agent.steady_state(Slots(NODE))))

    rig = with_agent(client)
    (_, answer), = rig.answers
    assert (answer.status, answer.kind) == (409, Kind.SLOT_HELD)
    assert rig.node.annotations[rig.node.keys.reboot_needed] == "true"
