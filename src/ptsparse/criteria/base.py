"""The criterion axis: how important each weight is, and how a layer's mask is chosen from that.

Contract, in two calls:

Options are declared as ``Settings`` (:mod:`ptsparse.options`); ``patterns`` names the pattern kinds a
criterion supports (``None``: all) and :meth:`layer_errors` what the report records per layer. A criterion
that prunes channels of several layers as one unit (``prunes_units``) describes its units, once :meth:`scores`
has run, in :meth:`unit_budgets`; the prune counts are planned per unit from them (:func:`ptsparse.sparsify`).

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..data import Calibration
from ..options import Part
from ..patterns import Pattern
from ..targets import Target

if TYPE_CHECKING:
    from ..allocation import LayerBudget


class Criterion(Part, abc.ABC):
    """Scores weights and chooses a layer's mask; see the module docstring for the contract."""

    patterns: ClassVar[tuple[str, ...] | None] = None
    requires_data: ClassVar[bool] = False
    statistics: ClassVar[tuple[str, ...]] = ()
    prunes_units: ClassVar[bool] = False
    offloadable: ClassVar[bool] = True

    @abc.abstractmethod
    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor: ...

    def unit_budgets(self, budgets: Sequence[LayerBudget], pattern: Pattern) -> list[LayerBudget]:
        """The layers as this criterion prunes them, after :meth:`scores`: layers whose channels it prunes
        together share a ``coupled`` key, with their weights of one step of the unit as ``unit`` (by default the
        budgets as given: every layer pruned on its own)."""
        return list(budgets)

    def layer_errors(self) -> dict[str, float]:
        """A measured error per pruned layer, for the report (none by default)."""
        return {}


CRITERIA: Registry[type] = Registry("criterion")
