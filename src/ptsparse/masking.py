"""Masks attached to layers for training, and baked in for export.

A mask is a boolean tensor of the weight's shape (``True`` = kept). :func:`attach_masks` registers it as
a parametrization (:mod:`torch.nn.utils.parametrize`), so the layer computes with ``weight * mask`` and
gradients reach the stored weight through the product; mask dynamics may change a mask in place.
:func:`bake` removes the parametrizations and leaves plain modules whose weights hold exact zeros.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .targets import Target


class WeightMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` with the mask as a (boolean) buffer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        return f"density={float(self.mask.float().mean()):.4f}"


def attach_masks(targets: list[Target], masks: Mapping[str, torch.Tensor]) -> None:
    """Attaches ``masks[target.name]`` to each target's weight (the masked entries read as zero).

    Raises:
        ValueError: a mask is missing or has another shape than its weight.
    """
    for target in targets:
        mask = masks.get(target.name)
        if mask is None or mask.shape != target.shape:
            raise ValueError(f"mask for {target.name} is missing or has the wrong shape")
        parametrize.register_parametrization(target.module, "weight", WeightMask(mask.to(target.weight.device)))


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """The mask attached to ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for parametrization in module.parametrizations.weight:
        if isinstance(parametrization, WeightMask):
            return parametrization.mask
    return None


def masks_of(targets: list[Target]) -> dict[str, torch.Tensor]:
    """Copies of the attached masks by layer name (a layer with no mask gets its non-zero pattern)."""
    result = {}
    for target in targets:
        mask = mask_of(target.module)
        result[target.name] = (mask if mask is not None else target.weight != 0).detach().clone().cpu()
    return result


def bake(targets: list[Target]) -> None:
    """Removes the masks, writing ``weight * mask`` into the plain ``weight`` parameter (exact zeros)."""
    for target in targets:
        if parametrize.is_parametrized(target.module, "weight"):
            parametrize.remove_parametrizations(target.module, "weight", leave_parametrized=True)
