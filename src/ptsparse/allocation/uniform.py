"""Uniform allocation: every layer gets the target sparsity, water-filled around capped layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget


def water_fill(layers: Sequence[LayerBudget], sparsity: float) -> float:
    """The level s' with ``sum(numel * min(s', cap)) = sparsity * total``, found by bisection."""
    total = sum(layer.numel for layer in layers)
    low, high = 0.0, 1.0
    for _ in range(100):
        level = (low + high) / 2
        pruned = sum(layer.numel * min(level, layer.cap) for layer in layers)
        low, high = (level, high) if pruned < sparsity * total else (low, level)
    return high


@ALLOCATIONS.register("uniform")
class Uniform(Allocation):
    """The same sparsity in every layer; layers capped below it keep their cap and the rest make up."""

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        level = water_fill(layers, sparsity)
        return {layer.name: min(level, layer.cap) for layer in layers}
