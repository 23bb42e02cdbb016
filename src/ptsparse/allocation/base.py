"""The allocation axis: how sparse each layer is, so that the global target is met exactly.

Contract: an allocation maps the layers, the global target and (for data- or score-driven allocations)
the criterion's scores or an :class:`AllocationContext` (the dense model and calibration data, for
allocations that evaluate candidates) to a sparsity per layer, honouring each layer's cap.
:func:`exact_counts` then turns those ratios into integer prune counts whose sum is exactly
``round(target * total)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..data import Calibration
from ..errors import ConfigError
from ..offload import Offload
from ..options import Part
from ..targets import Target


@dataclass(frozen=True)
class LayerBudget:
    """What an allocation knows of one layer.

    Attributes:
        name: qualified module name.
        shape: weight shape (``(out, in / groups, *kernel)`` for convolutions).
        cap: the largest sparsity this layer may get (0 keeps it dense).
        unit: weights pruned together (1, or a whole output channel for the channel pattern, or a whole
            attention head's rows for an attention projection under it).
        attention: the attention module whose whole heads this layer prunes (a q/k/v projection under the
            channel pattern, :mod:`ptsparse.attention`); the layers of one module get the same head count.
            ``None`` for other layers.
        coupled: the coupled channels this layer prunes together with other layers (the channel pattern's units,
            :meth:`~ptsparse.coupled.CoupledUnits.budgets`); the layers with one key prune the same number of
            ``unit`` steps. ``None`` for a layer pruned on its own.
    """

    name: str
    shape: tuple[int, ...]
    cap: float = 1.0
    unit: int = 1
    attention: str | None = None
    coupled: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def max_prune(self) -> int:
        """Most weights this layer may lose: whole units within its cap."""
        return int(self.cap * self.numel + 1e-9) // self.unit * self.unit


@dataclass(frozen=True)
class AllocationContext:
    """What an allocation that evaluates candidates may use (``needs_context``); it must not modify ``model``.

    Attributes:
        model: the dense model (no masks attached yet).
        targets: its prunable layers.
        calibration: the calibration data.
        batch_size: the run's batch size.
        device: where the model runs.
        stage_report: the report of the run the allocation's ``stage`` names, when it has one.
        offload: the model is in CPU memory and runs on ``device`` one block at a time (:mod:`ptsparse.offload`);
            ``None``: it is on ``device``.
    """

    model: nn.Module
    targets: Sequence[Target]
    calibration: Calibration
    batch_size: int = 64
    device: str | torch.device = "cpu"
    stage_report: Mapping[str, Any] | None = None
    offload: Offload | None = None


class Allocation(Part, abc.ABC):
    """Returns ``{layer name: sparsity}`` meeting ``sparsity`` over the layers, each within its cap.

    A subclass declares its options as ``Settings`` (:mod:`ptsparse.options`) and what it can do:

    * ``patterns``: the pattern kinds it supports (``None``: all);
    * ``needs_scores``: it ranks the criterion's scores (only then are they computed);
    * ``needs_context``: it evaluates candidates on the model and calibration data;
    * ``exact``: its target is not a weight count: its ratios are whole prune counts (``ratio * numel`` a
      multiple of the layer's unit) that meet a target of its own, used as they are, with the weight
      sparsity they give as the run's target (``knapsack``, whose ``sparsity`` is a fraction of the MACs);
    * ``chooses_units``: it picks single channels itself, so channels cannot be pruned N at a time;
    * ``stage``: the method whose whole run must come first; its report reaches :meth:`allocate` as
      ``context.stage_report`` (``fcpts``: the sparsities an FCPTS run learns);
    * ``offloadable``: it works with ``offload`` (the model in CPU memory, run one block at a time, forward
      passes only: :mod:`ptsparse.offload`).

    :meth:`summary` is what the report records of the allocation (``None``: nothing).
    """

    patterns: ClassVar[tuple[str, ...] | None] = None
    needs_scores: ClassVar[bool] = False
    needs_context: ClassVar[bool] = False
    exact: ClassVar[bool] = False
    chooses_units: ClassVar[bool] = False
    stage: ClassVar[str | None] = None
    offloadable: ClassVar[bool] = True

    @abc.abstractmethod
    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]: ...

    def summary(self) -> dict[str, Any] | None:
        return None


ALLOCATIONS: Registry[type] = Registry("allocation")


@dataclass(frozen=True)
class _Block:
    """Layers whose counts move together: one layer, the projections of one attention module (a head each), or the
    members of one coupled unit (a step each)."""

    layers: tuple[LayerBudget, ...]

    @property
    def name(self) -> str:
        return self.layers[0].name

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def unit(self) -> int:
        return sum(layer.unit for layer in self.layers)

    @property
    def max_prune(self) -> int:
        return min(layer.max_prune // layer.unit for layer in self.layers) * self.unit

    @property
    def together(self) -> bool:
        """Whole heads or coupled channels: steps too large to round with the single channels of other layers."""
        return self.layers[0].attention is not None or self.layers[0].coupled is not None


def _blocks(layers: Sequence[LayerBudget]) -> list[_Block]:
    grouped: dict[tuple[str, str], list[LayerBudget]] = {}
    for layer in layers:
        key = ("coupled", layer.coupled) if layer.coupled is not None else \
            ("attention", layer.attention) if layer.attention is not None else ("layer", layer.name)
        grouped.setdefault(key, []).append(layer)
    return [_Block(tuple(members)) for members in grouped.values()]


def target_count(layers: Sequence[LayerBudget], sparsity: float) -> int:
    """Weights to prune in all: ``round(sparsity * total)``.

    Raises:
        ConfigError: the caps do not leave room for that many.
    """
    total = sum(layer.numel for layer in layers)
    wanted = round(sparsity * total)
    room = sum(block.max_prune for block in _blocks(layers))
    if wanted > room:
        raise ConfigError(
            f"sparsity {sparsity} is infeasible: the layer caps allow at most {room / total:.6f} "
            f"({room} of {total} weights)"
        )
    return wanted


def exact_counts(layers: Sequence[LayerBudget], ratios: Mapping[str, float], wanted: int) -> dict[str, int]:
    """Integer prune counts near ``ratio * numel`` per layer that sum to ``wanted``.

    Each layer starts from its ideal count rounded down to whole units; the weights still to place go
    one unit at a time to the layers with the largest rounding remainders (largest-remainder method),
    each rounding up at most once and never past its cap. With units of one weight the total is exact
    and every layer is within one weight of its ideal. With channel units every layer is within one
    channel of its ideal and the total falls short by less than one channel.

    Attention heads (layers with an ``attention`` module) and coupled channels (layers with a ``coupled`` unit)
    are steps too large to round this way (one head can be thousands of weights), so they are placed first: the
    layers of one module or unit as one block (its ideal the sum of theirs, one step of each per block step)
    rounded to the nearest whole step within the caps and what is wanted. The other layers then share what is
    left, their ideals scaled in proportion, and are rounded as above; the total again falls short by less than
    one of their channels. What they cannot take (their caps, or ideals of zero: ERK can leave every other layer
    dense) goes to the blocks that rounded down, one step each by largest remainder, so the total falls short by
    less than one step. Without such other layers the blocks are rounded as above (largest remainder).
    """
    blocks = _blocks(layers)
    ideal = {b.name: sum(min(max(ratios[l.name], 0.0), 1.0) * l.numel for l in b.layers) for b in blocks}
    together = [b for b in blocks if b.together]
    rest = [b for b in blocks if not b.together]
    if not together or not rest:
        return _per_layer(blocks, _placed(blocks, ideal, wanted))
    counts = {b.name: min(round(ideal[b.name] / b.unit) * b.unit, b.max_prune) for b in together}
    while sum(counts.values()) > wanted:  # rounding up overshot: take back where it overshot most
        block = max((b for b in together if counts[b.name] > 0), key=lambda b: counts[b.name] - ideal[b.name])
        counts[block.name] -= block.unit
    left = wanted - sum(counts.values())
    share = sum(ideal[b.name] for b in rest)
    scale = left / share if share > 0 else 0.0
    counts.update(_placed(rest, {b.name: ideal[b.name] * scale for b in rest}, left))
    # What the other layers could not take (their caps, or ideals of zero) goes back to the blocks that rounded down
    _fill(together, ideal, counts, wanted, lambda b: _rounded_up(ideal[b.name], b.unit))
    return _per_layer(blocks, counts)


def _per_layer(blocks: Sequence[_Block], counts: Mapping[str, int]) -> dict[str, int]:
    """Each block's count as its layers' counts (a block of projections: the same heads in each; of a coupled
    unit: the same steps)."""
    return {layer.name: counts[block.name] // block.unit * layer.unit for block in blocks for layer in block.layers}


def _placed(blocks: Sequence[_Block], ideal: Mapping[str, float], wanted: int) -> dict[str, int]:
    """Largest-remainder rounding of ``ideal`` weights per block to whole units (see :func:`exact_counts`)."""
    counts = {b.name: min(int(ideal[b.name] + 1e-9) // b.unit * b.unit, b.max_prune) for b in blocks}
    by_name = {b.name: b for b in blocks}
    placed = sum(counts.values())
    while placed > wanted:  # float error can overshoot by a unit: take back where the remainder is smallest
        name = min((n for n in counts if counts[n] > 0), key=lambda n: ideal[n] - counts[n])
        counts[name] -= by_name[name].unit
        placed -= by_name[name].unit
    _fill(blocks, ideal, counts, wanted, lambda b: _rounded_up(ideal[b.name], b.unit))
    # Caps can leave a gap of single weights (an ideal just under its cap rounds up past it): fill it from
    # any allocated layer of single-weight units. Channels never move past their rounding.
    _fill(blocks, ideal, counts, wanted, lambda b: b.numel if ideal[b.name] > 0 and b.unit == 1 else 0)
    return counts


def _rounded_up(ideal: float, unit: int) -> int:
    return math.ceil(ideal / unit - 1e-9) * unit


def _fill(blocks: Sequence[_Block], ideal: Mapping[str, float], counts: dict[str, int], wanted: int,
          limit: Callable[[_Block], int]) -> None:
    """Adds one unit at a time to the block of ``blocks`` furthest below its ideal (in units) while the total of
    ``counts`` is short of ``wanted`` by at least that unit, never past a block's cap or ``limit``."""
    placed = sum(counts.values())
    while placed < wanted:
        room = [b for b in blocks
                if counts[b.name] + b.unit <= min(b.max_prune, limit(b)) and b.unit <= wanted - placed]
        if not room:
            return
        block = max(room, key=lambda b: (ideal[b.name] - counts[b.name]) / b.unit)
        counts[block.name] += block.unit
        placed += block.unit
