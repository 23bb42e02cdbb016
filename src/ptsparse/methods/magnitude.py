"""Magnitude pruning: ERK allocation, magnitude scores, BatchNorm re-calibration (``baselines.md`` §5)."""

from __future__ import annotations

from typing import Any

from .base import METHODS


@METHODS.register("magnitude")
def magnitude(pattern: str) -> dict[str, Any]:
    """One-shot magnitude pruning; ``allocation`` may be ``uniform``, ``global`` or ``erk`` (default)."""
    return {"allocation": "erk", "criterion": "magnitude", "bn_recalibration": True}
