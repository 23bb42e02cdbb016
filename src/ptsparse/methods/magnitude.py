"""Magnitude pruning: ERK allocation, magnitude scores, BatchNorm re-calibration (``baselines.md`` §5)."""

from __future__ import annotations

import dataclasses

from ..config import SparsityConfig
from .base import METHODS


@METHODS.register("magnitude")
def magnitude(**overrides) -> SparsityConfig:
    """One-shot magnitude pruning; ``allocation`` may be ``uniform``, ``global`` or ``erk`` (default)."""
    base = SparsityConfig(method="magnitude", allocation="erk", criterion="magnitude", bn_recalibration=True)
    return dataclasses.replace(base, **overrides)
