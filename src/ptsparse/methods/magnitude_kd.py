"""``magnitude_kd``: the strong baseline every seed method must beat (issue 3).

ERK magnitude masks, static, recovered by logit distillation from the dense model with the seed methods'
default budget: 100 epochs of the calibration set (1600 steps for 1024 samples at batch 64), SGD lr 0.01
with one epoch of warm-up then cosine, weight decay 3e-4, horizontal flips. It isolates what each seed
method adds on top of masks + distillation.

Cost: 194 s at 90% on the reference ResNet-20, 2 CPU cores (1600 distillation steps) (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("magnitude_kd")
def magnitude_kd(pattern: str) -> dict[str, Any]:
    return {"allocation": "erk", "criterion": "magnitude", "recovery": "distill", "objective": "kd_logits",
            "dynamics": "static", "distill": DISTILL_RECIPE, "kd_logits": {"temperature": 4.0}}
