"""``iee``: exploit/explore mask dynamics (Sun et al., WACV 2025; ``iee.md`` §6) after post-training masking.

ERK magnitude masks at the target, then the ``magnitude_kd`` recovery budget (logit KL at T = 4, 100 epochs
of the calibration set: 1600 steps for 1024 samples at batch 64, SGD lr 0.01, one epoch of warm-up then
cosine, weight decay 3e-4, flips) with IEE cycles during the first 65% of the run: 40 steps training the
active weights, prune the 10% (cosine-decayed) weakest by magnitude in each layer, 40 steps, 20 steps
training only the reactivated pruned weights, regrow as many. Per-layer counts stay fixed.

With ``pattern="channel"`` the units are whole output channels under a FLOPs budget: ``sparsity`` is then
the fraction of MACs removed, the start is Taylor channels chosen by the knapsack allocation, and prune and
grow are knapsacks on Taylor gate scores. Every part combines with the other axes:
``allocation="fcpts"`` or ``"unipts_search"``, ``objective="base_decayed"``, ``iee_criterion="taylor"``.

Cost: 747 s at 90% on the reference ResNet-20, 2 CPU cores (1600 distillation steps with IEE cycles) (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from ..patterns import pattern_kind
from .base import DISTILL_RECIPE, METHODS


@METHODS.register("iee")
def iee(pattern: str) -> dict[str, Any]:
    channels = pattern_kind(pattern) == "channel"
    return {"allocation": "knapsack" if channels else "erk", "criterion": "taylor" if channels else "magnitude",
            "recovery": "distill", "objective": "kd_logits", "dynamics": "iee", "distill": DISTILL_RECIPE,
            "kd_logits": {"temperature": 4.0}, "iee": {"criterion": "taylor" if channels else "magnitude"}}
