"""``cluo-coord`` that crashes right after applying its first change of a given type.

    python -m testbed.crashing_coord --crash-after AcquireSlot -- <cluo-coord args>

The tests use it to prove that a restart between two writes (a slot taken, its grant not
yet written) does not double-grant. It replaces the driver's change-applying method at
the class level, then runs ``cluo_coord.main.main`` with the remaining arguments: once
the first change whose type is named has been applied (written to the API server), the
process exits at once with ``CRASH_EXIT_CODE``, no clean-up, as a crash would. A change
that fails is not a crash point (the driver stops the plan there itself).

Test-only: nothing in cluo_coord knows about it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import get_args

from cluo_coord import planner
from cluo_coord.coordinator import Coordinator
from cluo_coord.main import main as coord_main

CRASH_EXIT_CODE = 70
CHANGE_TYPES = tuple(sorted(change.__name__ for change in get_args(planner.Change)))

log = logging.getLogger("testbed.crashing_coord")

ApplyChange = Callable[[Coordinator, planner.Change, dict[int, datetime]], bool]


def crash_after(change_type: str) -> None:
    """Make every Coordinator exit the process after applying a ``change_type`` change."""
    apply: ApplyChange = Coordinator._apply

    def apply_then_crash(
        self: Coordinator, change: planner.Change, released: dict[int, datetime]
    ) -> bool:
        wrote = apply(self, change, released)
        if type(change).__name__ == change_type:
            log.error("test crash hook: exiting", extra={"AFTER": change_type})
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
        return wrote

    Coordinator._apply = apply_then_crash  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.crashing_coord")
    parser.add_argument("--crash-after", required=True, choices=CHANGE_TYPES,
                        help="the change type after whose first application to exit")
    parser.add_argument("coord_args", nargs=argparse.REMAINDER,
                        help="-- then cluo-coord's arguments")
    options = parser.parse_args(argv)
    args = list(options.coord_args)
    if args[:1] == ["--"]:
        args = args[1:]
    crash_after(options.crash_after)
    return coord_main(args)


if __name__ == "__main__":
    sys.exit(main())
