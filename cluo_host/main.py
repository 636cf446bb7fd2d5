"""Entry point of cluo-agent (composition root)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("cluo-agent: not built yet (see issue 3)", file=sys.stderr)
    return 2
