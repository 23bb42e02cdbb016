"""Masks attached to layers for training, and baked in for export.

A mask is a boolean tensor of the weight's shape (``True`` = kept). :func:`attach_masks` registers it as
a parametrization (:mod:`torch.nn.utils.parametrize`), so the layer computes with ``weight * mask`` and
gradients reach the stored weight through the product; mask dynamics may change a mask in place.
:func:`bake` removes the parametrizations and leaves plain modules whose weights hold exact zeros
(+0.0: ``w * False`` is -0.0 for a negative ``w``; the sign is dropped so the zeros of a baked model are
one bit pattern, which keeps compressed checkpoints bit-exact).
:func:`zero_channels` silences a pruned channel's bias and BatchNorm, so the channel outputs exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .targets import Target


class WeightMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` with the mask as a (boolean) buffer.

    Args:
        mask: ``True`` where the weight is kept.
        straight_through: pass the gradient to every stored weight, pruned ones too (dynamic sparse
            training lets pruned weights grow back); otherwise only kept weights receive gradient.
    """

    def __init__(self, mask: torch.Tensor, straight_through: bool = False) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.straight_through = straight_through

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.straight_through:
            return weight * self.mask + (weight - weight.detach()) * ~self.mask  # value masked, gradient dense
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


def weight_mask(module: nn.Module, name: str = "weight") -> WeightMask | None:
    """The :class:`WeightMask` parametrizing ``module.<name>``, or ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in getattr(module.parametrizations, name) if isinstance(p, WeightMask)), None)


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """The mask attached to ``module.weight``, or ``None``."""
    parametrization = weight_mask(module)
    return None if parametrization is None else parametrization.mask


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
            with torch.no_grad():
                weight = target.module.weight
                weight.masked_fill_(weight == 0, 0.0)


@torch.no_grad()
def zero_channels(module: nn.Module, keep: torch.Tensor, names: tuple[str, ...] = ("weight", "bias")) -> None:
    """Zeroes the entries of a module's per-channel parameters ``names`` where ``keep`` is False, in place.

    For a pruned output channel: the bias of its convolution and the affine weight and bias of the
    BatchNorm after it. A pruned convolution channel feeds zeros into its BatchNorm, which still outputs
    its shift ``bias - weight * mean / sqrt(var + eps)``; with both affine parameters zero (and no conv
    bias) the channel outputs exactly 0 whatever the statistics, so it can be physically removed without
    changing the outputs.
    """
    for name in names:
        parameter = getattr(module, name, None)
        if isinstance(parameter, torch.Tensor) and parameter.dim() == 1:
            parameter[~keep.to(device=parameter.device, dtype=torch.bool).flatten()] = 0.0
