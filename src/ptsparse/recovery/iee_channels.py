"""Whole output channels as IEE units, under a FLOPs (MACs) or latency budget (``iee.md`` §6, channel variant).

A unit is a set of coupled channels (:class:`~ptsparse.allocation.knapsack.ChannelCosts` groups: layers
added into one residual stream share one mask). A channel's *entries* are its filter rows in every member
layer, the member's bias, and the affine weight and bias of the BatchNorm after it; each is masked by a
parametrization (the run's channel masks, :func:`~ptsparse.masking.attach_channel_masks`), and every mask
of a channel is written together, so a pruned channel outputs exactly 0 while its stored values stay for
reactivation, and a regrown one resumes its filter with its bias and BatchNorm.

Prune is a knapsack over the active channels with the budget lowered by ``ζ_t`` of it, grow a knapsack
over the explored channels that refills it (:func:`~ptsparse.allocation.knapsack.solve_knapsack`); the
budget is the cost of the masks the run started from, which the allocation fitted to the target, so
per-layer channel counts may move while the total cost never exceeds it. Scores per channel, summed over
a unit's members: ``taylor`` accumulates ``|gamma * dL/dgamma + beta * dL/dbeta|`` (without a BatchNorm,
``|sum w * dL/dw + b * dL/db|`` over the filter) at every step of the phase; ``magnitude`` is the filter's
L2 norm at the end of it. On attention projections a unit channel is a whole head, its q, k and v rows
(:mod:`ptsparse.attention`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..allocation.knapsack import ChannelCosts, solve_knapsack, unit_minimums
from ..attention import find_attention, heads_by_layer
from ..errors import ConfigError
from ..masking import WeightMask, attach_channel_masks, mask_of, weight_mask
from ..norms import following_norms
from ..targets import Target
from .dynamics import Masks, reset_optimizer_entries


@dataclass
class _Entry:
    """One masked tensor of a unit member: ``parameter`` on ``module``, whose rows are the member's channels."""

    module: nn.Module
    parameter: str
    unit: int
    channels: torch.Tensor  # rows of the tensor for each unit channel, (channels, width): width > 1 for heads
    gate: bool  # part of the channel's Taylor gate (the BatchNorm's, or the layer's where none follows)
    filter: bool = False  # the member layer's weight (its norm is the magnitude score)

    @property
    def stored(self) -> torch.Tensor:
        return getattr(self.module.parametrizations, self.parameter).original

    @property
    def mask(self) -> WeightMask:
        return weight_mask(self.module, self.parameter)

    def rows(self, channels: torch.Tensor) -> torch.Tensor:
        """A mask of the tensor's shape, True on the rows of the unit channels where ``channels`` is True."""
        rows = torch.zeros(self.stored.shape[0], dtype=torch.bool, device=self.stored.device)
        rows[self.channels[channels.to(self.channels.device)]] = True
        return rows.view(-1, *([1] * (self.stored.dim() - 1))).expand_as(self.stored)


class ChannelUnits:
    """Coupled output channels as units of IEE (see the module docstring)."""

    def __init__(self, model: nn.Module, targets: list[Target], criterion: str, cost: str, batch_size: int,
                 example: torch.Tensor | None) -> None:
        if example is None:
            raise ConfigError("dynamics 'iee' on channels traces the model; it needs an example input")
        for target in targets:
            if mask_of(target.module) is None:
                raise ConfigError(f"dynamics 'iee' needs a mask on layer {target.name}; prune the model first")
        self.criterion = criterion
        by_name = {t.name: t for t in targets}
        heads = heads_by_layer(find_attention(model, [t.name for t in targets]))
        self.costs = ChannelCosts.trace(model, targets, example, cost, example.device, batch_size, heads=heads)
        self.keys = [next(iter(unit.members)) for unit in self.costs.units]
        norms = following_norms(model, targets, example)
        self.entries: list[_Entry] = []
        self.active: Masks = {}
        self.modules = {name: by_name[name].module for unit in self.costs.units for name in unit.members}
        for index, unit in enumerate(self.costs.units):
            key = self.keys[index]
            rows = mask_of(self.modules[key]).flatten(1).any(1)
            self.active[key] = rows[unit.rows(key).to(rows.device)].any(1)
            for name in unit.members:
                module, norm = self.modules[name], norms.get(name)
                attach_channel_masks(by_name[name], norm)  # as the run attached them, unless it did already
                rows_of_unit = unit.rows(name).to(module.weight.device)
                self.entries.append(_Entry(module, "weight", index, rows_of_unit, gate=norm is None, filter=True))
                owners = [(module, "bias", norm is None), (norm, "weight", True), (norm, "bias", True)]
                for owner, parameter, gate in owners:
                    if owner is not None and weight_mask(owner, parameter) is not None:
                        self.entries.append(_Entry(owner, parameter, index, rows_of_unit, gate))
        self.budget: float | None = None
        self.scores_sum: list[torch.Tensor] = []
        self.show(dense=False)

    def weight(self, name: str) -> torch.Tensor:
        return self.modules[name].parametrizations.weight.original

    def parameters(self) -> list[torch.Tensor]:
        return [entry.stored for entry in self.entries]

    def set_straight_through(self, on: bool) -> None:
        for entry in self.entries:
            entry.mask.straight_through = on

    @torch.no_grad()
    def show(self, dense: bool) -> None:
        for entry in self.entries:
            key = self.keys[entry.unit]
            entry.mask.mask.copy_(entry.rows(torch.ones_like(self.active[key]) if dense else self.active[key]))

    @contextmanager
    def holding(self, active: bool) -> Iterator[None]:
        with torch.no_grad():
            where = [entry.rows(self.active[self.keys[entry.unit]] == active) for entry in self.entries]
            held = [entry.stored[rows].clone() for entry, rows in zip(self.entries, where)]
        yield
        with torch.no_grad():
            for entry, rows, values in zip(self.entries, where, held):
                entry.stored[rows] = values

    @torch.no_grad()
    def accumulate(self) -> None:
        gates = [torch.zeros(size, dtype=torch.float64, device=self.active[key].device)
                 for size, key in zip(self.costs.sizes, self.keys)]
        for entry in self.entries:
            stored = entry.stored
            if entry.gate and stored.grad is not None:
                per_row = (stored * stored.grad).reshape(len(stored), -1).sum(1)
                gates[entry.unit] += per_row[entry.channels].sum(1).double()
        if not self.scores_sum:
            self.scores_sum = [torch.zeros_like(gate) for gate in gates]
        for total, gate in zip(self.scores_sum, gates):
            total += gate.abs()

    def clear_gradients(self) -> None:
        self.scores_sum = []

    @torch.no_grad()
    def scores(self, unit: int) -> torch.Tensor:
        if self.criterion == "taylor":
            if not self.scores_sum:
                return torch.zeros(self.costs.sizes[unit], dtype=torch.float64)
            return self.scores_sum[unit].cpu()
        norm = torch.zeros(self.costs.sizes[unit], dtype=torch.float64)
        for entry in self.entries:
            if entry.unit == unit and entry.filter:
                norm += entry.stored.detach().flatten(1).pow(2).sum(1)[entry.channels].sum(1).double().cpu()
        return norm.sqrt()

    def _set_active(self, kept: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> Masks:
        """Installs new unit masks, zeroing optimizer state of every channel that changed; returns the changes."""
        changed = {}
        for key, mask in zip(self.keys, kept):
            changed[key] = mask ^ self.active[key]
            self.active[key] = mask
        for entry in self.entries:
            reset_optimizer_entries(optimizer, entry.stored, entry.rows(changed[self.keys[entry.unit]]))
        return changed

    @torch.no_grad()
    def prune(self, fraction: float, state) -> Masks:
        """Knapsack over the active channels with the budget lowered by ``fraction`` of it."""
        counts = [int(self.active[key].sum()) for key in self.keys]
        if self.budget is None:
            self.budget = self.costs.cost(counts)
        budgets = {budget.name: budget for budget in state.budgets}
        low = [min(lo, c) for lo, c in zip(unit_minimums(self.costs, budgets), counts)]
        capacity = max((1.0 - fraction) * self.budget, self.costs.cost(low))
        return self._choose(candidates_active=True, capacity=capacity, low=low, high=counts, state=state)

    @torch.no_grad()
    def grow(self, state) -> Masks:
        """Knapsack over the explored (pruned) channels that refills the budget; active channels stay."""
        counts = [int(self.active[key].sum()) for key in self.keys]
        capacity = max(self.budget, self.costs.cost(counts))
        return self._choose(candidates_active=False, capacity=capacity, low=counts, high=self.costs.sizes,
                            state=state)

    def _choose(self, candidates_active: bool, capacity: float, low: list[int], high: list[int], state) -> Masks:
        """Each unit keeps its channels outside the candidates plus its best candidates, as many as the knapsack
        picks: pruning ranks the active channels (nothing else is kept), growing the pruned ones."""
        actives = [self.active[key].cpu() for key in self.keys]
        values, orders, kept_anyway = [], [], []
        for index, active in enumerate(actives):
            candidates = active if candidates_active else ~active
            always = active & ~candidates
            order = self.scores(index).masked_fill(~candidates, float("-inf")).sort(descending=True, stable=True)
            ranked = order.values[: int(candidates.sum())].clamp(min=0)
            value = torch.cat([torch.zeros(int(always.sum()) + 1, dtype=torch.float64), ranked.cumsum(0)])
            values.append(torch.cat([value, value[-1].expand(len(active) + 1 - len(value))]))
            orders.append(order.indices)
            kept_anyway.append(always)
        kept = solve_knapsack(values, self.costs, capacity, low, high, start=[int(a.sum()) for a in actives])
        masks = []
        for index, (order, always, k) in enumerate(zip(orders, kept_anyway, kept)):
            mask = always.clone()
            mask[order[: k - int(always.sum())]] = True
            masks.append(mask.to(self.active[self.keys[index]].device))
        return self._set_active(masks, state.optimizer)

    def summary(self) -> dict[str, Any]:
        """The budget the cycles kept to and the final cost, in the cost model's units."""
        cost = self.costs.cost([int(self.active[key].sum()) for key in self.keys])
        return {"iee_cost": self.costs.kind, "iee_budget": self.budget, "iee_cost_after": cost,
                "iee_reduction": 1 - cost / self.costs.dense_cost}

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "scores_sum": self.scores_sum, "budget": self.budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = {key: mask.clone() for key, mask in state["active"].items()}
        self.scores_sum, self.budget = list(state["scores_sum"]), state["budget"]

    def finish(self) -> None:
        """Plain boolean masks of the final channels on the layers, their biases and BatchNorms (baked by the run)."""
        self.set_straight_through(False)
        self.show(dense=False)
