"""First-order Taylor importance of output channels (Molchanov et al., CVPR 2019; ``baselines.md`` §9).

Per calibration batch b and output channel c of a layer:

* followed by a BatchNorm (gamma, beta): ``t_c = gamma_c * dL/dgamma_c + beta_c * dL/dbeta_c`` (the "gate"
  form, which also covers what flows through skip connections);
* otherwise: ``t_c = sum over the filter of w * dL/dw`` (+ ``b_c * dL/db_c``).

Importance ``I_c = mean_b t_c^2`` (``aggregation="squared"``, the paper) or ``mean_b |t_c|`` (``"abs"``,
HALP's code). The loss is cross-entropy against the labels when every sample has one, else against the
dense model's arg-max predictions (a KL to the dense model has zero gradient at the dense model); for a causal
language model (:func:`taylor_loss`), next-token cross-entropy on the calibration tokens themselves.
Scores are measured once on the dense model; a channel's score is repeated over its weights. Under a process
group each rank scores its turn of the batches (:func:`ptsparse.distributed.my_turns`; the model is in eval mode,
so a batch's gradients are one process's) and the float64 sums and batch counts are added over the ranks: the
scores equal one process's up to float64 rounding of the sum's order (about 1e-16 relative) before float32.

Coupled channels (our reading, so that pruned channels can be physically removed): channels that only
exist together (the outputs of layers added into one residual stream, a depthwise convolution and its
input; torch-pruning's dependency groups, :mod:`ptsparse.graph.coupling`) are scored and pruned as one
unit. The unit's score is the sum of its members' scores (every gate writing into the stream), each
member receives it, and every member prunes the unit's lowest-scoring channels. The q/k/v projections of an
attention module (:mod:`ptsparse.attention`) are pruned by whole heads: a unit's channels are then heads, a
head's score in a member the mean of its rows' scores (summed over the members, as for any unit), and every
row of a head receives it. Channels that a grouped convolution ties (the same offset in each of its groups,
:mod:`ptsparse.graph.coupling`) are one unit likewise, scored by the mean of their rows.

How many channels a unit prunes is planned with every other count (:meth:`Taylor.unit_budgets`, used by
:func:`~ptsparse.sparsify.plan_counts`): the weights allocated to its members together, divided by
the weights one step of the unit removes from all of them, rounded to the nearest step (a step: one unit channel,
or ``channel_multiple`` rows when every member's width is a multiple of it), the other layers making up the
difference (:func:`~ptsparse.allocation.exact_counts`). So the achieved sparsity is within a step of the
target, whatever the allocation gave each member, and no member loses all its channels or goes past its cap (a
member capped at 0 keeps the whole unit). As
under every criterion, a pruned channel's bias and following BatchNorm are masked with its filter
(:func:`~ptsparse.masking.attach_channel_masks`), so the channel outputs exactly 0 and can be removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..attention import find_attention, heads_by_layer
from ..data import Calibration
from ..norms import following_norms
from ..options import Options, option
from ..patterns import Channel, Pattern
from ..targets import Target
from .base import CRITERIA, Criterion

if TYPE_CHECKING:
    from ..allocation import LayerBudget
    from ..graph.coupling import ChannelGroup


def taylor_loss(logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The loss whose gradients score channels: cross-entropy against ``labels``, else against the model's own
    arg-max predictions; for a causal language model (integer ``x`` of shape ``(batch, seq)``, logits
    ``(batch, seq, vocab)``), next-token cross-entropy on ``x`` itself, the loss it was trained on (unlabelled
    text carries its own targets, where the arg-max of a token would only echo the model)."""
    if logits.dim() == 3 and not x.is_floating_point() and x.shape == logits.shape[:2]:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return F.cross_entropy(logits, labels if labels is not None else logits.detach().argmax(1))


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """First-order Taylor importance per output channel; for the ``channel`` pattern only.

    Coupled channels are found with torch-pruning (``pip install 'ptsparse[export]'``); without it,
    :meth:`scores` raises :class:`~ptsparse.export.MissingExtraError` naming that command.

    Args:
        aggregation: ``"squared"`` (mean of squared per-batch scores) or ``"abs"``.
        batch_size: calibration batch size of the per-batch scores.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="taylor"):
        aggregation: str = option("squared", "mean of squared (paper) or absolute (HALP) per-batch channel scores",
                                  choices=("squared", "abs"))

    requires_data = True
    patterns = ("channel",)
    prunes_units = True
    offloadable = False  # gradients through the whole model

    def __init__(self, aggregation: str = "squared", batch_size: int = 64) -> None:
        self.aggregation, self.batch_size = self.Settings(aggregation=aggregation).aggregation, batch_size
        self._units: dict[str, ChannelUnit] = {}

    @classmethod
    def from_config(cls, config) -> Taylor:
        return cls(**config.settings_of(cls).to_dict(), batch_size=config.batch_size)

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]:
        from ..graph.coupling import channel_groups, head_groups

        device = next(model.parameters()).device
        example = calibration.inputs[:2].to(device)
        names = [t.name for t in targets]
        heads = heads_by_layer(find_attention(model, names))
        groups = head_groups(channel_groups(model, example, names), heads)  # before the gradients: it may refuse
        norms = following_norms(model, targets, example)
        totals = {t.name: torch.zeros(t.shape[0], dtype=torch.float64, device=device) for t in targets}
        modes = {module: module.training for module in model.modules()}
        model.eval()  # running statistics stay untouched; gradients only
        batches = torch.zeros((), dtype=torch.long, device=device)
        try:
            for x, y in distributed.my_turns(calibration.batches(self.batch_size)):
                x = x.to(device)
                model.zero_grad(set_to_none=True)
                taylor_loss(model(x), x, y.to(device) if y is not None else None).backward()
                for target in targets:
                    gate = self._gate(target, norms.get(target.name))
                    gate = gate.pow(2) if self.aggregation == "squared" else gate.abs()
                    totals[target.name] += gate.double()
                batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            for module, mode in modes.items():
                module.training = mode
        for total in (*totals.values(), batches):
            distributed.all_reduce_(total)
        channel = {name: (total / batches).float() for name, total in totals.items()}
        self._units = {}
        for group in groups:
            unit = ChannelUnit(group, sum(channel[n][group.rows(n).to(device)].mean(1) for n in group.members))
            for name in group.members:
                channel[name] = channel[name].clone()
                channel[name][group.rows(name).to(device)] = unit.scores[:, None]
                self._units[name] = unit
        return {t.name: channel[t.name].view(-1, *([1] * (len(t.shape) - 1))).expand(t.shape).clone()
                for t in targets}

    @staticmethod
    def _gate(target: Target, norm: nn.Module | None) -> torch.Tensor:
        if norm is not None and norm.weight is not None and norm.weight.grad is not None:
            gate = norm.weight * norm.weight.grad
            if norm.bias is not None and norm.bias.grad is not None:
                gate = gate + norm.bias * norm.bias.grad
            return gate.detach()
        module = target.module
        gate = (module.weight * module.weight.grad).flatten(1).sum(1)
        if getattr(module, "bias", None) is not None and module.bias.grad is not None:
            gate = gate + module.bias * module.bias.grad
        return gate.detach()

    def unit_budgets(self, budgets: Sequence[LayerBudget], pattern: Pattern) -> list[LayerBudget]:
        """The members of each coupled unit keyed together, with their weights of one step of the unit as ``unit``.

        A step is ``channel_multiple`` rows of every member (fewer unit channels when a unit channel is several
        rows, e.g. a tie of a grouped convolution) when every member's width is a multiple of it, else one unit
        channel (a head, a tie, a row). Every layer keeps at least one step: its cap is lowered to leave it.
        """
        if not isinstance(pattern, Channel):
            return list(budgets)
        shapes = {b.name: b.shape for b in budgets}
        planned = []
        for budget in budgets:
            unit = self._units.get(budget.name)
            if unit is not None and unit.together(pattern):
                group = unit.group
                multiple = pattern.multiple if budget.name not in pattern.heads and \
                    all(shapes[n][0] % pattern.multiple == 0 for n in group.members) else 1
                channels = multiple // math.gcd(multiple, group.width)  # unit channels per step
                row = math.prod(budget.shape[1:])
                budget = replace(budget, unit=channels * group.width * row, coupled=next(iter(group.members)))
            planned.append(replace(budget, cap=min(budget.cap, 1 - budget.unit / budget.numel)))
        return planned

    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor:
        unit = self._units.get(target.name)
        if not isinstance(pattern, Channel) or unit is None or not unit.together(pattern):
            return pattern.mask(stats["scores"], count, target.name)
        row = target.shape.numel() // target.shape[0]
        return unit.mask(target.name, target.shape, count // (unit.group.width * row))


class ChannelUnit:
    """Coupled output channels (or attention heads) of several layers, pruned together (see the module docstring).

    Args:
        group: the coupled channels: each member's rows per unit channel.
        scores: the unit's score per unit channel (the sum of its members' scores).
    """

    def __init__(self, group: ChannelGroup, scores: torch.Tensor) -> None:
        self.group, self.scores = group, scores
        self.order = torch.sort(scores.float(), stable=True).indices  # lowest score first

    def together(self, pattern: Channel) -> bool:
        """Whether its channels are pruned as a unit: several members, or one whose unit channels are ties of a
        grouped convolution (a lone attention projection prunes its heads through the pattern)."""
        name = next(iter(self.group.members))
        return len(self.group.members) > 1 or (self.group.width > 1 and name not in pattern.heads)

    def mask(self, name: str, shape: torch.Size, channels: int) -> torch.Tensor:
        """Keep-mask of member ``name`` with the unit's ``channels`` lowest-scoring unit channels pruned."""
        keep = torch.ones(shape[0], dtype=torch.bool, device=self.scores.device)
        rows = self.group.rows(name).to(self.scores.device)
        keep[rows[self.order[:channels]].flatten()] = False
        return keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
