"""BatchNorm re-calibration: fresh running statistics from the calibration set (``baselines.md`` §10), and the
running statistics of data-parallel ranks combined into one."""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..data import Calibration
from ..norms import BATCH_NORMS


def _tracking_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def _mean_over_ranks(norms: list[nn.Module], weight: float) -> float:
    """Replaces each norm's running mean and variance by their mean over the ranks, each rank's weighted by its
    ``weight``; returns the sum of the weights (``weight`` without a process group, nothing changed)."""
    if distributed.world()[1] == 1 or not norms:
        return weight
    buffers = [buffer for norm in norms for buffer in (norm.running_mean, norm.running_var)]
    flat = torch.cat([buffer.float().flatten() * weight for buffer in buffers]
                     + [torch.full((1,), float(weight), device=buffers[0].device)])
    distributed.all_reduce_(flat)
    total = float(flat[-1])
    for buffer, summed in zip(buffers, flat[:-1].split([buffer.numel() for buffer in buffers])):
        buffer.copy_(summed.view_as(buffer) / total)
    return total


def average_norm_statistics(model: nn.Module) -> None:
    """Every BatchNorm's running statistics become their mean over the ranks (those of one rank's batches after
    data-parallel training), so every rank holds the same model; nothing happens in a single process."""
    _mean_over_ranks(_tracking_norms(model), 1.0)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration: Calibration, batch_size: int = 64,
                          device: str | torch.device = "cpu", shard: bool = True) -> int:
    """Re-estimates every BatchNorm's running mean and variance on the calibration inputs.

    Statistics are reset and averaged cumulatively over all batches (``momentum=None``) with only the
    norms in train mode; momentum and every module's mode are restored afterwards. Under many ranks each takes
    the batches in turn and their averages are combined by batch count, which gives a single process's values.

    Args:
        shard: under many ranks, share the batches as above; ``False``: this rank runs every batch alone and
            enters no collective (for a model that differs between ranks, as each rank's search candidates).

    Returns:
        The number of BatchNorm layers re-calibrated (0 if the model has none with running statistics).
    """
    norms = _tracking_norms(model)
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    seen = 0
    try:
        batches = calibration.batches(batch_size)
        for x, _ in distributed.my_turns(batches) if shard else batches:
            model(x.to(device))
            seen += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    total = _mean_over_ranks(norms, seen) if shard else seen
    for norm in norms:
        norm.num_batches_tracked.fill_(int(total))
    return len(norms)
