"""`make demo`: a rolling reboot of three real systemd hosts by cluo, watched live.

    python -m testbed.demo [--hosts 3] [--timeout 300]

Starts its own control plane (etcd, kube-apiserver, controller manager), provisions three
nspawn hosts with the real Ignition from the generated config (the agent from its sysext
image, a stand-in update_engine on each host's system bus), starts cluo-coord with the
deploy/ RBAC, makes update_engine report NEED_REBOOT on every host and shows the roll
(`testbed/roll.py`): which node holds the reboot slot, each node's phase and agent
status, pods evicted, elapsed time. It ends with a summary table, and exits 0 only if every
host rebooted exactly once, for real, one at a time, and is schedulable again.

Exit codes: 0 the roll succeeded; 1 the roll failed (the message says how); 2 the test bed
could not be set up; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from testbed.nspawn import unavailable_reason
from testbed.roll import (
    NodeResult,
    Roll,
    RollFailed,
    RollResult,
    RollSettings,
    Snapshot,
    own_control_plane,
)

CLEAR_LINE = "\x1b[2K"
UP = "\x1b[{}A"


class Display:
    """The live progress: a table redrawn in place on a terminal, else a line per change."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = 0
        self._last: tuple[object, ...] | None = None
        self._started = time.monotonic()

    def note(self, text: str) -> None:
        self._clear()
        self.out.write(f"[{time.monotonic() - self._started:6.1f}s] {text}\n")
        self.out.flush()

    def update(self, snap: Snapshot) -> None:
        if self.tty:
            self._redraw(self._table(snap))
            return
        state = (snap.slot_holder, snap.evicted, tuple(v.phase for v in snap.nodes))
        if state == self._last:
            return
        self._last = state
        phases = ", ".join(f"{v.name}={v.phase}" for v in snap.nodes)
        self.out.write(f"[roll {snap.elapsed:5.1f}s] slot: {snap.slot_holder or '-':<10} "
                       f"evicted: {snap.evicted}  {phases}\n")
        self.out.flush()

    def finish(self) -> None:
        self._drawn = 0  # leave the last table on screen

    def _table(self, snap: Snapshot) -> list[str]:
        width = max(len(v.name) for v in snap.nodes)
        lines = [f"rolling reboot  {snap.elapsed:6.1f}s   slot holder: "
                 f"{snap.slot_holder or '(free)'}   pods evicted: {snap.evicted}",
                 f"  {'node':<{width}}  {'phase':<16} {'boots':>5} {'pods':>4}  agent status"]
        for v in snap.nodes:
            marker = "▶" if v.name == snap.slot_holder else " "
            lines.append(f"{marker} {v.name:<{width}}  {v.phase:<16} {v.boots:>5} "
                         f"{v.pods_left:>4}  {v.agent_status[:60]}")
        return lines

    def _redraw(self, lines: list[str]) -> None:
        if self._drawn:
            self.out.write(UP.format(self._drawn))
        for line in lines:
            self.out.write(f"\r{CLEAR_LINE}{line}\n")
        self._drawn = len(lines)
        self.out.flush()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.out.write(UP.format(self._drawn))
            for _ in range(self._drawn):
                self.out.write(f"\r{CLEAR_LINE}\n")
            self.out.write(UP.format(self._drawn))
            self._drawn = 0


def _seconds(start: float | None, end: float | None) -> str:
    return f"{end - start:5.1f}s" if start is not None and end is not None else "    -"


def summary(result: RollResult) -> str:
    """The final table: boot ids, drain and reboot times, handoffs."""
    nodes: list[NodeResult] = result.nodes
    width = max(len(n.name) for n in nodes)
    header = (f"{'node':<{width}}  {'boot id before → after':<21}  {'drain':>6}  "
              f"{'reboot':>6}  {'verify':>6}  {'slot held':>9}  {'handoff':>7}")
    lines = [header, "-" * len(header)]
    by_grant = sorted(nodes, key=lambda n: n.granted_at or float("inf"))
    for index, node in enumerate(by_grant):
        new = node.new_boot_ids[0][:8] if node.new_boot_ids else "-"
        following = by_grant[index + 1] if index + 1 < len(by_grant) else None
        handoff = _seconds(node.released_at, following.granted_at) if following else "  (last)"
        lines.append(
            f"{node.name:<{width}}  {node.old_boot_id[:8]} → {new:<8}    "
            f"{_seconds(node.granted_at, node.rebooted_at):>6}  "
            f"{_seconds(node.rebooted_at, node.back_at):>6}  "
            f"{_seconds(node.back_at, node.released_at):>6}  "
            f"{_seconds(node.granted_at, node.released_at):>9}  {handoff:>7}")
    lines.append("")
    lines.append("drain: grant → nspawn exit 133 (cordon, evictions, logind Reboot); "
                 "reboot: → the Node back with its new boot id; verify: → the coordinator "
                 "released the slot; handoff: slot released → next node granted")
    lines.append(f"roll: {len(nodes)} hosts in {result.finished - result.started:.1f}s, "
                 f"grant order {' → '.join(result.grant_order)}, at most "
                 f"{result.max_in_flight} node in flight at any moment")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.demo",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--hosts", type=int, default=3, help="hosts to roll (default 3)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds the roll may take once NEED_REBOOT is announced")
    args = parser.parse_args(argv)
    out = sys.stdout
    reason = unavailable_reason()
    if reason is not None:
        print(f"demo: cannot boot nspawn hosts here: {reason}", file=sys.stderr)
        return 2
    display = Display(out)
    settings = RollSettings(hosts=args.hosts, prefix="cluo-demo", unique_names=False,
                            roll_timeout=args.timeout)
    phase = "setting up the test bed"
    try:
        with tempfile.TemporaryDirectory(prefix="cluo-demo-") as workdir:
            display.note("starting the control plane (etcd, kube-apiserver, "
                         "kube-controller-manager)")
            with own_control_plane() as plane, Roll(plane, Path(workdir), settings,
                                                     log=display.note) as roll:
                display.note(f"control plane up at {plane.url}")
                roll.setup()
                display.note(f"{args.hosts} hosts up, agents ready, cluo-coord ready; "
                             "update_engine now reports UPDATE_STATUS_UPDATED_NEED_REBOOT "
                             "on every host")
                phase = "rolling"
                result = roll.run(display.update)
                display.finish()
                display.note("roll finished; tearing down")
                phase = "tearing down"
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    except RollFailed as err:
        display.finish()
        print(f"\ndemo: FAILED: the roll did not succeed: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        display.finish()
        print(f"\ndemo: FAILED while {phase}: {err}", file=sys.stderr)
        return 1 if phase == "rolling" else 2
    print()
    print(summary(result))
    print("\ndemo: OK: every host rebooted exactly once, for real, one at a time, and is "
          "schedulable again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
