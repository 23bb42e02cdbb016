"""Dynamic sparse training as UniPTS runs it (``unipts.md`` §4): magnitude top-k masks re-chosen every step.

Each layer keeps exactly as many weights as its allocation gave it; which ones changes: every
``update_every`` steps the mask becomes the layer's ``k`` largest magnitudes (ties by position). The mask
passes the gradient straight through to every weight, so a pruned weight can grow back into the top-k,
and pruned weights decay toward zero with ``pruned_decay`` (SR-STE, Zhou et al. 2021), the term
``pruned_decay / 2 * ||(1 - m) * w||^2`` added to the loss, which damps mask oscillation. Per-layer
counts never change, so the allocation stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..errors import ConfigError
from ..masking import mask_of, weight_mask
from ..options import Options, option
from ..patterns import Unstructured
from ..targets import Target
from .dynamics import DYNAMICS, Dynamics, TrainState


@DYNAMICS.register("dst")
class DynamicSparseTraining(Dynamics):
    """Per-layer magnitude top-k re-chosen during training, straight-through gradients, pruned-weight decay.

    Args:
        update_every: steps between mask updates (1 in UniPTS: every step).
        pruned_decay: ``lambda`` of the SR-STE decay on pruned weights (5e-5 in UniPTS).
    """

    @dataclass(frozen=True)
    class Settings(Options, part="dst"):
        update_every: int = option(1, "steps between magnitude top-k mask updates", minimum=1)
        pruned_decay: float = option(5e-5, "SR-STE decay lambda on pruned weights", minimum=0)

    patterns = ("unstructured",)
    data_parallel = True

    def __init__(self, update_every: int = 1, pruned_decay: float = 5e-5) -> None:
        self.Settings(update_every=update_every, pruned_decay=pruned_decay)
        self.update_every = update_every
        self.pruned_decay = pruned_decay
        self.layers: list[tuple[str, nn.Module]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, targets: list[Target], *, teacher: nn.Module | None = None,
                example: torch.Tensor | None = None) -> None:
        self.layers = []
        for target in targets:
            if mask_of(target.module) is None:
                raise ConfigError(f"dynamics 'dst' needs a mask on layer {target.name}; prune the model first")
            weight_mask(target.module).straight_through = True
            self.layers.append((target.name, target.module))
            self.initial[target.name] = mask_of(target.module).clone()

    def loss_terms(self, state: TrainState) -> dict[str, torch.Tensor]:
        if not self.pruned_decay:
            return {}
        decay = sum((module.parametrizations.weight.original * ~mask_of(module)).pow(2).sum()
                    for _, module in self.layers)
        term = 0.5 * self.pruned_decay * decay
        return {"pruned_decay": term.detach(), "loss": term}

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        """Each layer's mask becomes the top-k of its current magnitudes, ``k`` unchanged (the same on every rank)."""
        for _, module in self.layers:
            mask = mask_of(module)
            prune = int((~mask).sum())
            mask.copy_(Unstructured().mask(module.parametrizations.weight.original.abs(), prune))
        distributed.same_on_every_rank([mask_of(module) for _, module in self.layers], f"dst masks at step {step}")

    def after_step(self, state: TrainState) -> None:
        if state.step % self.update_every == 0:
            self.update_masks(state.step)

    def on_end(self, state: TrainState) -> None:
        self.update_masks(state.step)
        for _, module in self.layers:
            weight_mask(module).straight_through = False

    def summary(self) -> dict[str, Any]:
        """Share of each layer's kept weights that were not kept at the start (0: the masks never moved)."""
        changed, moved_total, kept_total = {}, 0, 0
        for name, module in self.layers:
            mask = mask_of(module)
            kept, moved = int(mask.sum()), int((mask & ~self.initial[name]).sum())
            changed[name] = moved / kept if kept else 0.0
            moved_total, kept_total = moved_total + moved, kept_total + kept
        return {"kept_changed": moved_total / kept_total if kept_total else 0.0, "layer_kept_changed": changed}
