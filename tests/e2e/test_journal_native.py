"""cluo_host/journal.py against a real journald: what it sends is what journalctl shows.

The unit tests parse the native protocol as its specification writes it; this one asks the
real thing, on a systemd host, for the three ways an entry is sent: plain ``KEY=value``
fields, a value with newlines (a traceback, length-prefixed), and an entry too big for a
datagram (a sealed memfd).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.nspawn import NspawnHost, unavailable_reason
from testbed.waiting import wait_for

UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]

JOURNAL_MODULE = Path(__file__).resolve().parents[2] / "cluo_host" / "journal.py"
BIG = 1_100_000  # bytes: past the default 208 KiB datagram limit, so sent in a memfd

# Run inside the host by its own python3, with journal.py copied next to it.
LOGGING = """
import logging, sys
sys.path.insert(0, "/opt/cluo-journal-test")
from journal import journal_handler

log = logging.getLogger("cluo.e2e")
log.addHandler(journal_handler(sys.argv[1]))
log.setLevel(logging.INFO)
log.info("plain entry", extra={"NODE": "n1", "SLOT": 0})
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("entry with a traceback", extra={"NODE": "n1"})
log.warning("big entry", extra={"NODE": "n1", "DETAIL": "x" * (int(sys.argv[2]) - 4) + "\\nend"})
"""


@pytest.fixture
def host(agent_base_root: Path, tmp_path: Path) -> Iterator[NspawnHost]:
    made = NspawnHost("journal-host", agent_base_root, tmp_path / "host")
    try:
        made.boot()
        assert made.wait_until_running() in ("running", "degraded")
        yield made
    finally:
        made.destroy()


def test_journald_reads_every_field_of_the_three_kinds_of_entry(host: NspawnHost) -> None:
    target = host.root / "opt" / "cluo-journal-test"
    target.mkdir(parents=True)
    shutil.copy(JOURNAL_MODULE, target / "journal.py")
    identifier = f"cluo-test-{uuid.uuid4().hex[:8]}"

    host.run("python3", "-c", LOGGING, identifier, str(BIG))

    def entries() -> list[dict[str, Any]] | None:
        out = host.run("journalctl", "--output=json", "--all", "--no-pager",
                       f"SYSLOG_IDENTIFIER={identifier}").stdout
        found = [json.loads(line) for line in out.splitlines() if line.strip()]
        return found if len(found) == 3 else None

    plain, failed, big = wait_for(entries, 30, "journald to have the three entries")
    assert plain["MESSAGE"] == "plain entry"
    assert (plain["NODE"], plain["SLOT"], plain["PRIORITY"]) == ("n1", "0", "6")
    assert plain["LOGGER"] == "cluo.e2e"
    assert plain["CODE_FUNC"] == "<module>"
    assert failed["PRIORITY"] == "3"
    assert failed["MESSAGE"].startswith("entry with a traceback\nTraceback")
    assert failed["EXCEPTION_TEXT"].endswith("RuntimeError: boom")
    assert big["MESSAGE"] == "big entry"
    assert big["NODE"] == "n1"
    assert len(big["DETAIL"]) == BIG
    assert big["DETAIL"].endswith("x\nend")
