"""Criterion axis: scores per weight and the layer-by-layer pruning driver."""

from .base import CRITERIA, Criterion
from .magnitude import Magnitude
from .sequential import prune_model
from .statistics import STATISTICS, gather_statistics

__all__ = ["CRITERIA", "Criterion", "Magnitude", "STATISTICS", "gather_statistics", "prune_model"]
