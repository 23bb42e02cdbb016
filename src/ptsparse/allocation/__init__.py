"""Allocation axis: uniform, global, ERK and searched (UniPTS) per-layer sparsities that meet the global
target exactly."""

from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget, exact_counts, target_count
from .erk import ERK, erk_scores
from .global_ import Global
from .uniform import Uniform
from .unipts_search import ReducingRegrowingSearch

__all__ = ["ALLOCATIONS", "Allocation", "AllocationContext", "ERK", "Global", "LayerBudget",
           "ReducingRegrowingSearch", "Uniform", "erk_scores", "exact_counts", "target_count"]
