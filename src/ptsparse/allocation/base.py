"""The allocation axis: how sparse each layer is, so that the global target is met exactly.

Contract: an allocation maps the layers, the global target and (for data- or score-driven allocations)
the criterion's scores or an :class:`AllocationContext` (the dense model and calibration data, for
allocations that evaluate candidates) to a sparsity per layer, honouring each layer's cap.
:func:`exact_counts` then turns those ratios into integer prune counts whose sum is exactly
``round(target * total)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .._registry import Registry
from ..data import Calibration
from ..errors import ConfigError
from ..targets import Target


@dataclass(frozen=True)
class LayerBudget:
    """What an allocation knows of one layer.

    Attributes:
        name: qualified module name.
        shape: weight shape (``(out, in / groups, *kernel)`` for convolutions).
        cap: the largest sparsity this layer may get (0 keeps it dense).
        unit: weights pruned together (1, or a whole output channel for the channel pattern).
    """

    name: str
    shape: tuple[int, ...]
    cap: float = 1.0
    unit: int = 1

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
    """

    model: nn.Module
    targets: Sequence[Target]
    calibration: Calibration
    batch_size: int = 64
    device: str | torch.device = "cpu"


class Allocation(Protocol):
    """Returns ``{layer name: sparsity}`` meeting ``sparsity`` over the layers, each within its cap.

    ``from_config`` builds the allocation with its settings taken from a :class:`SparsityConfig`;
    ``needs_scores`` says whether it ranks the criterion's scores (only then are they computed), and
    ``needs_context`` whether it evaluates candidates on the model and calibration data.
    An allocation whose target is not a weight count sets ``exact = True``: its ratios are then whole
    prune counts (``ratio * numel`` a multiple of the layer's unit) that meet a target of its own, and
    :func:`~ptsparse.sparsify.plan_counts` uses them as they are, with the weight sparsity they give as the
    run's target (``knapsack``, whose ``sparsity`` is a fraction of the MACs or latency).
    """

    needs_scores: bool
    needs_context: bool

    @classmethod
    def from_config(cls, config) -> Allocation: ...

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]: ...


ALLOCATIONS: Registry[type] = Registry("allocation")


def target_count(layers: Sequence[LayerBudget], sparsity: float) -> int:
    """Weights to prune in all: ``round(sparsity * total)``.

    Raises:
        ConfigError: the caps do not leave room for that many.
    """
    total = sum(layer.numel for layer in layers)
    wanted = round(sparsity * total)
    room = sum(layer.max_prune for layer in layers)
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
    """
    ideal = {l.name: min(max(ratios[l.name], 0.0), 1.0) * l.numel for l in layers}
    counts = {l.name: min(int(ideal[l.name] + 1e-9) // l.unit * l.unit, l.max_prune) for l in layers}
    by_name = {l.name: l for l in layers}
    placed = sum(counts.values())
    while placed > wanted:  # float error can overshoot by a unit: take back where the remainder is smallest
        name = min((n for n in counts if counts[n] > 0), key=lambda n: ideal[n] - counts[n])
        counts[name] -= by_name[name].unit
        placed -= by_name[name].unit

    def fill(limit) -> None:
        nonlocal placed
        while placed < wanted:
            room = [n for n, l in by_name.items()
                    if counts[n] + l.unit <= min(l.max_prune, limit(n)) and l.unit <= wanted - placed]
            if not room:
                return
            name = max(room, key=lambda n: (ideal[n] - counts[n]) / by_name[n].unit)
            counts[name] += by_name[name].unit
            placed += by_name[name].unit

    fill(lambda n: math.ceil(ideal[n] / by_name[n].unit - 1e-9) * by_name[n].unit)  # round up once
    # Caps can leave a gap of single weights (an ideal just under its cap rounds up past it): fill it from
    # any allocated layer of single-weight units. Channels never move past their rounding.
    fill(lambda n: by_name[n].numel if ideal[n] > 0 and by_name[n].unit == 1 else 0)
    return counts
