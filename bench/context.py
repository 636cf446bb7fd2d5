"""What every benchmark gets from the runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.testbed.controlplane import ControlPlane


@dataclass(frozen=True)
class BenchContext:
    """``plane``: a running test-bed control plane, shared by the benchmarks of one run.
    ``quick``: the smoke mode (make test): fewer repeats, shorter windows, same code paths.
    ``workdir``: scratch space for logs (agent logs, kubeconfigs)."""

    plane: ControlPlane
    quick: bool
    workdir: Path
