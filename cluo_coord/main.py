"""Entry point of cluo-coord (composition root)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("cluo-coord: not built yet (see issue 4)", file=sys.stderr)
    return 2
