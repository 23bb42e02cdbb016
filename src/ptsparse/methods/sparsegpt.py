"""``sparsegpt``: one-shot SparseGPT (Frantar & Alistarh, ICML 2023; ``baselines.md`` §8): OBS-style masks with a weight update.

Uniform per-layer sparsity as in the paper, layers pruned in execution order on the already-pruned
model's inputs, then BatchNorm re-calibration. Works with unstructured and N:M patterns.

Cost: 28 s at 90% on the reference ResNet-20, 2 CPU cores; no training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import METHODS


@METHODS.register("sparsegpt")
def sparsegpt(pattern: str) -> dict[str, Any]:
    return {"allocation": "uniform", "criterion": "sparsegpt"}
