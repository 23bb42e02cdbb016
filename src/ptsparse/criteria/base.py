"""The criterion axis: how important each weight is, and how a layer's mask is chosen from that.

Contract, in two calls:

Options are declared as ``Settings`` (:mod:`ptsparse.options`); ``patterns`` names the pattern kinds a
criterion supports (``None``: all) and :meth:`layer_errors` what the report records per layer. Under the channel
pattern, coupled channels of several layers are planned and pruned as one unit from the criterion's scores,
whatever the criterion (:mod:`ptsparse.coupled`); ``comparable_scores`` says its scores share one scale across
layers (summed as they are within a unit, not normalised per member), ``requires_coupling`` that a run is
refused where the coupling cannot be traced (otherwise each layer then prunes on its own).

* ``scores(model, targets, calibration)`` returns ``{layer name: tensor of the weight's shape}`` (higher =
  keep), measured on the dense model; score-driven allocations (``global``) rank these.
* ``prune_layer(target, stats, count, pattern)`` returns the layer's boolean keep-mask with exactly
  ``count`` pruned weights (for N:M and channel patterns, the pattern's structure). It may update the
  layer's kept weights in place (SparseGPT's reconstruction does).

``offloadable`` says whether it works with ``offload`` (the model in CPU memory, run one block at a time, forward
passes only: :mod:`ptsparse.offload`).

``statistics`` names the per-layer input statistics ``prune_layer`` needs (``"input_norms"``,
``"hessian"``; see :mod:`ptsparse.criteria.statistics`). When it is non-empty, layers are pruned one at a
time in execution order, each on inputs that flow through the already-pruned earlier layers, with one
layer's statistics in memory at a time (:func:`ptsparse.criteria.sequential.prune_model`).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..data import Calibration
from ..options import Part
from ..patterns import Pattern
from ..targets import Target


class Criterion(Part, abc.ABC):
    """Scores weights and chooses a layer's mask; see the module docstring for the contract."""

    patterns: ClassVar[tuple[str, ...] | None] = None
    requires_data: ClassVar[bool] = False
    statistics: ClassVar[tuple[str, ...]] = ()
    comparable_scores: ClassVar[bool] = False
    requires_coupling: ClassVar[bool] = False
    offloadable: ClassVar[bool] = True

    @abc.abstractmethod
    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor: ...

    def layer_errors(self) -> dict[str, float]:
        """A measured error per pruned layer, for the report (none by default)."""
        return {}


CRITERIA: Registry[type] = Registry("criterion")
