"""OWL: outlier-weighed layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024).

Per group of layers (a block, the paper's decoder layer, by default; or each layer), the outlier ratio ``D_g`` is
the fraction of the group's weights whose Wanda score ``|W_ij| * ||X_j||_2`` exceeds ``M`` times the mean score
over the group (``outlier_threshold``, M = 5). Groups with more outliers are pruned less, within ``lambda``
(``max_deviation``, 0.08) of the target ``S``.

Our reading. The paper states ``S_l = 1 - D_l``, constrained to ``[S - lambda, S + lambda]`` with mean ``S``; its
released code rescales ``D`` linearly to a range of width ``2 lambda`` and subtracts the (unweighted) mean, which
leaves the band on one side whenever the mean ``D`` is off the middle of the range. Here the mapping is linear in
``D``, keeps the mean, and stays in the band::

    s_l = S - lambda * (D_l - mean(D)) / max_k |D_k - mean(D)|        (S when every D is equal)

with ``mean`` weighted by the layers' weight counts, so the weights pruned are ``S`` times the counted weights and
the layer farthest from the mean sits on the band's edge. Where ``mean(D)`` is mid-range this is the code's
allocation. Caps: each ``s_l`` is clipped to ``[max(S - lambda, 0), min(S + lambda, cap_l)]`` and a common shift,
found by bisection, restores the total; where the caps do not let the band reach it, layers go past ``S + lambda``
up to their caps (water-filling, as ``uniform`` does), and the summary says so (``within_band``). ``lambda = 0`` is
``uniform``. A layer keeps at least one weight unless its cap forces more.
:func:`~ptsparse.allocation.exact_counts` then rounds to whole weights (channels) meeting the target exactly, as
for every allocation.

The scores only decide the allocation: any criterion then prunes. The input norms come from one pass of the
calibration set through the dense model (:func:`~ptsparse.criteria.statistics.gather_statistics_all`, summed over
the ranks of a data-parallel run); with ``offload`` the pass goes block by block on cached block inputs
(:func:`~ptsparse.criteria.statistics.gather_statistics_by_block`), as Wanda and SparseGPT prune, so only one block
is on the device at a time: the same norms. Squared norms are averaged per input vector, so layers of one block that see
different numbers of input vectors (convolutions at different resolutions) share one scale; in a decoder layer
every projection sees every token, which is the paper's scale up to a constant. Layers outside every block (a
stem, a classifier) are groups of their own; a model without blocks gets one group per layer.

Patterns: unstructured and channel (the ratios are rounded to channels, as for ``uniform``). N:M fixes every
layer's sparsity, so there is nothing to allocate: refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..blocks import find_blocks
from ..criteria.statistics import gather_statistics_all, gather_statistics_by_block
from ..criteria.wanda import wanda_scores
from ..errors import ConfigError
from ..options import Options, option
from ..targets import Target
from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget

GROUPS = ("block", "layer")


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Fraction of the entries of ``scores``, taken together, above ``threshold`` times their mean."""
    total = sum(score.numel() for score in scores)
    mean = sum(float(score.double().sum()) for score in scores) / total
    return sum(int((score > threshold * mean).sum()) for score in scores) / total


def owl_sparsities(outliers: Mapping[str, float], layers: Sequence[LayerBudget], sparsity: float,
                   max_deviation: float) -> tuple[dict[str, float], bool]:
    """Per-layer sparsities from the layers' outlier ratios (see the module docstring for the mapping).

    Args:
        outliers: each layer's outlier ratio (its group's).
        layers: the layers and their caps.
        sparsity: the global target ``S``, met before rounding.
        max_deviation: ``lambda``.

    Returns:
        ``{layer name: sparsity}``, and whether every layer stayed within ``[S - lambda, S + lambda]`` (or under it
        at its cap); ``False`` when caps forced others past ``S + lambda``.
    """
    total = sum(layer.numel for layer in layers)
    mean = sum(layer.numel * outliers[layer.name] for layer in layers) / total
    farthest = max(abs(outliers[layer.name] - mean) for layer in layers)
    offset = {l.name: -max_deviation * (outliers[l.name] - mean) / farthest if farthest > 0 else 0.0 for l in layers}
    wanted = sparsity * total
    floor = max(sparsity - max_deviation, 0.0)

    def band(layer: LayerBudget) -> float:
        return min(sparsity + max_deviation, layer.cap, (layer.numel - 1) / layer.numel)

    def cap(layer: LayerBudget) -> float:
        return layer.cap

    def levels(shift: float, ceiling) -> dict[str, float]:
        return {l.name: min(max(sparsity + offset[l.name] + shift, floor), ceiling(l)) for l in layers}

    def pruned(shift: float, ceiling) -> float:
        return sum(l.numel * s for l, s in zip(layers, levels(shift, ceiling).values()))

    # The shift is 0 unless a floor or ceiling clips. Offsets lie in [-lambda, lambda], lambda <= 1: a shift of +-2
    # reaches every floor and ceiling. The tolerance absorbs float error in the sums (lambda 0 fills the band exactly).
    within = pruned(2.0, band) >= wanted * (1 - 1e-12)
    ceiling = band if within else cap
    below, above = -2.0, 2.0
    for _ in range(100):
        shift = (below + above) / 2
        below, above = (shift, above) if pruned(shift, ceiling) < wanted else (below, shift)
    return levels(above, ceiling), within


@ALLOCATIONS.register("owl")
class OWL(Allocation):
    """OWL: groups with more Wanda-score outliers are pruned less, within lambda of the target.

    Args:
        outlier_threshold: ``M``: a weight is an outlier when its score exceeds ``M`` times its group's mean.
        max_deviation: ``lambda``: the largest difference between a layer's sparsity and the target.
        group: ``"block"`` (one outlier ratio per block, the paper's decoder layer) or ``"layer"``.
        blocks: name globs of the blocks (the run's ``blocks``); empty: found automatically.

    Example (a config file)::

        allocation: owl
        criterion: sparsegpt
        owl: {outlier_threshold: 5, max_deviation: 0.08, group: block}
    """

    @dataclass(frozen=True)
    class Settings(Options, part="owl"):
        outlier_threshold: float = option(5.0, "M: a weight is an outlier when its Wanda score exceeds M times the "
                                          "mean score of its group", minimum=1)
        max_deviation: float = option(0.08, "lambda: layer sparsities stay within target +- lambda (0 gives "
                                      "uniform)", minimum=0, maximum=1)
        group: str = option("block", "what one outlier ratio covers: block (the paper's decoder layer; layers "
                            "outside blocks on their own) or layer", choices=GROUPS)

    patterns = ("unstructured", "channel")
    needs_context = True

    def __init__(self, outlier_threshold: float = 5.0, max_deviation: float = 0.08, group: str = "block",
                 blocks: Sequence[str] = ()) -> None:
        settings = self.Settings(outlier_threshold=outlier_threshold, max_deviation=max_deviation, group=group)
        self.outlier_threshold, self.max_deviation, self.group = (
            settings.outlier_threshold, settings.max_deviation, settings.group)
        self.blocks = tuple(blocks)
        self.report: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config) -> OWL:
        return cls(**config.settings_of(cls).to_dict(), blocks=config.blocks)

    def groups(self, context: AllocationContext) -> dict[str, str]:
        """Each target's group: its block's name (``group="block"``) or its own name."""
        names = [t.name for t in context.targets]
        if self.group == "layer":
            return {name: name for name in names}
        try:
            blocks = find_blocks(context.model, context.targets, self.blocks)
        except ConfigError:
            if self.blocks:  # the user's globs match nothing: say so
                raise
            blocks = []
        return {name: next((b for b in blocks if name.startswith(b + ".")), name) for name in names}

    def outlier_ratios(self, context: AllocationContext, groups: Mapping[str, str]) -> dict[str, float]:
        """Each group's outlier ratio (``groups``: each target's group), measured on the dense model."""
        gather = gather_statistics_all if context.offload is None else \
            partial(gather_statistics_by_block, offload=context.offload)
        stats = gather(context.model, context.targets, context.calibration, ("input_norms",), context.batch_size,
                       context.device)
        members: dict[str, list[Target]] = {}
        for target in context.targets:
            members.setdefault(groups[target.name], []).append(target)

        def score(target: Target) -> torch.Tensor:
            layer = stats[target.name]
            return wanda_scores(target.weight, layer["input_sq_norms"] / layer["input_count"].clamp(min=1))

        return {group: outlier_ratio([score(t) for t in targets], self.outlier_threshold)
                for group, targets in members.items()}

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        if context is None:
            raise ConfigError("allocation 'owl' needs the model and calibration data (an AllocationContext)")
        groups = self.groups(context)
        ratios = self.outlier_ratios(context, groups)
        per_layer = {layer.name: ratios[groups[layer.name]] for layer in layers}
        sparsities, within = owl_sparsities(per_layer, layers, sparsity, self.max_deviation)
        self.report = {
            "group": self.group, "outlier_threshold": self.outlier_threshold, "max_deviation": self.max_deviation,
            "within_band": within,
            "layers": {name: {"group": groups[name], "outlier_ratio": per_layer[name], "sparsity": s}
                       for name, s in sparsities.items()},
        }
        return sparsities

    def summary(self) -> dict[str, Any]:
        return dict(self.report)
