"""POT (Lazarevich et al., ICCVW 2021) as the toolkit configures it (``baselines.md`` §11).

L2-normalised global magnitude allocation, static masks, weight and bias correction, layer-wise
reconstruction on the dense model's cached inputs (Adam 1e-5 on weights, 1e-4 on biases; 2000 steps
per layer on CPU instead of the toolkit's 20,000), then BatchNorm re-calibration.

Cost: 160 s at 90% on the reference ResNet-20, 2 CPU cores (2000 steps per layer) (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import METHODS


@METHODS.register("pot")
def pot(pattern: str) -> dict[str, Any]:
    return {"allocation": "global", "global": {"normalize": "l2"}, "criterion": "magnitude", "recovery": "layerwise",
            "layerwise": {"iterations": 2000, "lr": 1e-5, "bias_lr": 1e-4, "weight_correction": True,
                          "bias_correction": True}}
