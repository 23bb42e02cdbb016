"""The criterion axis: how important each weight is, and how a layer's mask is chosen from that.

Contract, in two calls:

* ``scores(model, targets, calibration)`` returns ``{layer name: tensor of the weight's shape}`` (higher =
  keep), measured on the dense model; score-driven allocations (``global``) rank these.
* ``prune_layer(target, stats, count, pattern)`` returns the layer's boolean keep-mask with exactly
  ``count`` pruned weights (for N:M and channel patterns, the pattern's structure). It may update the
  layer's kept weights in place (SparseGPT's reconstruction does).

``statistics`` names the per-layer input statistics ``prune_layer`` needs (``"input_norms"``,
``"hessian"``; see :mod:`ptsparse.criteria.statistics`). When it is non-empty, layers are pruned one at a
time in execution order, each on inputs that flow through the already-pruned earlier layers, with one
layer's statistics in memory at a time (:func:`ptsparse.criteria.sequential.prune_model`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .._registry import Registry
from ..data import Calibration
from ..patterns import Pattern
from ..targets import Target


class Criterion(Protocol):
    """Scores weights and chooses a layer's mask; see the module docstring for the contract."""

    requires_data: bool
    statistics: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> Criterion: ...

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]: ...

    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor: ...


CRITERIA: Registry[type] = Registry("criterion")
