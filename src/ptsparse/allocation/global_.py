"""Global allocation: rank the criterion's scores across all layers and prune the lowest.

``normalize="l2"`` divides each layer's scores by their Frobenius norm (POT's allocation), ``"l1"`` by
their sum; large layers are then pruned more. A layer that would pass its cap is fixed at the cap and
the rest of the budget is ranked again among the others (``baselines.md`` §4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..options import Options, option
from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget, target_count


@ALLOCATIONS.register("global")
class Global(Allocation):
    """Global ranking of scores, optionally normalised per layer.

    Args:
        normalize: ``"none"``, ``"l1"`` or ``"l2"``.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="global"):
        normalize: str = option("none", "per-layer normalisation of the scores before ranking: none, l1, l2",
                                choices=("none", "l1", "l2"))

    needs_scores = True

    def __init__(self, normalize: str = "none") -> None:
        self.normalize = self.Settings(normalize=normalize).normalize

    def _normalized(self, score: torch.Tensor) -> torch.Tensor:
        score = score.detach().float().flatten()
        if self.normalize == "l2":
            return score / score.norm().clamp_min(1e-30)
        if self.normalize == "l1":
            return score / score.abs().sum().clamp_min(1e-30)
        return score

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        if scores is None:
            raise ConfigError("allocation 'global' needs the criterion's scores")
        to_prune = target_count(layers, sparsity)
        counts: dict[str, int] = {}
        free = [layer for layer in layers]
        while True:
            ranked = torch.cat([self._normalized(scores[l.name]) for l in free]) if free else torch.empty(0)
            owner = torch.cat([torch.full((l.numel,), i) for i, l in enumerate(free)]) if free else ranked
            remaining = to_prune - sum(counts.values())
            lowest = torch.sort(ranked, stable=True).indices[:remaining]
            share = torch.bincount(owner[lowest], minlength=len(free)).tolist()
            over = [l for l, c in zip(free, share) if c > l.max_prune]
            if not over:
                counts.update({l.name: c for l, c in zip(free, share)})
                break
            for layer in over:
                counts[layer.name] = layer.max_prune
            free = [l for l in free if l not in over]
        return {l.name: counts[l.name] / l.numel for l in layers}
