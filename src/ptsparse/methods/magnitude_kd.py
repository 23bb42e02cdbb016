"""``magnitude_kd``: the strong baseline every seed method must beat (issue 3).

ERK magnitude masks, static, recovered by logit distillation from the dense model with the seed methods'
default budget: 100 epochs of the calibration set (1600 steps for 1024 samples at batch 64), SGD lr 0.01
with one epoch of warm-up then cosine, weight decay 3e-4, horizontal flips. It isolates what each seed
method adds on top of masks + distillation.
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("magnitude_kd")
def magnitude_kd(pattern: str) -> dict[str, Any]:
    return {"allocation": "erk", "criterion": "magnitude", "recovery": "distill", "objective": "kd_logits",
            "dynamics": "static", "distill": DISTILL_RECIPE, "kd_logits": {"temperature": 4.0}}
