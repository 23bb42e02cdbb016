"""Criterion axis: scores per weight and the layer-by-layer pruning driver."""

from .base import CRITERIA, Criterion
from .magnitude import Magnitude
from .sequential import prune_model
from .sparsegpt import SparseGPT
from .statistics import STATISTICS, gather_statistics, gather_statistics_all
from .taylor import Taylor
from .wanda import Wanda

__all__ = ["CRITERIA", "Criterion", "Magnitude", "STATISTICS", "SparseGPT", "Taylor", "Wanda",
           "gather_statistics", "gather_statistics_all", "prune_model"]
