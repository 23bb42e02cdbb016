"""``taylor``: one-shot channel pruning by first-order Taylor importance (``baselines.md`` §9).

Whole output channels, the same fraction in every layer (the output layer stays whole), scored on the
dense model with cross-entropy against its own predictions, then BatchNorm re-calibration.

Cost: 13 s at 50% of the channels on the reference ResNet-20, 2 CPU cores; no training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import METHODS


@METHODS.register("taylor")
def taylor(pattern: str) -> dict[str, Any]:
    return {"pattern": "channel", "allocation": "uniform", "criterion": "taylor", "taylor": {"aggregation": "squared"}}
