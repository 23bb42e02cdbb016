"""The recovery axis: what trains the masked model, if anything.

* ``none``: nothing (one-shot methods).
* ``distill``: network-level training of the masked student against the frozen dense teacher, with an
  objective (:data:`~ptsparse.recovery.objectives.OBJECTIVES`) and mask dynamics
  (:data:`~ptsparse.recovery.dynamics.DYNAMICS`).
* ``layerwise``: POT's layer-wise reconstruction on cached dense inputs.

Contract: ``run(student, teacher, targets, calibration, ...)`` trains ``student`` in place and returns what
the report records of it; a resumable kind checkpoints into ``checkpoint_dir``, continues from it with
``resume`` and carries the run's ``stopwatch`` across the interruption. ``needs_teacher`` says whether a frozen copy of the dense model is kept for it, and
``runs_dynamics`` whether mask dynamics can act during it, and ``offloadable`` whether it works with ``offload`` (the
model in CPU memory, run one block at a time, forward passes only: :mod:`ptsparse.offload`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..allocation import LayerBudget
from ..blocks import find_blocks
from ..data import Calibration
from ..errors import ConfigError
from ..options import Options, Part, option
from ..targets import Target
from .dynamics import DYNAMICS, Dynamics
from .layerwise import reconstruct_layers
from .objectives import OBJECTIVES, Objective
from .trainer import DistillSettings, Stopwatch, TrainSchedule, distill


class Recovery(Part, abc.ABC):
    """Trains the masked student; see the module docstring for the contract."""

    needs_teacher: ClassVar[bool] = True
    runs_dynamics: ClassVar[bool] = False
    offloadable: ClassVar[bool] = False  # recovery trains the whole model on the device

    @abc.abstractmethod
    def run(self, student: nn.Module, teacher: nn.Module | None, targets: list[Target], calibration: Calibration,
            budgets: Sequence[LayerBudget], sparsity: float, device: torch.device,
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
            stopwatch: Stopwatch | None = None) -> dict[str, Any]: ...


RECOVERIES: Registry[type[Recovery]] = Registry("recovery")


@RECOVERIES.register("none")
class NoRecovery(Recovery):
    """The masked model as it is."""

    needs_teacher = False
    offloadable = True

    def run(self, student, teacher, targets, calibration, budgets, sparsity, device, checkpoint_dir=None,
            resume=False, stopwatch=None) -> dict[str, Any]:
        return {"kind": "none"}


@RECOVERIES.register("distill")
class Distill(Recovery):
    """Distillation from the dense teacher under the run's objective and mask dynamics.

    Args:
        settings: the schedule, teacher mode and memory switches.
        objective, dynamics: the run's objective and mask dynamics, and their names for the report.
        batch_size, seed, blocks, progress, run_id: the run's values (``blocks`` for gradient checkpointing;
            ``run_id`` identifies the run in a resumable checkpoint).
    """

    Settings = DistillSettings
    runs_dynamics = True

    def __init__(self, settings: DistillSettings, objective: tuple[str, Objective], dynamics: tuple[str, Dynamics],
                 batch_size: int = 64, seed: int = 0, blocks: Sequence[str] = (), progress: bool = False,
                 run_id: dict | None = None) -> None:
        self.settings, self.objective, self.dynamics = settings, objective, dynamics
        self.batch_size, self.seed, self.blocks, self.progress, self.run_id = batch_size, seed, blocks, progress, run_id

    @classmethod
    def from_config(cls, config) -> Distill:
        objective, dynamics = OBJECTIVES.get(config.objective), DYNAMICS.get(config.dynamics)
        return cls(config.settings_of(cls), (config.objective, objective.from_config(config)),
                   (config.dynamics, dynamics.from_config(config)), config.batch_size, config.seed, config.blocks,
                   config.progress, {"config": config.to_dict()})

    def run(self, student, teacher, targets, calibration, budgets, sparsity, device, checkpoint_dir=None,
            resume=False, stopwatch=None) -> dict[str, Any]:
        schedule = TrainSchedule.from_settings(self.settings, len(calibration), self.batch_size, self.seed)
        (objective_name, objective), (dynamics_name, dynamics) = self.objective, self.dynamics
        history = distill(
            student, teacher, targets, calibration, schedule, objective, dynamics, budgets=budgets, sparsity=sparsity,
            teacher_bn=self.settings.teacher_bn, device=device, checkpoint_dir=checkpoint_dir, resume=resume,
            run_id={**(self.run_id or {}), "calib": calibration.hash}, stopwatch=stopwatch,
            recompute_blocks=find_blocks(student, targets, self.blocks) if self.settings.grad_checkpointing else (),
            shard_blocks=_shard_units(student, targets, self.blocks) if self.settings.shard == "fsdp" else None,
            show_progress=self.progress)
        return {"kind": "distill", "iterations": schedule.iterations, "warmup_iterations": schedule.warmup_iterations,
                "objective": objective_name, "dynamics": dynamics_name, "teacher_bn": self.settings.teacher_bn,
                **dynamics.summary(), "history": history}


def _shard_units(student: nn.Module, targets: list[Target], names: Sequence[str]) -> list[str]:
    """The blocks FSDP shards one by one: the named ones, else those found; none (the whole student one unit) when
    the student has no blocks."""
    if names:
        return find_blocks(student, targets, names)
    try:
        return find_blocks(student, targets)
    except ConfigError:  # no blocks: the root unit holds every parameter
        return []


@RECOVERIES.register("layerwise")
class Layerwise(Recovery):
    """POT's layer-wise reconstruction (:func:`~ptsparse.recovery.layerwise.reconstruct_layers`)."""

    @dataclass(frozen=True)
    class Settings(Options, part="layerwise"):
        iterations: int = option(2000, "Adam steps per layer", minimum=1)
        lr: float = option(1e-5, "learning rate of weights", minimum=0)
        bias_lr: float = option(1e-4, "learning rate of biases", minimum=0)
        weight_correction: bool = option(True, "POT per-channel weight correction")
        bias_correction: bool = option(True, "POT bias correction")

    def __init__(self, settings: Settings, batch_size: int = 64, seed: int = 0, progress: bool = False) -> None:
        self.settings, self.batch_size, self.seed, self.progress = settings, batch_size, seed, progress

    @classmethod
    def from_config(cls, config) -> Layerwise:
        return cls(config.settings_of(cls), config.batch_size, config.seed, config.progress)

    def run(self, student, teacher, targets, calibration, budgets, sparsity, device, checkpoint_dir=None,
            resume=False, stopwatch=None) -> dict[str, Any]:
        s = self.settings
        losses = reconstruct_layers(
            student, teacher, targets, calibration, iterations=s.iterations, lr_weight=s.lr, lr_bias=s.bias_lr,
            batch_size=self.batch_size, weight_correction=s.weight_correction, bias_correction=s.bias_correction,
            seed=self.seed, device=device, show_progress=self.progress)
        return {"kind": "layerwise", "iterations_per_layer": s.iterations, "layer_losses": losses}
