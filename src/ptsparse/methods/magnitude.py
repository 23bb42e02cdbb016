"""Magnitude pruning: ERK allocation, magnitude scores, BatchNorm re-calibration (``baselines.md`` §5).

Cost: 8.5 s at 90% (ERK) on the reference ResNet-20, 2 CPU cores; no training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

from .base import METHODS


@METHODS.register("magnitude")
def magnitude(pattern: str) -> dict[str, Any]:
    """One-shot magnitude pruning; ``allocation`` may be ``uniform``, ``global`` or ``erk`` (default)."""
    return {"allocation": "erk", "criterion": "magnitude", "bn_recalibration": True}
