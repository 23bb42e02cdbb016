"""``sparsegpt``: one-shot SparseGPT (Frantar & Alistarh, ICML 2023; ``baselines.md`` §8): OBS-style masks with a weight update.

Uniform per-layer sparsity as in the paper, layers pruned in execution order on the already-pruned
model's inputs, then BatchNorm re-calibration. Works with unstructured and N:M patterns.
"""

from __future__ import annotations

import dataclasses

from ..config import SparsityConfig
from .base import METHODS


@METHODS.register("sparsegpt")
def sparsegpt(**overrides) -> SparsityConfig:
    base = SparsityConfig(method="sparsegpt", allocation="uniform", criterion="sparsegpt")
    return dataclasses.replace(base, **overrides)
