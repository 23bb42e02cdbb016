"""Magnitude criterion: the score of a weight is its absolute value (``baselines.md`` §5)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import Calibration
from ..patterns import Pattern
from ..targets import Target
from .base import CRITERIA, Criterion


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """``|w|``; data-free."""

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None = None) -> dict[str, torch.Tensor]:
        return {target.name: target.weight.detach().abs() for target in targets}

    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor:
        return pattern.mask(target.weight.detach().abs(), count, target.name)
