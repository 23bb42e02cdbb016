"""Coupled channel units: output channels of several layers that exist only together, planned and pruned as one
under the channel pattern, whatever the criterion.

Channels are *coupled* when removing one forces removing the others (the layers adding into one residual
stream, a depthwise convolution and its input, the parts of a concatenation; torch-pruning's dependency
groups, :mod:`ptsparse.graph.coupling`). Pruned in one member only, such a channel stays alive in the others and
the channel export cannot remove it. So, as Torch-Pruning does with its group importance, the criterion scores
each layer's weights on its own (importance), and this module plans the coupled channels (a *unit*):

* Score: a unit channel's score is the sum over the members of their channel scores (a channel's: the mean of
  its row's scores; a head's or a tie's: the mean over its rows), each member's first divided by their mean over
  the unit (Torch-Pruning's ``mean`` normaliser with ``sum`` reduction): every member weighs alike, whatever the
  scale of its scores (``|w|`` of a 1x1 shortcut beside a 3x3 convolution, Wanda's input norms of different
  layers). A criterion whose scores share one scale across layers (``comparable_scores``: Taylor's estimate
  the change of the loss) sums them as they are.
* Count: the members of a unit get one count of its steps (:meth:`CoupledUnits.budgets`, rounded by
  :func:`~ptsparse.allocation.exact_counts`), so the achieved sparsity is within one step of a unit of the
  target.
* Mask: every member prunes its unit's lowest-scoring channels (:meth:`CoupledUnits.mask`). The unit is decided
  from the scores of the dense model (our reading for criteria that prune layer by layer, Wanda: a unit's members
  lie in several blocks, so no point of the layer-by-layer pass sees them all on the pruned model); layers outside
  every unit are pruned by the criterion as before. As under every criterion, a pruned channel's bias and
  BatchNorm are masked with its filter (:func:`~ptsparse.masking.attach_channel_masks`), so the channel export
  removes it.

The q/k/v projections of an attention module (:mod:`ptsparse.attention`) form a unit whose channels are whole
heads; the channels a grouped convolution ties (the same offset in each of its groups) are one unit channel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._extras import MissingExtraError
from .attention import AttentionHeads
from .errors import ExportError
from .graph.coupling import ChannelGroup, channel_groups, head_groups
from .patterns import channel_scores
from .targets import Target

if TYPE_CHECKING:
    from .allocation import LayerBudget

log = logging.getLogger(__name__)


class CoupledUnits:
    """The coupled channel units of a run's layers (see the module docstring).

    Args:
        groups: coupled channel groups of the targets (:func:`~ptsparse.graph.coupling.channel_groups`, with
            attention heads as :func:`~ptsparse.graph.coupling.head_groups`).
        heads: the attention projections pruned by whole heads (their lone projections prune through the
            pattern's head ranking).
    """

    def __init__(self, groups: Sequence[ChannelGroup], heads: Collection[str] = ()) -> None:
        self.groups = list(groups)
        self.heads = set(heads)
        self._unit_of = {name: index for index, group in enumerate(self.groups) for name in group.members}
        self._orders: list[torch.Tensor | None] = [None] * len(self.groups)  # unit channels, lowest score first

    @classmethod
    def trace(cls, model: nn.Module, targets: Sequence[Target], example: torch.Tensor,
              heads: Mapping[str, AttentionHeads]) -> CoupledUnits:
        """The units of ``targets`` in ``model`` traced on ``example`` (model unchanged).

        Raises:
            MissingExtraError: torch-pruning is not installed.
            ExportError: torch-pruning cannot trace the model.
        """
        return cls(head_groups(channel_groups(model, example, [t.name for t in targets]), heads), heads)

    def removable(self, name: str) -> bool:
        """Whether the channel export could remove channels that layer ``name`` prunes: it is in a unit (torch-pruning
        traced how its outputs are used) and its unit is :attr:`~ptsparse.graph.coupling.ChannelGroup.removable`."""
        index = self._unit_of.get(name)
        return index is not None and self.groups[index].removable

    def together(self, name: str) -> bool:
        """Whether layer ``name`` prunes with its unit: the unit has several members, or its channels are ties of a
        grouped convolution (a lone layer, or a lone attention projection, prunes on its own)."""
        index = self._unit_of.get(name)
        if index is None:
            return False
        group = self.groups[index]
        return len(group.members) > 1 or (group.width > 1 and name not in self.heads)

    def score(self, scores: Mapping[str, torch.Tensor], comparable: bool) -> dict[str, torch.Tensor]:
        """Ranks every unit's channels by their unit score (see the module docstring); call before :meth:`mask`.

        Args:
            scores: the criterion's scores of the dense model, per weight.
            comparable: the scores share one scale across layers: summed as they are, not each member's divided
                by its mean.

        Returns:
            ``scores`` with the rows of each member of a unit (all but lone single-row layers) holding the unit's
            score, on that member's scale (times the mean it was divided by), for allocations that rank scores.
        """
        scores = dict(scores)
        for index, group in enumerate(self.groups):
            members = {}
            for name in group.members:
                rows = group.rows(name).to(scores[name].device)
                members[name] = channel_scores(scores[name])[rows].mean(1)
            scales = {name: None if comparable else channel.mean().clamp_min(torch.finfo(channel.dtype).tiny)
                      for name, channel in members.items()}
            unit = sum(channel if scales[name] is None else channel / scales[name] for name, channel in members.items())
            self._orders[index] = torch.sort(unit.float(), stable=True).indices
            if len(group.members) == 1 and group.width == 1:
                continue  # a lone layer keeps its own scores
            for name, scale in scales.items():
                rows = group.rows(name).to(scores[name].device)
                spread = scores[name].flatten(1).clone()
                spread[rows] = (unit if scale is None else unit * scale)[:, None, None].to(spread.dtype)
                scores[name] = spread.view(scores[name].shape)
        return scores

    def budgets(self, budgets: Sequence[LayerBudget], multiple: int = 1) -> list[LayerBudget]:
        """The members of each unit keyed together (``coupled``), with their weights of one step of the unit as
        ``unit``.

        A step is ``multiple`` rows of every member (fewer unit channels when a unit channel is several rows,
        e.g. a tie of a grouped convolution) when every member's width is a multiple of it, else one unit channel
        (a head, a tie, a row). Every layer keeps at least one step: its cap is lowered to leave it.
        """
        shapes = {b.name: b.shape for b in budgets}
        planned = []
        for budget in budgets:
            if self.together(budget.name):
                group = self.groups[self._unit_of[budget.name]]
                step = multiple if budget.name not in self.heads and \
                    all(shapes[n][0] % multiple == 0 for n in group.members) else 1
                channels = step // math.gcd(step, group.width)  # unit channels per step
                budget = replace(budget, unit=channels * group.channel_weights(budget.shape),
                                 coupled=next(iter(group.members)))
            planned.append(replace(budget, cap=min(budget.cap, 1 - budget.unit / budget.numel)))
        return planned

    def mask(self, name: str, shape: torch.Size, count: int) -> torch.Tensor:
        """Keep-mask of member ``name`` with its unit's lowest-scoring channels pruned, ``count`` weights in all.

        Raises:
            RuntimeError: :meth:`score` has not run.
        """
        index = self._unit_of[name]
        group, order = self.groups[index], self._orders[index]
        if order is None:
            raise RuntimeError(f"the unit of layer {name} has no scores; call CoupledUnits.score first")
        channels = count // group.channel_weights(shape)
        rows = group.rows(name).to(order.device)
        keep = torch.ones(shape[0], dtype=torch.bool, device=order.device)
        keep[rows[order[:channels]].flatten()] = False
        return keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def coupled_units(model: nn.Module, targets: Sequence[Target], example: torch.Tensor,
                  heads: Mapping[str, AttentionHeads], required: bool) -> CoupledUnits | None:
    """:meth:`CoupledUnits.trace`, or ``None`` (with a warning) where coupling cannot be traced and the criterion
    does not require it: its layers are then pruned each on its own.

    Raises:
        MissingExtraError: torch-pruning is not installed and ``required``.
        ExportError: torch-pruning cannot trace the model and ``required``.
    """
    try:
        return CoupledUnits.trace(model, targets, example, heads)
    except (MissingExtraError, ExportError) as error:
        if required:
            raise
        log.warning("channels are pruned layer by layer, not together with the channels coupled to them (%s); the "
                    "channel export keeps those that coupled layers still use", error)
        return None
