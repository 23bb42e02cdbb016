"""``wanda``: one-shot Wanda (Sun et al., ICLR 2024; ``baselines.md`` §7): scores |w| * ||x||, compared within each output row.

Uniform per-layer sparsity as in the paper, layers pruned in execution order on the already-pruned
model's inputs, then BatchNorm re-calibration. Works with unstructured and N:M patterns.

Cost: 22 s at 90% on the reference ResNet-20, 2 CPU cores; no training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import METHODS


@METHODS.register("wanda")
def wanda(pattern: str) -> dict[str, Any]:
    return {"allocation": "uniform", "criterion": "wanda"}
