"""Masks attached to layers for training, and baked in for export.

A mask is a boolean tensor of the weight's shape (``True`` = kept). :func:`attach_masks` registers it as
a parametrization (:mod:`torch.nn.utils.parametrize`), so the layer computes with ``weight * mask`` and
gradients reach the stored weight through the product; mask dynamics may change a mask in place.
Under the channel pattern, :func:`attach_channel_masks` masks a pruned channel's bias and BatchNorm the same
way, so the channel outputs exactly zero. :func:`bake` removes the parametrizations and leaves plain modules
whose masked entries hold exact zeros (+0.0: ``w * False`` is -0.0 for a negative ``w``; the sign is dropped
so the zeros of a baked model are one bit pattern, which keeps compressed checkpoints bit-exact).
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


def attach_channel_masks(target: Target, norm: nn.Module | None = None) -> None:
    """Masks the rest of each pruned output channel of ``target``: the layer's bias, and the affine weight and
    bias of ``norm``, the BatchNorm that directly follows it (:func:`ptsparse.norms.following_norms`).

    Each gets a 1-D :class:`WeightMask` keeping the channels whose weight row keeps an entry. A BatchNorm fed
    zeros still outputs its shift ``bias - weight * mean / sqrt(var + eps)``; with the layer's bias and both
    affine parameters masked, the channel outputs exactly 0 whatever the running statistics and whatever
    recovery trains, so channel removal (``ptsparse export --format channels``) can drop it. Dynamics that
    move channels write these masks with the weight's (:mod:`ptsparse.recovery.iee_channels`). Tensors
    masked already are left as they are.

    Raises:
        ValueError: ``target`` has no mask attached.
    """
    mask = mask_of(target.module)
    if mask is None:
        raise ValueError(f"layer {target.name} has no mask to take its channels from")
    keep = mask.flatten(1).any(1)
    for owner, name in ((target.module, "bias"), (norm, "weight"), (norm, "bias")):
        tensor = getattr(owner, name, None) if owner is not None else None
        if tensor is not None and tensor.shape == keep.shape and weight_mask(owner, name) is None:
            parametrize.register_parametrization(owner, name, WeightMask(keep.clone().to(tensor.device)))


def trainable(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor an optimiser trains for ``module.<name>``: the stored one behind its mask, or the parameter."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


def bake(model: nn.Module) -> None:
    """Removes every mask in ``model``, writing ``tensor * mask`` into the plain parameter (exact zeros)."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in [name for name in module.parametrizations if weight_mask(module, name) is not None]:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            with torch.no_grad():
                tensor = getattr(module, name)
                tensor.masked_fill_(tensor == 0, 0.0)
