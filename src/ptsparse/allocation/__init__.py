"""Allocation axis: uniform, global, ERK, outlier-weighed (OWL), searched (UniPTS) and learned (FCPTS) per-layer
sparsities that meet the global target exactly, and knapsack channel counts that meet a MACs or latency budget."""

from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget, exact_counts, target_count
from .erk import ERK, erk_scores
from .global_ import Global
from .knapsack import ChannelCosts, Knapsack, mac_reduction, solve_knapsack
from .learned import LearnedThresholdAllocation
from .owl import OWL, outlier_ratio, owl_sparsities
from .uniform import Uniform
from .unipts_search import ReducingRegrowingSearch

__all__ = ["ALLOCATIONS", "Allocation", "AllocationContext", "ChannelCosts", "ERK", "Global", "Knapsack",
           "LayerBudget", "LearnedThresholdAllocation", "OWL", "ReducingRegrowingSearch", "Uniform", "erk_scores",
           "exact_counts", "mac_reduction", "outlier_ratio", "owl_sparsities", "solve_knapsack", "target_count"]
