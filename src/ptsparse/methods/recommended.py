"""``recommended``: the parts the benchmark shows paying off, on the shared core (issue 16, benchmarks/RESULTS.md).

ERK magnitude masks at the target, static, recovered by the ``magnitude_kd`` distillation (SGD lr 0.01, one
epoch of warm-up then cosine, weight decay 3e-4, horizontal flips, teacher in eval mode) with the block loss:
logit KL at T = 4 plus, at every block output, the squared error relative to the teacher's mean squared output
(``kd_blocks`` with ``normalize: teacher``, so no block dominates by the scale of its activations; a model with
no blocks to find distils its logits alone). Budget rule: 100 epochs of the calibration set at batch 64 (1600
steps for 1024 images, 200 for 128), the seed methods' budget; ``--distill-iterations`` buys more.

What the evidence says (3 seeds, paired differences beyond two standard deviations): see the regimes in
benchmarks/RESULTS.md; the searched, learned and exploit/explore mechanisms of UniPTS, FCPTS and IEE are left
out because no regime measured so far shows them beating the same distillation on ERK masks.

Cost: about the cost of ``magnitude_kd`` plus a few percent for the block outputs.
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("recommended")
def recommended(pattern: str) -> dict[str, Any]:
    return {"allocation": "erk", "criterion": "magnitude", "recovery": "distill", "objective": "kd_blocks",
            "dynamics": "static", "distill": DISTILL_RECIPE,
            "kd_blocks": {"temperature": 4.0, "normalize": "teacher", "no_blocks": "logits"}}
