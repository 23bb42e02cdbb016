"""``fcpts``: Fast and Controllable Post-Training Sparsity (Gong et al., AAAI 2024; ``fcpts.md``).

Starts from ERK magnitude masks at the target, then learns one magnitude threshold per layer jointly with
the weights: logit distillation from the dense model (KL at T = 4) plus ``|S - S*|`` made differentiable
by the histogram bridge, 100 epochs of the calibration set (1600 steps for 1024 samples at batch 64), SGD
lr 0.01 with one epoch of warm-up then cosine, weight decay 3e-4 on weights (never on the thresholds),
horizontal flips. A final projection meets the target exactly; BatchNorm is then re-calibrated.
Unstructured only: one threshold per layer cannot express N:M or channel patterns.

Cost: 425 s at 90% on the reference ResNet-20, 2 CPU cores (1600 distillation steps) (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("fcpts")
def fcpts(pattern: str) -> dict[str, Any]:
    return {"allocation": "erk", "criterion": "magnitude", "recovery": "distill", "objective": "kd_logits",
            "dynamics": "learned_thresholds", "distill": DISTILL_RECIPE, "kd_logits": {"temperature": 4.0},
            "learned_thresholds": {"penalty": "abs", "penalty_weight": 1.0, "density": "histogram",
                                   "score_grad": "constraint_only"}}
