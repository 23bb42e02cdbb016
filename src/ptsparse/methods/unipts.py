"""``unipts``: UniPTS (Xie et al., CVPR 2024; ``unipts.md``), small-budget reading.

Reducing-regrowing search for the per-layer sparsities (population 16, 8 generations, delta 0.05, label-free
kd fitness on a held-out calibration slice), then 100 epochs of the calibration set (1600 steps for 1024
samples at batch 64) of dynamic sparse training (magnitude top-k per layer every step, straight-through
gradients, SR-STE decay 5e-5 on pruned weights) under the base-decayed objective (T = 4, tau 8 decaying by
0.99 per epoch), SGD lr 0.01 with one epoch of warm-up then cosine, weight decay 1e-4, horizontal flips,
teacher in eval mode; BatchNorm re-calibrated on the final masks.

Each part switches off for ablation: ``allocation="erk"``, ``objective="kd_logits"``, ``dynamics="static"``.

Cost: 407 s at 90% on the reference ResNet-20, 2 CPU cores (search, then 1600 distillation steps) (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import DISTILL_RECIPE, METHODS


@METHODS.register("unipts")
def unipts(pattern: str) -> dict[str, Any]:
    return {"allocation": "unipts_search", "criterion": "magnitude", "recovery": "distill",
            "objective": "base_decayed", "dynamics": "dst", "distill": {**DISTILL_RECIPE, "weight_decay": 1e-4},
            "unipts_search": {"temperature": 4.0},
            "base_decayed": {"temperature": 4.0, "student_temperature": 1.0, "tau0": 8.0, "tau_decay": 0.99,
                             "tau_epochs": 100.0},
            "dst": {"update_every": 1, "pruned_decay": 5e-5}}
