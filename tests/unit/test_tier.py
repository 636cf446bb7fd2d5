"""The unit tier stands alone: `pytest tests/unit` imports neither kubernetes nor dbusmock,
directly or through a conftest (tests/conftest.py, tests/unit/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("kubernetes", "dbusmock")
# Two fast files: what is under test is what pytest imports around them, not the files.
FAST_FILES = ("tests/unit/test_windows.py", "tests/unit/test_protocol.py")
RUN_TIMEOUT = 120.0

# A plugin for the child pytest: at the end of its session, which heavy packages are loaded.
PROBE = f"""
import json, os, sys

def pytest_sessionfinish(session, exitstatus):
    loaded = [name for name in {HEAVY!r} if name in sys.modules]
    with open(os.environ["CLUO_TIER_PROBE_OUT"], "w") as out:
        json.dump(loaded, out)
"""


def test_unit_tier_imports_neither_kubernetes_nor_dbusmock(tmp_path: Path) -> None:
    (tmp_path / "tier_probe.py").write_text(PROBE)
    out = tmp_path / "loaded.json"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *FAST_FILES, "-q", "-p", "no:cacheprovider",
         "-p", "tier_probe"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path, "CLUO_TIER_PROBE_OUT": str(out)},
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(out.read_text()) == [], "pytest tests/unit loaded a heavy package"
