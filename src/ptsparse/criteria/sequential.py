"""Layer-by-layer pruning: the one driver every criterion's masks go through.

Data-free criteria prune every layer independently. A criterion that needs input statistics prunes
the layers in execution order: for each layer, one pass over the calibration set through the model
(whose earlier layers are already masked) gathers that layer's statistics by a forward hook, the
criterion chooses the mask (and may update the weights), and the mask is attached before the next
layer, so later layers see the pruned model's activations (``baselines.md`` §13.2, sequential).
Our reading for BatchNorm networks: during these passes BatchNorm normalises with batch statistics,
since the dense model's running statistics no longer fit the pruned layers before them (with them,
Wanda at 70% on the reference model fell to 29% accuracy, against 87% for magnitude).
A data-driven criterion without per-layer statistics (Taylor) scores the dense model once, before any
layer is pruned, and each layer's ``prune_layer`` receives its scores as ``stats["scores"]``.

Inside a chain of blocks (:mod:`ptsparse.criteria.block_inputs`), a layer's pass runs only its block on
cached block inputs, which computes the same statistics at a fraction of the cost; other layers (a stem,
a classifier) get full passes.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .._progress import progress
from ..data import Calibration
from ..masking import attach_channel_masks, attach_masks, mask_of
from ..norms import following_norms
from ..offload import Offload, whole_model
from ..patterns import Channel, Pattern
from ..targets import Target
from .base import Criterion
from .block_inputs import BlockInputs, find_chains, inputs_for
from .statistics import gather_statistics


def prune_model(model: nn.Module, targets: list[Target], counts: dict[str, int], pattern: Pattern,
                criterion: Criterion, calibration: Calibration | None, batch_size: int = 64,
                device: str | torch.device = "cpu", show_progress: bool = False,
                scores: dict[str, torch.Tensor] | None = None, offload: Offload | None = None,
                cache_block_inputs: bool = True) -> dict[str, torch.Tensor]:
    """Chooses and attaches a mask for every target; returns the masks by layer name (the attached ones).

    Under the channel pattern a layer's pruned channels are masked in its bias and in the BatchNorm that
    follows it too (:func:`~ptsparse.masking.attach_channel_masks`), as soon as the layer is pruned, so the
    statistics of later layers see those channels as the pruned model will: exactly zero. A member of a coupled
    unit (the pattern's ``units``, scored already: :mod:`ptsparse.coupled`) prunes its unit's channels, with no
    statistics pass of its own.

    Args:
        targets: the layers, in execution order (data-driven criteria rely on it).
        counts: weights to prune per layer.
        scores: ``criterion.scores`` of the unpruned model when the caller has them already (an allocation
            that ranks scores), so a whole-model criterion (Taylor) does not score twice.
        offload: the model is in CPU memory and runs on ``device`` one block at a time (:mod:`ptsparse.offload`):
            a layer inside a chain of blocks is pruned with its block alone on the device, the block's cached
            inputs in CPU memory; a layer outside every chain is pruned with the modules outside the blocks on
            the device after a whole-model pass; a data-free criterion prunes in CPU memory. The masks are those
            of the same run without offload.
        cache_block_inputs: run a layer's statistics pass on its block's cached inputs where the model has
            chains of blocks (``False`` runs every pass through the whole model; same statistics).
    """
    if isinstance(pattern, Channel):
        with whole_model(offload):
            norms = following_norms(model, targets, calibration.inputs[:2].to(device))
    else:
        norms = {}
    whole_model_scores = None
    if criterion.requires_data and not criterion.statistics:
        whole_model_scores = dict(scores) if scores is not None else criterion.scores(model, targets, calibration)
    chains = find_chains(model, targets, calibration, batch_size, device, offload) \
        if criterion.statistics and cache_block_inputs else []
    block_inputs: BlockInputs | None = None
    units = pattern.units if isinstance(pattern, Channel) else None
    for target in progress(targets, show_progress and bool(criterion.statistics), "prune layers"):
        in_unit = units is not None and units.together(target.name)  # masked by its unit's plan
        stats, whole = {}, False
        if whole_model_scores is not None:
            stats = {"scores": whole_model_scores.pop(target.name)}
        elif criterion.statistics and not in_unit:
            block_inputs = inputs_for(target, chains, block_inputs, model, calibration, batch_size, device, offload)
            whole = block_inputs is None
        # a layer outside the chains stays on the device from its statistics pass until its mask is attached
        with whole_model(offload) if whole else nullcontext():
            if criterion.statistics and not in_unit:
                stats = gather_statistics(model, target, calibration, criterion.statistics, batch_size, device,
                                          block_inputs)
            with torch.no_grad():
                mask = units.mask(target.name, target.shape, counts[target.name]) if in_unit else \
                    criterion.prune_layer(target, stats, counts[target.name], pattern)
            attach_masks([target], {target.name: mask})
            if isinstance(pattern, Channel):
                attach_channel_masks(target, norms.get(target.name))
        del stats, mask  # with offload, nothing of this layer's may stay on the device
    if offload is not None:
        offload.hold(None)
    return {target.name: mask_of(target.module) for target in targets}
