"""BatchNorm layers: which modules they are, the one that follows each layer, and snapshots of their running
statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .targets import Target

# Every BatchNorm kind: 1d/2d/3d, lazy and synchronised ones derive from this base.
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def following_norms(model: nn.Module, targets: list[Target], example: torch.Tensor) -> dict[str, nn.Module]:
    """The BatchNorm that directly consumes each target's output (the very tensor the layer returned, with as many
    channels), found by tracing one forward pass.

    Every output is held until the pass ends: a freed tensor's ``id`` can be reused by a new one, which would
    pair a layer with a BatchNorm that never reads its output.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    consumers: dict[str, nn.Module] = {}

    def on_output(module: nn.Module, inputs: tuple, output: torch.Tensor, name: str) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (name, output)

    def on_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        name, output = produced.get(id(inputs[0]), (None, None))
        if name is not None and output is inputs[0] and output.dim() > 1 and output.shape[1] == module.num_features:
            consumers.setdefault(name, module)

    hooks = [t.module.register_forward_hook(partial(on_output, name=t.name)) for t in targets]
    hooks += [m.register_forward_pre_hook(on_norm) for m in model.modules() if isinstance(m, BATCH_NORMS)]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return consumers


def norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm's running statistics, by qualified buffer name."""
    return {f"{name}.{key}" if name else key: buffer.clone() for name, module in model.named_modules()
            if isinstance(module, BATCH_NORMS) for key, buffer in module.named_buffers(recurse=False)
            if buffer is not None}


@torch.no_grad()
def restore_norm_statistics(model: nn.Module, statistics: dict[str, torch.Tensor]) -> None:
    """Writes back what :func:`norm_statistics` copied."""
    for name, value in statistics.items():
        model.get_buffer(name).copy_(value)


@contextmanager
def kept_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Forward passes inside the context leave every BatchNorm's running statistics as they were."""
    statistics = norm_statistics(model)
    try:
        yield
    finally:
        restore_norm_statistics(model, statistics)
