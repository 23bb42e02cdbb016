"""Mask dynamics: how masks move during recovery.

A dynamics object is driven by the recovery trainer through these hooks, all optional:

* ``prepare(model, targets, teacher=, example=)``: attach what the dynamics trains (a learned threshold per
  layer); called before the optimizer is built, so those parameters train, and before a checkpoint is
  loaded. ``teacher`` is the frozen dense model (pretrained values to restore), ``example`` an input batch
  (to trace the model).
* ``on_start(state)``: once, when a run starts from the beginning (not on resume).
* ``loss_terms(state)``: named terms added to the objective's; their ``"loss"`` is added to the loss.
* ``optimizer_step(state)``: applies the step's gradients (default ``state.optimizer.step()``); a dynamics
  that trains another set of parameters on some steps, or keeps some entries fixed, steps here instead.
* ``after_step(state)``: after every optimizer step.
* ``on_end(state)``: once at the end; it must leave plain boolean masks (:class:`~ptsparse.masking.WeightMask`)
  on every target that meet the run's budgets, so the rest of the flow (BN re-calibration, bake) is the same
  for every dynamics.
* ``state_dict()`` / ``load_state_dict()``: what a resumed run needs beyond the model's own state.
* ``summary()``: what the report records of the dynamics (learned allocation, mask changes).

A dynamics declares its options as ``Settings`` (:mod:`ptsparse.options`) and what it can do: ``patterns``
names the pattern kinds it works with (``None``: all), ``moves_masks`` whether masks change during training
(only a recovery that trains can then run it), ``keeps_layer_counts`` whether every layer ends with the
count it started with (a dynamics that learns the allocation does not), ``chooses_units`` whether it swaps
single channels itself (so channels cannot be pruned N at a time), and ``data_parallel`` whether it runs under
``torchrun`` with many ranks (:mod:`ptsparse.distributed`: its mask decisions made identically on every rank,
from the weights and the gradients DistributedDataParallel averaged, never from one rank's batch alone, and
checked with :func:`~ptsparse.distributed.same_on_every_rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..allocation import LayerBudget
from ..options import Part
from ..targets import Target

# Per layer, a boolean tensor of the weight's shape (which entries a mask-moving dynamics prunes or grows).
Masks = dict[str, torch.Tensor]


def reset_optimizer_entries(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, where: torch.Tensor) -> None:
    """Zeroes the optimizer's state (momentum, Adam moments) of ``parameter`` where ``where`` is True, so a
    regrown weight starts without the momentum of the weight it was before being pruned."""
    for value in optimizer.state.get(parameter, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            value[where] = 0


@dataclass
class TrainState:
    """What a recovery run exposes to its dynamics at each hook.

    Attributes:
        budgets: per-layer caps of the run (a dynamics that moves sparsity between layers respects them).
        sparsity: the global target the masks must meet at the end.
    """

    model: nn.Module
    targets: list[Target]
    optimizer: torch.optim.Optimizer
    step: int
    total_steps: int
    budgets: Sequence[LayerBudget] = field(default_factory=list)
    sparsity: float = 0.0


class Dynamics(Part):
    """Base class: every hook does nothing; see the module docstring for the contract."""

    patterns: ClassVar[tuple[str, ...] | None] = None
    moves_masks: ClassVar[bool] = True
    keeps_layer_counts: ClassVar[bool] = True
    chooses_units: ClassVar[bool] = False
    data_parallel: ClassVar[bool] = False

    def prepare(self, model: nn.Module, targets: list[Target], *, teacher: nn.Module | None = None,
                example: torch.Tensor | None = None) -> None:
        pass

    def on_start(self, state: TrainState) -> None:
        pass

    def loss_terms(self, state: TrainState) -> dict[str, torch.Tensor]:
        return {}

    def optimizer_step(self, state: TrainState) -> None:
        state.optimizer.step()

    def after_step(self, state: TrainState) -> None:
        pass

    def on_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


DYNAMICS: Registry[type[Dynamics]] = Registry("dynamics")


@DYNAMICS.register("static")
class Static(Dynamics):
    """Masks stay as the pattern chose them; only the kept weights train."""

    moves_masks = False
    data_parallel = True
