"""Criterion axis: scores per weight (magnitude; data-driven criteria build on the same contract)."""

from .base import CRITERIA, Criterion
from .magnitude import Magnitude

__all__ = ["CRITERIA", "Criterion", "Magnitude"]
