"""Allocation axis: uniform, global and ERK per-layer sparsities that meet the global target exactly."""

from .base import ALLOCATIONS, Allocation, LayerBudget, exact_counts, target_count
from .erk import ERK, erk_scores
from .global_ import Global
from .uniform import Uniform

__all__ = ["ALLOCATIONS", "Allocation", "ERK", "Global", "LayerBudget", "Uniform", "erk_scores",
           "exact_counts", "target_count"]
