"""BatchNorm layers: which modules they are, and snapshots of their running statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Every BatchNorm kind: 1d/2d/3d, lazy and synchronised ones derive from this base.
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


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
