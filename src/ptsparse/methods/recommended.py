"""``recommended``: the parts the benchmark shows paying off, on the shared core (issue 16, benchmarks/RESULTS.md).

ERK magnitude masks at the target, static, recovered by the ``magnitude_kd`` distillation (SGD lr 0.01, one
epoch of warm-up then cosine, weight decay 3e-4, horizontal flips, teacher in eval mode) with the block loss:
logit KL at T = 4 plus, at every block output, the squared error relative to the teacher's mean squared output
(``kd_blocks`` with ``normalize: teacher``, so no block dominates by the scale of its activations; a model with
no blocks to find distils its logits alone). Budget rule: 100 epochs of the calibration set at batch 64 (1600
steps for 1024 images, 200 for 128), the seed methods' budget; ``--distill-iterations`` sets another (more
steps paid on the compact model, 200 -> 1600: 87.3% -> 89.5%, and stopped paying on the ResNet-20 at 0.9, 1600 ->
3200: 92.45% -> 92.30%, one seed).

What the evidence says (benchmarks/RESULTS.md, "Regimes", 3 seeds, paired differences): this recipe (the runs
``magnitude_kd-blocks_rel`` and ``recommended``) beats ``magnitude_kd`` beyond two standard deviations in every
regime measured with several seeds, on both reference models (+4.10 ± 0.18 and +3.33 ± 0.60 points with 128 images,
200 steps, 0.95; +1.51 ± 0.23 on the compact model with 1024 images, 200 steps, 0.9; with 1600 steps at 0.9, +1.78 ±
0.45 on the compact model and +0.64 ± 0.19 on the ResNet-20), where the block loss as FCPTS writes it (summed
squared error) helps the ResNet-20 and hurts the compact model. FCPTS's learned thresholds, UniPTS's search and DST,
and IEE are left out: none beats ``magnitude_kd`` in these regimes, and on the compact model several fall below it.

Cost: 212 s at 90% on the reference ResNet-20, 2 CPU cores (1600 distillation steps) (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("recommended")
def recommended(pattern: str) -> dict[str, Any]:
    return {"allocation": "erk", "criterion": "magnitude", "recovery": "distill", "objective": "kd_blocks",
            "dynamics": "static", "distill": DISTILL_RECIPE,
            "kd_blocks": {"temperature": 4.0, "normalize": "teacher", "no_blocks": "logits"}}
