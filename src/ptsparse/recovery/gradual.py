"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): masks tighten during recovery.

The pattern's masks fix how many weights each layer prunes in the end (its allocation), not which ones: the
student starts from the dense teacher's weights with ``initial`` of each layer's final count pruned (by
magnitude), and every ``update_every`` steps prunes more of its smallest kept magnitudes, following the cubic
schedule

    pruned_l(t) = K_l * (1 - (1 - initial) * (1 - t / T)^3),   T = end * total steps,

until every layer prunes its final count ``K_l`` at step ``T``; the rest of the budget recovers at the final
masks. A pruned weight never grows back. The network adapts while the damage is small, instead of recovering
from the whole damage at once, which pays most where one-shot damage is largest (very high sparsity, compact
models). Per-layer counts end exactly at the allocation's, so the target is met exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..errors import ConfigError
from ..masking import mask_of
from ..options import Options, option
from ..patterns import Unstructured
from ..targets import Target
from .dynamics import DYNAMICS, Dynamics, TrainState


def cubic_fraction(step: int, end_step: int, initial: float) -> float:
    """The fraction of its final count a layer prunes at ``step`` (1 from ``end_step`` on)."""
    if step >= end_step:
        return 1.0
    return 1.0 - (1.0 - initial) * (1.0 - step / end_step) ** 3


@DYNAMICS.register("gradual")
class Gradual(Dynamics):
    """Gradual magnitude pruning from the dense weights to the allocation's counts on a cubic schedule.

    Args:
        initial: fraction of each layer's final pruned count pruned before the first step (0: start dense).
        end: fraction of the recovery steps after which every layer prunes its final count.
        update_every: steps between two tightenings of the masks.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="gradual"):
        initial: float = option(0.0, "fraction of each layer's final pruned count pruned at the start (0: dense)",
                                minimum=0, maximum=1)
        end: float = option(0.5, "fraction of the recovery after which the masks reach their final counts",
                            minimum=0, maximum=1)
        update_every: int = option(25, "steps between two tightenings of the masks", minimum=1)

    patterns = ("unstructured",)
    data_parallel = True

    def __init__(self, initial: float = 0.0, end: float = 0.5, update_every: int = 25) -> None:
        self.Settings(initial=initial, end=end, update_every=update_every)
        self.initial, self.end, self.update_every = initial, end, update_every
        self.layers: list[tuple[str, nn.Module]] = []
        self.final_counts: dict[str, int] = {}
        self.chosen: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, targets: list[Target], *, teacher: nn.Module | None = None,
                example: torch.Tensor | None = None) -> None:
        """Records each layer's final pruned count and restores its pruned weights from the dense teacher."""
        teacher_modules = dict(teacher.named_modules()) if teacher is not None else {}
        self.layers = []
        for target in targets:
            mask = mask_of(target.module)
            if mask is None:
                raise ConfigError(f"dynamics 'gradual' needs a mask on layer {target.name}; prune the model first")
            self.final_counts[target.name] = int((~mask).sum())
            self.chosen[target.name] = mask.clone()
            dense = teacher_modules.get(target.name)
            if dense is not None:
                with torch.no_grad():
                    stored = target.module.parametrizations.weight.original
                    stored[~mask] = dense.weight.detach().to(stored.device, stored.dtype)[~mask]
            mask.fill_(True)
            self.layers.append((target.name, target.module))

    def end_step(self, total_steps: int) -> int:
        return math.ceil(self.end * total_steps)

    def on_start(self, state: TrainState) -> None:
        self.tighten(0, state.total_steps)

    def after_step(self, state: TrainState) -> None:
        if state.step % self.update_every == 0 or state.step == self.end_step(state.total_steps):
            self.tighten(state.step, state.total_steps)

    @torch.no_grad()
    def tighten(self, step: int, total_steps: int) -> None:
        """Prunes each layer's smallest kept magnitudes up to its scheduled count (the same on every rank)."""
        fraction = cubic_fraction(step, self.end_step(total_steps), self.initial)
        for name, module in self.layers:
            mask = mask_of(module)
            count = round(self.final_counts[name] * fraction)
            if count > int((~mask).sum()):
                scores = module.parametrizations.weight.original.abs().masked_fill(~mask, -1.0)
                mask.copy_(Unstructured().mask(scores, count))
        distributed.same_on_every_rank([mask_of(module) for _, module in self.layers], f"gradual masks at {step}")

    def on_end(self, state: TrainState) -> None:
        self.tighten(state.total_steps, state.total_steps)

    def summary(self) -> dict[str, Any]:
        """Share of the kept weights that the pattern's one-shot masks had pruned (how far gradual moved them)."""
        moved = kept = 0
        for name, module in self.layers:
            mask = mask_of(module)
            moved += int((mask & ~self.chosen[name]).sum())
            kept += int(mask.sum())
        return {"kept_changed": moved / kept if kept else 0.0}
