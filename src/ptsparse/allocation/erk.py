"""ERK (Erdős–Rényi-Kernel) allocation [RigL, Evci et al. 2020; ``baselines.md`` §3].

Layer density ``d_l = clip(eps * r_l, 1 - cap_l, 1)`` with the raw score
``r_l = (sum(shape) / prod(shape)) ** power``; ``eps`` is found by bisection so the kept weights are
``(1 - S) * N``. Small layers (the stem, the classifier) stay denser; ``power = 0`` gives uniform.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..options import Options, option
from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget


def erk_scores(layers: Sequence[LayerBudget], power: float = 1.0) -> dict[str, float]:
    """``(sum of weight dims / product of weight dims) ** power`` per layer (kernel dims included)."""
    return {layer.name: (sum(layer.shape) / math.prod(layer.shape)) ** power for layer in layers}


@ALLOCATIONS.register("erk")
class ERK(Allocation):
    """Erdős–Rényi-Kernel densities, scaled to the target and clipped to each layer's cap.

    Args:
        power: exponent of the raw score (1 in RigL and FCPTS, 0.5 in some toolkits).
    """

    @dataclass(frozen=True)
    class Settings(Options, part="erk"):
        power: float = option(1.0, "ERK exponent (0 gives uniform)", minimum=0)

    def __init__(self, power: float = 1.0) -> None:
        self.power = self.Settings(power=power).power

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        raw = erk_scores(layers, self.power)
        total = sum(layer.numel for layer in layers)
        keep = (1.0 - sparsity) * total

        def densities(eps: float) -> dict[str, float]:
            return {l.name: min(max(eps * raw[l.name], 1.0 - l.cap), 1.0) for l in layers}

        low, high = 0.0, 1.0
        while sum(l.numel * d for l, d in zip(layers, densities(high).values())) < keep:
            high *= 2.0
        for _ in range(200):
            eps = (low + high) / 2
            kept = sum(l.numel * d for l, d in zip(layers, densities(eps).values()))
            low, high = (eps, high) if kept < keep else (low, eps)
        return {name: 1.0 - density for name, density in densities(high).items()}
