"""What every benchmark gets from the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.controlplane import ControlPlane


@dataclass(frozen=True)
class BenchContext:
    """``plane``: a running test-bed control plane, shared by the benchmarks of one run.
    ``quick``: the smoke mode (make test): fewer repeats, shorter windows, same code paths.
    ``workdir``: scratch space for logs (agent logs, kubeconfigs).
    ``shared``: results of an expensive run that several benchmarks read (the roll of 20
    nodes feeds benchmarks 1 and 2), keyed by what was run."""

    plane: ControlPlane
    quick: bool
    workdir: Path
    shared: dict[str, Any] = field(default_factory=dict)
