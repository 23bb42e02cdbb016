"""``recommended``: the parts the benchmark shows paying off, on the shared core (issue 16, benchmarks/RESULTS.md).

ERK allocation; for unstructured sparsity the masks tighten gradually during recovery (``gradual``: from the
dense weights to the ERK counts by magnitude on a cubic schedule over the first half of the budget), for N:M
and channels the magnitude masks are fixed at the start (``static``). Recovery is the ``magnitude_kd``
distillation (SGD lr 0.01, one epoch of warm-up then cosine, weight decay 3e-4, horizontal flips, teacher in
eval mode) with the block loss: logit KL at T = 4 plus, at every block output, the squared error relative to the
teacher's mean squared output (``kd_blocks`` with ``normalize: teacher``, so no block dominates by the scale of
its activations; a model with no blocks to find distils its logits alone). Budget rule: 100 epochs of the
calibration set at batch 64 (1600 steps for 1024 images, 200 for 128), the seed methods' budget;
``--distill-iterations`` sets another.

What the evidence says (benchmarks/RESULTS.md, "Regimes" and "The recommended recipe against its targets",
seeds and paired differences there): the relative block loss beats ``magnitude_kd``'s logit loss in every regime
measured, on both reference models (the block loss as FCPTS writes it, summed squared error, helps the ResNet-20
and hurts the compact model), and gradual tightening adds most where one-shot damage is largest: the compact
depthwise model and 95% on the ResNet-20 (``recommended-static`` is this recipe with masks fixed at the start).
FCPTS's learned thresholds, UniPTS's search and DST, and IEE are left out: none beats ``magnitude_kd`` in
these regimes, and on the compact model several fall below it.
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("recommended")
def recommended(pattern: str) -> dict[str, Any]:
    return {"allocation": "erk", "criterion": "magnitude", "recovery": "distill", "objective": "kd_blocks",
            "dynamics": "gradual" if pattern == "unstructured" else "static", "distill": DISTILL_RECIPE,
            "kd_blocks": {"temperature": 4.0, "normalize": "teacher", "no_blocks": "logits"}}
