"""Per-layer input statistics gathered by forward hooks: the one place every data-driven criterion uses.

Each statistic is a pair of pure functions: ``make(module) -> state`` and
``accumulate(state, module, inputs) -> state``, with ``inputs`` the layer's input batch. Convolutions
see their inputs as unfolded patches (respecting stride, padding, dilation and groups), so a statistic
means the same thing for Linear and Conv layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..data import Calibration
from ..errors import ConfigError
from ..targets import Target

Make = Callable[[nn.Module], dict[str, torch.Tensor]]
Accumulate = Callable[[dict[str, torch.Tensor], nn.Module, torch.Tensor], dict[str, torch.Tensor]]

# name -> (make, accumulate); filled below by the statistics ptsparse knows.
STATISTICS: dict[str, tuple[Make, Accumulate]] = {}


@torch.no_grad()
def gather_statistics(model: nn.Module, target: Target, calibration: Calibration, names: Sequence[str],
                      batch_size: int = 64, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Runs the calibration set through ``model`` and accumulates ``names`` over ``target``'s inputs.

    Returns:
        The accumulated states of every requested statistic, merged into one dict.

    Raises:
        ConfigError: a statistic name is unknown.
    """
    for name in names:
        if name not in STATISTICS:
            raise ConfigError(f"unknown statistic {name!r}; known: {', '.join(sorted(STATISTICS))}")
    states = {name: STATISTICS[name][0](target.module) for name in names}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        for name in names:
            states[name] = STATISTICS[name][1](states[name], module, inputs[0].detach())

    handle = target.module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for x, _ in calibration.batches(batch_size):
            model(x.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    merged: dict[str, torch.Tensor] = {}
    for state in states.values():
        merged.update(state)
    return merged
