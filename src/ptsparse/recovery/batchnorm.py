"""BatchNorm re-calibration: fresh running statistics from the calibration set (``baselines.md`` §10)."""

from __future__ import annotations

import torch
from torch import nn

from ..data import Calibration
from ..norms import BATCH_NORMS



@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calibration: Calibration, batch_size: int = 64,
                          device: str | torch.device = "cpu") -> int:
    """Re-estimates every BatchNorm's running mean and variance on the calibration inputs.

    Statistics are reset and averaged cumulatively over all batches (``momentum=None``) with only the
    norms in train mode; momentum and every module's mode are restored afterwards.

    Returns:
        The number of BatchNorm layers re-calibrated (0 if the model has none with running statistics).
    """
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats
             and m.running_mean is not None]
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for x, _ in calibration.batches(batch_size):
            model(x.to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    return len(norms)
