"""Knapsack allocation: channel counts that meet a MACs or latency budget (HALP, Shen et al. 2022; ``iee.md`` §5, 6).

Cost model. A *unit* is a set of coupled output channels (torch-pruning's dependency groups, see
:mod:`ptsparse.graph.coupling`) that holds at least one target layer; a target coupled to nothing is a unit of
its own. The q/k/v projections of an attention module (:mod:`ptsparse.attention`) form units whose channels
are whole heads (when :meth:`ChannelCosts.trace` is given the heads): removing a head removes its rows in every
member and the output projection's input columns it feeds. When unit ``u`` keeps ``kept[u]`` of its ``sizes[u]``
channels, every Conv/Linear layer of the model
(targets or not) keeps the output channels of the unit it produces (all of them if it produces none) and the
input channels of the units that feed it (all of them for the model input and other producers). Its MACs are
``c_out * (c_in / groups) * kernel volume * output positions``, what :func:`~ptsparse.graph.cost.count_macs`
counts on the channel-removed model; a depthwise convolution reads one input per output channel, whatever it
keeps. Its latency is interpolated bilinearly in a table of ``(c_out, c_in)`` timings of a standalone layer of
that shape, measured on the target device at the serving batch (``knapsack_latency_batch``, by default the run's
batch size) and the calibration inputs' size. The model's cost is the sum over its layers. Costs couple
neighbouring units (``c_out * c_in``), so a unit's cost depends on the others' counts. A sum of standalone layers
leaves out what runs between them (normalisation, activations, pooling, additions), so the latency allocation then
times the planned model itself and corrects its budget (``knapsack_latency_rounds``,
:meth:`Knapsack._meet_measured_latency`).

Solver (:func:`solve_knapsack`). A grouped 0/1 knapsack: each unit keeps a top-``k`` prefix of its channels by
importance, worth ``values[u][k]``. The cost is linearised around a starting point (each unit's cost curve with
the others held there), the linear problem is solved exactly by dynamic programming on an integer grid of cost
buckets, and the model is re-linearised around the solution. A greedy step then drops the channel that loses
the least value per true cost saved until the true cost fits, and adds back channels while they fit, so the
result always meets the budget.

Allocation (``knapsack``). ``sparsity`` is the fraction of the dense cost removed. Each unit's channel importance is
the mean over its members of their channel scores: the channel pattern gives every member the unit's score, on the
member's scale (:meth:`~ptsparse.coupled.CoupledUnits.score`; Taylor's: the sum), so this ranks a unit's channels
as its masks will. A head's score in a member is the sum of its rows' scores (it keeps all of them). Under
``channel_multiple`` N a unit loses N channels at a time (where every member's width is a multiple of N), so kept
widths stay multiples of N. Its ratios are exact channel counts (``exact = True``); the weight sparsity they give
follows from the cost budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from .. import distributed
from .._extras import MissingExtraError
from ..attention import AttentionHeads, find_attention, heads_by_layer
from ..errors import ConfigError, ExportError
from ..graph.cost import CONV_TYPES, measure_latency, weight_applications
from ..graph.coupling import ChannelGroup, build_dependency_graph, head_group, head_groups, iter_groups
from ..masking import attach_channel_masks, attach_masks, bake
from ..norms import following_norms
from ..options import Options, option
from ..targets import Target
from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget

COSTS = ("macs", "latency")


@dataclass
class _Layer:
    """One Conv/Linear layer of the model, as the cost model sees it."""

    name: str
    module: nn.Module
    out_channels: int
    in_features: int  # input channels of a convolution, input features of a Linear
    groups: int
    positions: int  # output positions per sample (over all calls): MACs = weights * positions
    input_shape: tuple[int, ...]  # one sample's input (for timing); a Linear's: (positions, in_features)
    calls: int = 1
    out_unit: int | None = None
    out_per_channel: int = 1  # output rows per channel of its unit (a head's rows)
    in_units: list[tuple[int, float]] = field(default_factory=list)  # (unit, inputs per unit channel)
    table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # out grid, in grid, times (ms)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_features


class KnapsackCosts(Protocol):
    """What :func:`solve_knapsack` needs of a cost model (:class:`ChannelCosts` is one)."""

    def cost(self, kept: Sequence[int]) -> float: ...

    def curve(self, unit: int, kept: Sequence[int]) -> torch.Tensor: ...


class ChannelCosts:
    """MACs or latency of a model's Conv/Linear layers as a function of the channels each unit keeps.

    Build it with :meth:`trace`. See the module docstring for the model.

    Attributes:
        units: the coupled channel units, in execution order of their first member; each member is a target.
        sizes: channels per unit.
        fixed: per unit, whether its channels cannot go: Conv/Linear layers outside the targets also produce
            them (pruning the targets alone then removes none of them; the cost model assumes every producer
            shrinks), or the channel export could not remove them (not
            :attr:`~ptsparse.graph.coupling.ChannelGroup.removable`, or a target torch-pruning does not see).
            An allocation should keep such a unit whole.
        kind: ``"macs"`` (per sample) or ``"latency"`` (milliseconds per batch).
        dense_cost: the cost with every channel kept.
    """

    def __init__(self, units: list[ChannelGroup], fixed: list[bool], layers: list[_Layer], kind: str) -> None:
        self.units, self.fixed, self.kind = units, fixed, kind
        self.sizes = [unit.size for unit in units]
        self._layers = layers
        self._touching = [[layer for layer in layers if layer.out_unit == u or any(v == u for v, _ in layer.in_units)]
                          for u in range(len(units))]
        self._last: tuple[tuple[int, ...], float] | None = None
        self.dense_cost = self.cost(self.sizes)

    @classmethod
    def trace(cls, model: nn.Module, targets: Sequence, example: torch.Tensor, cost: str = "macs",
              device: str | torch.device = "cpu", batch_size: int = 64, points: int = 6, warmup: int = 3,
              repeats: int = 7, heads: Mapping[str, AttentionHeads] | None = None) -> ChannelCosts:
        """Traces the model's layers and channel couplings (and times its layers for ``cost="latency"``).

        Args:
            model: the dense model (not modified; traced in eval mode on ``example``'s device).
            targets: the prunable layers (names or :class:`~ptsparse.targets.Target`); they form the units.
            example: an input batch the model accepts.
            cost: ``"macs"`` or ``"latency"``.
            device: where latency is measured.
            batch_size: batch of the latency measurements.
            points: grid points per channel dimension of a latency table (the full count and 1 included).
            warmup, repeats: untimed and timed runs per latency measurement (the median counts).
            heads: attention projection name -> its heads (:func:`ptsparse.attention.heads_by_layer`): those
                layers form units of whole heads. ``None``: every unit's channels are single rows.

        Raises:
            ConfigError: ``cost`` is not ``macs`` or ``latency``.
            MissingExtraError: torch-pruning is not installed.
            ExportError: torch-pruning cannot trace the model.
        """
        Knapsack.Settings(cost=cost)
        names = {getattr(target, "name", target) for target in targets}
        layers = _trace_layers(model, example)
        order = {name: position for position, name in enumerate(layers)}
        graph = build_dependency_graph(model, example)
        modules = {module: name for name, module in model.named_modules()}
        found: list[tuple[ChannelGroup, ChannelGroup | None, list]] = []  # (unit, all producers, group items)
        covered: set[str] = set()
        heads = dict(heads or {})
        for group, channels in iter_groups(graph, model):
            members = {n: m for n, m in channels.members.items() if n in names and n not in covered}
            if not members:
                continue
            for unit in head_groups([replace(channels, members=members).tied_units()], heads):
                found.append((unit, channels, group.items))
                covered.update(unit.members)
        for n in sorted(names - covered):  # a target torch-pruning does not see stays a unit of its own
            rows = _out_channels(model.get_submodule(n))
            found.append((head_group(heads[n], [n], removable=False) if n in heads
                          else ChannelGroup(rows, {n: tuple(range(rows))}, removable=False),
                          None, []))

        def first_run(entry) -> int:
            return min(order.get(n, len(order)) for n in entry[0].members)

        found.sort(key=first_run)
        units, fixed = [], []
        for u, (unit, channels, items) in enumerate(found):
            members = dict(sorted(unit.members.items(), key=lambda item: order.get(item[0], len(order))))
            units.append(ChannelGroup(unit.size, members, unit.width))
            producers = members if channels is None else {n: m for n, m in channels.members.items()
                                                           if n in members or n not in heads}
            fixed.append(not unit.removable or any(n not in members for n in producers))
            for name in producers:
                if name in layers:
                    layers[name].out_unit, layers[name].out_per_channel = u, unit.width
            for item in items:
                name = modules.get(item.dep.target.module)
                if name in layers and graph.is_in_channel_pruning_fn(item.dep.handler):
                    layers[name].in_units.append((u, len(item.idxs) / unit.size))
        if cost == "latency":
            _latency_tables(list(layers.values()), torch.device(device), batch_size, points, warmup, repeats)
        return cls(units, fixed, list(layers.values()), cost)

    def cost(self, kept: Sequence[int]) -> float:
        """Total cost of the model's Conv/Linear layers when unit ``u`` keeps ``kept[u]`` channels."""
        key = tuple(int(k) for k in kept)
        if self._last is None or self._last[0] != key:
            removed = [size - k for size, k in zip(self.sizes, key)]
            self._last = key, sum(float(self._layer_cost(layer, removed)) for layer in self._layers)
        return self._last[1]

    @torch.no_grad()
    def kept_in(self, model: nn.Module) -> list[int]:
        """Channels each unit keeps in ``model`` (the traced model, pruned), as the channel export counts them: a
        unit channel goes when its rows are zero in every member, except in a ``fixed`` unit (layers outside the
        targets still produce it); every unit keeps at least one."""
        kept = []
        for unit, size, fixed in zip(self.units, self.sizes, self.fixed):
            alive = torch.zeros(size, dtype=torch.bool)
            for name in unit.members:
                rows = model.get_submodule(name).weight.flatten(1).ne(0).any(1).cpu()
                alive |= rows[unit.rows(name)].any(1)
            kept.append(size if fixed else max(int(alive.sum()), 1))
        return kept

    def narrowed(self, model: nn.Module, kept: Sequence[int], example: torch.Tensor) -> nn.Module:
        """A copy of ``model`` (the traced model) in which unit ``u`` keeps its first ``kept[u]`` channels and the
        others are removed (zeroed with their biases and BatchNorms, then taken out by the channel export): a
        model of the planned widths, to time."""
        from ..export.channels import remove_channels  # deferred: the export package loads the model zoo

        narrow = copy.deepcopy(model).eval()
        targets = [Target(name, narrow.get_submodule(name)) for unit in self.units for name in unit.members]
        masks = {}
        for unit, k in zip(self.units, kept):
            for name in unit.members:
                weight = narrow.get_submodule(name).weight
                keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
                keep[unit.rows(name)[k:].flatten().to(weight.device)] = False
                masks[name] = keep.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape)
        attach_masks(targets, masks)
        norms = following_norms(narrow, targets, example)
        for target in targets:
            attach_channel_masks(target, norms.get(target.name))
        bake(narrow)
        return remove_channels(narrow, example)[0]

    def curve(self, unit: int, kept: Sequence[int]) -> torch.Tensor:
        """Total cost (float64, length ``sizes[unit] + 1``) when ``unit`` keeps 0..n channels, the others ``kept``."""
        removed: list[Any] = [size - int(k) for size, k in zip(self.sizes, kept)]
        total = torch.full((self.sizes[unit] + 1,), self.cost(kept), dtype=torch.float64)
        current = [self._layer_cost(layer, removed) for layer in self._touching[unit]]
        removed[unit] = self.sizes[unit] - torch.arange(self.sizes[unit] + 1, dtype=torch.float64)
        for layer, before in zip(self._touching[unit], current):
            total += self._layer_cost(layer, removed) - before
        return total

    def _layer_cost(self, layer: _Layer, removed: Sequence[Any]) -> torch.Tensor:
        """One layer's cost when unit ``u`` has lost ``removed[u]`` channels (numbers or one tensor)."""
        out = layer.out_channels
        if layer.out_unit is not None:
            out = out - removed[layer.out_unit] * layer.out_per_channel
        inputs = layer.in_features - sum((removed[u] * per_channel for u, per_channel in layer.in_units), 0.0)
        out = torch.as_tensor(out, dtype=torch.float64)
        inputs = torch.as_tensor(inputs, dtype=torch.float64)
        macs = _macs(layer, out, inputs)
        if self.kind == "macs":
            return macs
        out_grid, in_grid, times = layer.table
        if layer.groups > 1:  # timed at full size only; scaled by the MACs it keeps
            full = _macs(layer, out_grid[-1], in_grid[-1])
            return layer.calls * times[-1, -1] * macs / full
        return layer.calls * _bilinear(out_grid, in_grid, times, out, inputs)


def mac_reduction(model: nn.Module, targets: Sequence, example: torch.Tensor,
                  heads: Mapping[str, AttentionHeads] | None = None) -> float | None:
    """Fraction of the model's Conv/Linear MACs that removing its zeroed channels saves (the ``channels`` export's
    ``mac_reduction``: a removed channel's row and the inputs of the next layers it fed), or ``None`` where
    torch-pruning cannot trace the coupling (or is not installed)."""
    try:
        costs = ChannelCosts.trace(model, targets, example, heads=heads)
    except (MissingExtraError, ExportError):
        return None
    return 1 - costs.cost(costs.kept_in(model)) / costs.dense_cost


def _macs(layer: _Layer, out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    weight = layer.module.weight
    per_output = weight.shape[1] if layer.depthwise else inputs / layer.groups
    return out * per_output * (weight[0, 0].numel() * layer.positions)


def _out_channels(module: nn.Module) -> int:
    return module.weight.shape[0]


def _trace_layers(model: nn.Module, example: torch.Tensor) -> dict[str, _Layer]:
    """Every Conv/Linear layer the model runs on one sample, in execution order, as ``count_macs`` counts them
    (:func:`~ptsparse.graph.cost.weight_applications`: a Linear applied through ``F.linear`` too, and an
    ``nn.MultiheadAttention``'s q/k/v as layers ``<attention>.in_proj.q`` ... on the meta device)."""
    layers: dict[str, _Layer] = {}
    for application in weight_applications(model, example):
        layer = layers.get(application.name)
        if layer is not None:  # a module called more than once
            layer.calls += 1
            layer.positions += application.positions
            continue
        module = application.layer
        if isinstance(module, CONV_TYPES):
            in_features, groups = module.in_channels, module.groups
        else:
            in_features, groups = module.in_features, 1
        layers[application.name] = _Layer(application.name, module, _out_channels(module), in_features, groups,
                                          application.positions, application.input_shape)
    return layers


def _grid(full: int, points: int) -> torch.Tensor:
    """0 (free by definition), then ``points`` counts from 1 to ``full``."""
    counts = torch.linspace(1, full, max(min(points, full), 1)).round().unique()
    return torch.cat([torch.zeros(1), counts]).double()


def _latency_tables(layers: Sequence[_Layer], device: torch.device, batch_size: int, points: int, warmup: int,
                    repeats: int) -> None:
    """Sets each layer's ``table``: milliseconds per batch of a standalone copy of it on a grid of (kept out, kept
    in) channels.

    A dimension no unit changes has its full count only; a grouped convolution is timed at full size only. Each
    distinct standalone layer is timed once; under many ranks they take those in turn and share the times
    (:func:`~ptsparse.distributed.computed_in_turns`), so every rank holds the same tables and makes the same
    allocation.
    """
    grids, standalone = [], {}
    for layer in layers:
        varies = layer.groups == 1
        out_grid = _grid(layer.out_channels, points) if varies and layer.out_unit is not None else \
            torch.tensor([float(layer.out_channels)], dtype=torch.float64)
        in_grid = _grid(layer.in_features, points) if varies and layer.in_units else \
            torch.tensor([float(layer.in_features)], dtype=torch.float64)
        keys = {}
        for i, out in enumerate(out_grid.tolist()):
            for j, inputs in enumerate(in_grid.tolist()):
                if out and inputs:
                    module, shape = _standalone(layer, int(out), int(inputs))
                    keys[i, j] = repr(module), shape
                    standalone.setdefault(keys[i, j], (layer, int(out), int(inputs)))  # rebuilt when timed
        grids.append((out_grid, in_grid, keys))
    distinct = list(standalone)
    measured = distributed.computed_in_turns(
        distinct, lambda key: (measure_latency(*_standalone(*standalone[key]), batch_size, device, warmup,
                                               repeats)["median_ms"],), 1)
    timings = {key: ms for key, (ms,) in zip(distinct, measured)}
    for layer, (out_grid, in_grid, keys) in zip(layers, grids):
        times = torch.zeros(len(out_grid), len(in_grid), dtype=torch.float64)
        for (i, j), key in keys.items():
            times[i, j] = timings[key]
        layer.table = out_grid, in_grid, times


def _standalone(layer: _Layer, out: int, inputs: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh layer like ``layer`` with ``out`` outputs and ``inputs`` inputs, and one sample's input shape."""
    module = layer.module
    if isinstance(module, CONV_TYPES):
        return (type(module)(inputs, out, module.kernel_size, module.stride, module.padding, module.dilation,
                             module.groups, module.bias is not None, module.padding_mode),
                (inputs, *layer.input_shape[1:]))
    return nn.Linear(inputs, out, module.bias is not None), (*layer.input_shape[:-1], inputs)


def _bilinear(xs: torch.Tensor, ys: torch.Tensor, table: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    """``table`` (on the grid ``xs`` by ``ys``) interpolated at ``(x, y)``; one-point axes are constant."""

    def locate(grid: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at = at.clamp(grid[0], grid[-1])
        if len(grid) == 1:
            zero = torch.zeros_like(at, dtype=torch.long)
            return zero, zero, torch.zeros_like(at)
        low = (torch.searchsorted(grid, at, right=True) - 1).clamp(0, len(grid) - 2)
        return low, low + 1, (at - grid[low]) / (grid[low + 1] - grid[low])

    x0, x1, tx = locate(xs, x)
    y0, y1, ty = locate(ys, y)
    return ((1 - tx) * (1 - ty) * table[x0, y0] + tx * (1 - ty) * table[x1, y0]
            + (1 - tx) * ty * table[x0, y1] + tx * ty * table[x1, y1])


def _corrected_capacity(points: Sequence[tuple[float, float]], budget: float) -> float:
    """The table cost whose measured latency should be ``budget``, from (table cost, measured) points of plans:
    on the line (measured = a + b * table) through the closest plans on either side of the budget once there are
    some, else through the last two, or in proportion to the only one."""
    above = [point for point in points if point[1] > budget]
    below = [point for point in points if point[1] <= budget]
    if above and below:
        pair = [max(below, key=lambda point: point[1]), min(above, key=lambda point: point[1])]
    else:
        pair = list(points[-2:])
    (table, measured), (other_table, other_measured) = pair[-1], pair[0]
    if len(pair) > 1 and table != other_table:
        slope = (measured - other_measured) / (table - other_table)
        if slope > 0:
            return table + (budget - measured) / slope
    return table * budget / measured


def solve_knapsack(values: Sequence[torch.Tensor], costs: KnapsackCosts, capacity: float, low: Sequence[int],
                   high: Sequence[int], start: Sequence[int] | None = None, buckets: int = 10_000,
                   steps: Sequence[int] | None = None) -> list[int]:
    """Channels to keep per unit: the most value whose true cost fits ``capacity`` (grouped 0/1 knapsack).

    Args:
        values: per unit, a 1-D tensor of length ``sizes[u] + 1``; ``values[u][k]`` is the value of keeping
            ``k`` channels (non-decreasing in ``k``, e.g. the cumulative sum of importances sorted descending).
        costs: the cost model (``cost(kept)`` and ``curve(u, kept)``, e.g. :class:`ChannelCosts`).
        capacity: the budget, in the cost model's units.
        low, high: per unit, the fewest and most channels it may keep.
        start: where the cost is first linearised (``high`` by default), e.g. the current counts.
        buckets: resolution of the dynamic programme's cost grid.
        steps: per unit, the channels it loses at a time (``channel_multiple``): it keeps ``high[u]`` less a
            whole number of steps, and ``low[u]`` rises to the first such count. ``None``: one channel.

    Returns:
        ``k`` per unit, ``low[u] <= k[u] <= high[u]``, with ``costs.cost(k) <= capacity``.

    Raises:
        ConfigError: even ``low`` costs more than ``capacity``.
    """
    high = [int(k) for k in high]
    steps = [1] * len(high) if steps is None else [int(step) for step in steps]
    low = [_whole_steps(int(lo), hi, step) for lo, hi, step in zip(low, high, steps)]
    minimum = costs.cost(low)
    if minimum > capacity:
        raise ConfigError(f"cost budget {capacity:.6g} is infeasible: the minimum reachable cost is {minimum:.6g}")
    values = [torch.as_tensor(v, dtype=torch.float64) for v in values]

    def worth(kept: Sequence[int]) -> float:
        return sum(float(v[k]) for v, k in zip(values, kept))

    kept = [_whole_steps(min(max(int(k), lo), hi), hi, step)
            for k, lo, hi, step in zip(start if start is not None else high, low, high, steps)]
    best: list[int] | None = None
    for _ in range(3):  # linearise at the start, then twice around the solution
        solution = _solve_linearised(values, costs, capacity, low, high, steps, kept, buckets)
        if solution is None:
            break
        feasible = _fill(values, costs, capacity, high, steps,
                         _drop_until_feasible(values, costs, capacity, low, steps, solution))
        if best is None or worth(feasible) > worth(best):
            best = feasible
        if solution == kept:
            break
        kept = solution
    if best is None:  # the linear model is no use here: greedy from the largest counts
        best = _fill(values, costs, capacity, high, steps,
                     _drop_until_feasible(values, costs, capacity, low, steps, high))
    return best


def _whole_steps(count: int, high: int, step: int) -> int:
    """The fewest channels at or above ``count`` that ``high`` less a whole number of ``step`` leaves."""
    return high - (high - count) // step * step


def _solve_linearised(values: Sequence[torch.Tensor], costs: KnapsackCosts, capacity: float, low: list[int],
                      high: list[int], steps: list[int], start: list[int], buckets: int) -> list[int] | None:
    """Exact solution of the knapsack with each unit's cost curve taken at ``start``; ``None`` if nothing fits."""
    base = costs.cost(start)
    allowed = [torch.arange(lo, hi + 1, step) for lo, hi, step in zip(low, high, steps)]  # the counts a unit may keep
    curves = [costs.curve(u, start) for u in range(len(start))]
    deltas = [curve[counts] - curve[s] for curve, counts, s in zip(curves, allowed, start)]
    room = capacity - base - sum(float(d.min()) for d in deltas)
    if not math.isfinite(room) or room <= 0:
        return None
    # Rounding costs up keeps every solution of the grid within the linear budget.
    weights = [torch.ceil((d - d.min()) * (buckets / room) - 1e-9).clamp(min=0).long() for d in deltas]
    best = torch.zeros(buckets + 1, dtype=torch.float64)  # best value within each bucket count, units so far
    choices = []
    for weight, value, counts in zip(weights, values, allowed):
        new = torch.full_like(best, -math.inf)
        choice = torch.zeros(buckets + 1, dtype=torch.long)
        for index, (w, gain) in enumerate(zip(weight.tolist(), value[counts].tolist())):
            if w <= buckets:  # every bucket count at once: this choice on top of the best with w fewer buckets
                candidate = best[:buckets + 1 - w] + gain
                better = candidate > new[w:]
                new[w:] = torch.where(better, candidate, new[w:])
                choice[w:] = torch.where(better, index, choice[w:])
        best = new
        choices.append(choice)
    kept, bucket = [], buckets
    for choice, weight, counts in zip(reversed(choices), reversed(weights), reversed(allowed)):
        index = int(choice[bucket])
        kept.append(int(counts[index]))
        bucket -= int(weight[index])
    return kept[::-1]


def _drop_until_feasible(values: Sequence[torch.Tensor], costs: KnapsackCosts, capacity: float, low: list[int],
                         steps: list[int], kept: list[int]) -> list[int]:
    """Drops one step at a time, the least value lost per true cost saved first, until the cost fits."""
    kept = list(kept)
    total = costs.cost(kept)
    while total > capacity:
        options = []
        for u, (k, lo, step) in enumerate(zip(kept, low, steps)):
            if k - step >= lo:
                saved = total - float(costs.curve(u, kept)[k - step])
                loss = float(values[u][k] - values[u][k - step])
                # A drop that saves nothing (a latency table's staircase) goes last, the cheapest loss first.
                options.append((saved <= 0, loss / saved if saved > 0 else loss, u))
        if not options:
            raise ConfigError(f"cost budget {capacity:.6g} is infeasible: the minimum reachable cost is {total:.6g}")
        u = min(options)[2]
        kept[u] -= steps[u]
        total = costs.cost(kept)
    return kept


def _fill(values: Sequence[torch.Tensor], costs: KnapsackCosts, capacity: float, high: list[int], steps: list[int],
          kept: list[int]) -> list[int]:
    """Adds one step at a time while one fits, the most value per true cost added first."""
    kept = list(kept)
    while True:
        total = costs.cost(kept)
        options = []
        for u, (k, hi, step) in enumerate(zip(kept, high, steps)):
            if k + step <= hi:
                added = float(costs.curve(u, kept)[k + step]) - total
                if total + added <= capacity:
                    gain = float(values[u][k + step] - values[u][k])
                    options.append((added > 0, -gain / added if added > 0 else -gain, u))
        if not options:
            return kept
        u = min(options)[2]
        kept[u] += steps[u]


def unit_minimums(costs: ChannelCosts, budgets: Mapping[str, LayerBudget]) -> list[int]:
    """Fewest channels each unit may keep: all of a ``fixed`` unit or of one holding a layer capped at 0 (the
    output layer, for the channel pattern), else what its members' caps allow; at least one."""
    low = []
    for unit, size, fixed in zip(costs.units, costs.sizes, costs.fixed):
        members = [budgets[name] for name in unit.members if name in budgets]
        removable = 0 if fixed else min((b.max_prune // unit.channel_weights(b.shape) for b in members), default=size)
        low.append(max(size - removable, 1))
    return low


def unit_steps(costs: ChannelCosts, budgets: Mapping[str, LayerBudget]) -> list[int]:
    """Channels each unit loses at a time: its members' step (``channel_multiple`` rows where every member's width
    is a multiple of it: :meth:`~ptsparse.patterns.Channel.unit_size`), in unit channels (a head, a tie)."""
    steps = []
    for unit in costs.units:
        rows = min((budgets[name].unit // (budgets[name].numel // budgets[name].shape[0])
                    for name in unit.members if name in budgets), default=1)
        steps.append(max(rows // math.gcd(rows, unit.width), 1))
    return steps


@ALLOCATIONS.register("knapsack")
class Knapsack(Allocation):
    """Channel counts per coupled unit that keep the most importance within a MACs or latency budget.

    ``sparsity`` is the fraction of the dense cost removed. A unit holding a layer capped at 0 (the output
    layer, for the channel pattern) or produced by layers outside the targets stays whole; other caps bound
    how many channels a unit may lose; every unit keeps at least one channel.

    Args:
        cost: ``"macs"`` or ``"latency"`` (measured on the context's device, at ``latency_batch``).
        latency_batch: the batch of the latency table's timings (``cost="latency"``): the batch the pruned model
            will serve, which need not be the calibration batch; ``None``: the run's batch size
            (``context.batch_size``). Layer times do not grow in proportion to the batch (a batch of 1 leaves
            cores idle that a batch of 64 keeps busy), so the table, and the channels it keeps, depend on it.

    Attributes:
        costs: the :class:`ChannelCosts` of the last :meth:`allocate`.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="knapsack"):
        cost: str = option("macs", "what the channel budget counts: macs (of every Conv/Linear layer) or latency "
                           "(a per-layer table measured on --device); sparsity is then the fraction of it removed",
                           choices=COSTS)
        latency_batch: int | None = option(None, "batch of the latency table's timings (knapsack_cost latency): "
                                           "the batch the pruned model will run at; default: the run's --batch-size",
                                           kind=int, minimum=1)
        latency_rounds: int = option(5, "knapsack_cost latency: times the planned model end to end (channels "
                                     "removed) and re-solves with the budget corrected by the measured miss, at most "
                                     "this many times, until the latency removed is within 0.02 of the target; 0: "
                                     "trust the per-layer table", kind=int, minimum=0)

    patterns = ("channel",)
    needs_scores = True
    needs_context = True
    offloadable = False  # traces the whole model on the device
    exact = True  # ratios are whole channel counts that meet the cost budget; no weight-count rounding

    def __init__(self, cost: str = "macs", latency_batch: int | None = None, latency_rounds: int = 5) -> None:
        settings = self.Settings(cost=cost, latency_batch=latency_batch, latency_rounds=latency_rounds)
        self.cost, self.latency_batch, self.latency_rounds = settings.cost, settings.latency_batch, \
            settings.latency_rounds
        self.costs: ChannelCosts | None = None
        self.report: dict[str, Any] = {}

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        if scores is None or context is None:
            raise ConfigError("allocation 'knapsack' needs the criterion's scores and the model with calibration data")
        model = context.model
        example = context.calibration.inputs[:2].to(next(model.parameters()).device)
        budgets = {layer.name: layer for layer in layers}
        heads = heads_by_layer(find_attention(model, list(budgets)))
        batch = self.latency_batch or context.batch_size
        costs = ChannelCosts.trace(model, list(budgets), example, self.cost, context.device, batch, heads=heads)
        self.costs = costs
        values = []
        for unit in costs.units:
            importance = sum(scores[name].flatten(1).float().mean(1).cpu()[unit.rows(name)].sum(1).double()
                             for name in unit.members) / len(unit.members)
            ranked = importance.clamp(min=0).sort(descending=True).values
            values.append(torch.cat([torch.zeros(1, dtype=torch.float64), ranked.cumsum(0)]))
        low, steps = unit_minimums(costs, budgets), unit_steps(costs, budgets)

        def solve(capacity: float) -> list[int]:
            return solve_knapsack(values, costs, capacity, low, costs.sizes, steps=steps)

        capacity = (1.0 - sparsity) * costs.dense_cost
        try:
            kept = solve(capacity)
        except ConfigError as error:
            fewest = [_whole_steps(lo, size, step) for size, lo, step in zip(costs.sizes, low, steps)]
            most = 1 - costs.cost(fewest) / costs.dense_cost
            raise ConfigError(f"knapsack sparsity {sparsity} ({self.cost}): {error}; at most {most:.4f} of the "
                              f"{self.cost} can be removed") from None
        measured = None
        if self.cost == "latency" and self.latency_rounds:
            kept, measured = self._meet_measured_latency(model, costs, solve, capacity, kept, example, batch,
                                                         context.device)
        ratios = {name: 0.0 for name in budgets}
        for unit, size, k in zip(costs.units, costs.sizes, kept):
            for name in unit.members:
                ratios[name] = (size - k) * unit.channel_weights(budgets[name].shape) / budgets[name].numel
        cost_after = costs.cost(kept)
        self.report = {"cost": self.cost, "dense_cost": costs.dense_cost, "cost_after": cost_after,
                       "reduction": 1 - cost_after / costs.dense_cost,
                       "kept": {next(iter(unit.members)): k for unit, k in zip(costs.units, kept)}}
        if self.cost == "latency":
            self.report["latency_batch"] = batch  # dense_cost and cost_after are milliseconds per batch of it
        if measured is not None:
            self.report["measured"] = measured
        return ratios

    def _meet_measured_latency(self, model: nn.Module, costs: ChannelCosts, solve: Callable[[float], list[int]],
                               capacity: float, kept: list[int], example: torch.Tensor, batch: int,
                               device: torch.device | str) -> tuple[list[int], dict[str, Any]]:
        """Corrects the table's budget by end-to-end timings of the planned model.

        A sum of standalone layer times leaves out normalisation, activations, pooling and additions and the
        layers' effects on each other's caches, so the latency a plan removes can differ from the table's estimate
        by a tenth of the model's. Each round times the model with the planned widths (channels removed) against
        the dense one, stops when the latency removed is within 2% of the target, else moves the table's
        capacity to where the timings point (:func:`_corrected_capacity`: in proportion to the first; then on the
        line through two plans' table costs and timings, the closest on either side of the budget once the plans
        bracket it) and solves again. The plan kept is the round closest to the budget among
        those within 5% of it (the fastest when none is). Rank 0 times; every rank gets its times.
        """
        shape = tuple(example.shape[1:])

        def time_plan(plan: Sequence[int]) -> float:
            def median_ms(widths: Sequence[int]) -> tuple[float]:
                narrow = costs.narrowed(model, widths, example)
                return (measure_latency(narrow, shape, batch, device, 3, 7)["median_ms"],)

            return distributed.computed_in_turns([plan], median_ms, 1)[0][0]

        scale = capacity / costs.dense_cost  # the fraction of the latency to keep
        dense = time_plan(costs.sizes)
        budget = scale * dense
        rounds: list[tuple[list[int], float]] = []
        for round_ in range(self.latency_rounds):
            rounds.append((kept, time_plan(kept)))
            if abs(rounds[-1][1] - budget) <= 0.02 * dense or round_ == self.latency_rounds - 1:
                break
            capacity = _corrected_capacity([(costs.cost(plan), ms) for plan, ms in rounds], budget)
            try:
                kept = solve(capacity)
            except ConfigError:
                break  # the corrected budget is below what the table can reach: keep the rounds so far
        meeting = [plan for plan in rounds if plan[1] <= 1.05 * budget]
        kept, after = max(meeting, key=lambda plan: plan[1]) if meeting else min(rounds, key=lambda plan: plan[1])
        return kept, {"dense_ms": dense, "after_ms": after, "reduction": 1 - after / dense,
                      "rounds_ms": [ms for _, ms in rounds]}

    def summary(self) -> dict[str, Any]:
        return dict(self.report)
