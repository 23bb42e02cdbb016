"""Wanda: a weight's score is its magnitude times the norm of the input it multiplies (``baselines.md`` §7).

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024.
``S_ij = |W_ij| * ||X_j||_2`` with ``X_j`` column ``j`` of every input vector the layer sees on the
calibration set (unfolded patches for convolutions; a grouped conv's row pairs with its group's
inputs). No weight update. Unstructured masks compare within each output row (the paper's default) or
across the layer; N:M and channel masks come from the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import Calibration
from ..options import Options, option
from ..patterns import Pattern, Unstructured
from ..targets import Target
from .base import CRITERIA, Criterion
from .statistics import gather_statistics_all

COMPARISONS = ("row", "layer")


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` in the weight's shape.

    Args:
        weight: ``(out, in/groups, *kernel)`` or ``(out, in)``.
        input_sq_norms: ``(groups, c)`` sums of squared inputs per column of each group's 2-D view.
    """
    groups = input_sq_norms.shape[0]
    norms = input_sq_norms.to(weight.device).float().sqrt().repeat_interleave(weight.shape[0] // groups, dim=0)
    return weight.detach().float().abs() * norms.view(weight.shape)


def row_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask pruning the lowest scores of each output row, ``count`` in all.

    Each row prunes ``count // rows`` weights and the first ``count % rows`` rows one more (``baselines.md``
    §7, exact per-row counts). Ties prune the earlier column first.
    """
    flat = scores.flatten(1).float()
    rows, columns = flat.shape
    per_row = torch.full((rows,), count // rows, device=flat.device)
    per_row[: count % rows] += 1
    order = torch.sort(flat, dim=1, stable=True).indices
    rank = torch.arange(columns, device=flat.device).expand(rows, columns)
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep.scatter_(1, order, rank >= per_row[:, None])
    return keep.view(scores.shape)


@CRITERIA.register("wanda")
class Wanda(Criterion):
    """``|w| * ||x||``; layers pruned in execution order on the pruned model's inputs.

    Args:
        compare: ``"row"`` prunes the same share of every output row (the paper); ``"layer"`` ranks the
            whole layer at once. Only the unstructured pattern compares; N:M and channel use the pattern.
        batch_size: calibration batch size of the scoring pass.

    Raises:
        ConfigError: ``compare`` is neither ``"row"`` nor ``"layer"``.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="wanda"):
        compare: str = option("row", "unstructured: compare scores within each output row (paper) or the whole "
                              "layer", choices=COMPARISONS)

    requires_data = True
    statistics = ("input_norms",)

    def __init__(self, compare: str = "row", batch_size: int = 64) -> None:
        self.compare, self.batch_size = self.Settings(compare=compare).compare, batch_size

    @classmethod
    def from_config(cls, config) -> Wanda:
        return cls(**config.settings_of(cls).to_dict(), batch_size=config.batch_size)

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        stats = gather_statistics_all(model, targets, calibration, self.statistics, self.batch_size, device)
        return {t.name: wanda_scores(t.weight, stats[t.name]["input_sq_norms"]) for t in targets}

    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor:
        scores = wanda_scores(target.weight, stats["input_sq_norms"])
        if isinstance(pattern, Unstructured) and self.compare == "row":
            return row_mask(scores, count)
        return pattern.mask(scores, count, target.name)
