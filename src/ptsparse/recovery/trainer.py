"""The recovery trainer: distil the frozen dense teacher into the masked student on the calibration set.

One loop for every method: an objective (what is minimised), mask dynamics (how masks move), SGD or
Adam with linear warm-up then cosine decay to 0, weight decay on weights (or, as the papers' code, also on
biases and norms; never on learned scores), and a checkpoint every N steps from which an interrupted run
resumes to the same result. Randomness (batch order, flips, crops) is derived from the seed and the step
alone, so a resumed run sees exactly the batches the uninterrupted one would have.

Data-parallel (:mod:`ptsparse.distributed`): each rank trains on its slice of the same global batch of
``batch_size`` samples, each rank's loss weighted by its share of that batch, and DistributedDataParallel averages
the gradients, so every rank takes the single process's step on the global batch. What differs is BatchNorm in
train mode, which normalises by the statistics of each rank's slice; its running statistics are averaged over the
ranks at checkpoints (a resumed run starts every rank from rank 0's copy; averaging is linear, so the end is the
same) and at the end. Rank 0 alone writes the checkpoints, which record the number of ranks: a run resumes on as many.
With ``shard_blocks`` (``distill_shard: fsdp``) a copy of the student sharded with FSDP2 trains in DDP's place,
taking the same steps (:mod:`ptsparse.recovery.memory`); its checkpoints hold full state dicts gathered from the
shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from .._progress import progress
from ..allocation import LayerBudget
from ..checkpoint import atomic_path
from ..data import Calibration
from ..errors import CheckpointError, ConfigError
from ..options import Options, option
from ..targets import Target, count_zeros
from .batchnorm import average_norm_statistics
from .dynamics import Dynamics, TrainState
from .memory import (PRECISIONS, SHARDS, autocast, checkpointed, full_states, gather_into, load_full_states,
                     sharded_copy)
from .objectives import Objective

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "recovery.pt"


class Stopwatch:
    """The wall time of a whole run, across interruptions: a resumed run adds the time its earlier attempts
    had spent up to the checkpoint it continues from (stored in the checkpoint)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.earlier = 0.0

    def elapsed(self) -> float:
        return self.earlier + time.perf_counter() - self.start


def checkpoint_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The step an interrupted run's checkpoint in ``checkpoint_dir`` continues from; ``None`` without one.

    Raises:
        CheckpointError: the checkpoint cannot be read.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    return int(_read_checkpoint(path)["step"]) if path.is_file() else None


OPTIMIZERS = ("sgd", "adam")
TEACHER_BN = ("eval", "train")
AUGMENTATIONS = ("none", "flip", "crop", "flip_crop")
DECAY_SCOPES = ("weights", "all")


@dataclass(frozen=True)
class DistillSettings(Options, part="distill"):
    """The options of distillation: the training schedule, the teacher's mode and the memory switches."""

    iterations: int | None = option(None, "distill steps; default 100 epochs of the calibration set (1600 for "
                                    "1024 samples at batch 64)", kind=int)
    optimizer: str = option("sgd", "optimizer: sgd or adam", choices=OPTIMIZERS)
    lr: float = option(0.01, "peak learning rate (batch 64)", minimum=0)
    momentum: float = option(0.9, "SGD momentum", minimum=0)
    weight_decay: float = option(3e-4, "weight decay (on what: weight_decay_scope)", minimum=0)
    weight_decay_scope: str = option("weights", "what decays: weights (tensors of 2+ dimensions), or all "
                                     "parameters but learned scores (biases and norms too, as the papers' code)",
                                     choices=DECAY_SCOPES)
    warmup_iterations: int | None = option(None, "linear warm-up steps before the cosine decay; default one epoch",
                                           kind=int)
    teacher_bn: str = option("eval", "dense teacher's BatchNorm mode: eval, or train as FCPTS's and UniPTS's code",
                             choices=TEACHER_BN)
    augment: str = option("none", "calibration augmentation of images: none, flip (horizontal), crop (random crop "
                          "of the zero-padded input, padding 1/8 of its side) or flip_crop; token ids (text) are "
                          "never changed", choices=AUGMENTATIONS)
    precision: str = option("fp32", "arithmetic: fp32, or bf16 (autocast mixed precision: less memory, faster on "
                            "recent GPUs)", choices=PRECISIONS)
    grad_checkpointing: bool = option(False, "recompute each block's activations during backward instead of "
                                      "storing them (less memory; the blocks of --blocks)")
    shard: str = option("none", "under torchrun: none (each rank trains a whole student, DistributedDataParallel), "
                        "or fsdp (the student's parameters, gradients and optimizer state sharded over the ranks "
                        "with FSDP2, each block one unit; static masks only)", choices=SHARDS)
    checkpoint_every: int = option(100, "steps between resumable checkpoints (0: none)", minimum=0)


@dataclass(frozen=True)
class TrainSchedule:
    """Optimisation settings of a recovery run, its defaults resolved (see :class:`DistillSettings`)."""

    iterations: int
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 3e-4
    weight_decay_scope: str = "weights"
    warmup_iterations: int = 16
    augment: str = "none"
    seed: int = 0
    checkpoint_every: int = 0
    precision: str = "fp32"

    @classmethod
    def from_settings(cls, settings: DistillSettings, calib_size: int, batch_size: int, seed: int) -> TrainSchedule:
        """Resolves the defaults that scale with the calibration set: 100 epochs, one epoch of warm-up."""
        steps_per_epoch = math.ceil(calib_size / batch_size)
        iterations = settings.iterations if settings.iterations is not None else 100 * steps_per_epoch
        warmup = settings.warmup_iterations if settings.warmup_iterations is not None else steps_per_epoch
        return cls(iterations=iterations, batch_size=batch_size, optimizer=settings.optimizer, lr=settings.lr,
                   momentum=settings.momentum, weight_decay=settings.weight_decay,
                   weight_decay_scope=settings.weight_decay_scope, warmup_iterations=warmup,
                   augment=settings.augment, seed=seed, checkpoint_every=settings.checkpoint_every,
                   precision=settings.precision)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear from 0 to 1 over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def parameter_groups(model: nn.Module, weight_decay: float, scope: str = "weights") -> list[dict[str, Any]]:
    """Weights (tensors of 2 or more dimensions) decay; with ``scope="all"`` biases and norms too. Parameters a
    mask's parametrization learns (FCPTS's threshold scores) never decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        learned_by_mask = ".parametrizations." in f".{name}" and not name.endswith(".original")
        decays = not learned_by_mask and (parameter.dim() > 1 or scope == "all")
        (decay if decays else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict[str, Any]], schedule: TrainSchedule) -> torch.optim.Optimizer:
    if schedule.optimizer == "adam":
        return torch.optim.Adam(groups, lr=schedule.lr)
    return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum)


def batch_at(calibration: Calibration, step: int, schedule: TrainSchedule) -> torch.Tensor:
    """The inputs of step ``step``: epochs are seeded permutations, flips and crops are seeded per step.

    Flips and crops are image augmentations: integer inputs (token ids, whose order is the text) are left as
    they are, so the presets that flip images (``magnitude_kd``, ``recommended``) run unchanged on text.
    """
    per_epoch = math.ceil(len(calibration) / schedule.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(schedule.seed * 7919 + epoch))
    x = calibration.inputs[order[position * schedule.batch_size: (position + 1) * schedule.batch_size]]
    if not x.is_floating_point():
        return x
    if schedule.augment in ("flip", "flip_crop"):
        flips = torch.rand(len(x), generator=torch.Generator().manual_seed(schedule.seed * 104729 + step)) < 0.5
        x = torch.where(flips.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
    if schedule.augment in ("crop", "flip_crop") and x.dim() == 4:
        x = random_crop(x, torch.Generator().manual_seed(schedule.seed * 15485863 + step))
    return x


def random_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by a random offset within a zero padding of 1/8 of its side (CIFAR's 4 of 32): the
    crop of the padded image at that offset, as ``RandomCrop(size, padding)``."""
    height, width = x.shape[-2:]
    pad_h, pad_w = max(1, height // 8), max(1, width // 8)
    padded = nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h))
    top = torch.randint(0, 2 * pad_h + 1, (len(x),), generator=generator)
    left = torch.randint(0, 2 * pad_w + 1, (len(x),), generator=generator)
    return torch.stack([padded[i, :, t: t + height, l: l + width] for i, (t, l) in enumerate(zip(top, left))])


class _FeatureTap:
    """Collects the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def store(module, inputs, output):
            self.features[name] = output
        return store

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _fingerprint(schedule: TrainSchedule, extra: dict[str, Any]) -> str:
    text = json.dumps({"schedule": asdict(schedule), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def distill(student: nn.Module, teacher: nn.Module, targets: list[Target], calibration: Calibration,
            schedule: TrainSchedule, objective: Objective, dynamics: Dynamics, *,
            budgets: Sequence[LayerBudget] | None = None, sparsity: float | None = None,
            teacher_bn: str = "eval", device: str | torch.device = "cpu",
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, run_id: dict | None = None,
            stopwatch: Stopwatch | None = None, recompute_blocks: Sequence[str] = (),
            shard_blocks: Sequence[str] | None = None, show_progress: bool = False) -> list[dict[str, float]]:
    """Trains ``student`` (masks attached) to match ``teacher`` on the calibration inputs.

    Args:
        student: the masked model; its kept weights, biases and norm parameters train.
        teacher: the frozen dense model (no gradients); ``teacher_bn="eval"`` runs it in eval mode,
            ``"train"`` in train mode as FCPTS's and UniPTS's code do.
        targets: the student's masked layers.
        budgets: the layers' caps, for dynamics that move sparsity between layers (default: no caps).
        sparsity: the global target such dynamics must meet (default: the masks' sparsity at the start).
        checkpoint_dir: where ``recovery.pt`` is written every ``schedule.checkpoint_every`` steps.
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is one.
        run_id: what identifies the run besides the schedule (config, calibration hash); a checkpoint
            from another run is refused.
        stopwatch: the run's wall time; checkpoints store it and a resumed run continues it.
        recompute_blocks: blocks of the student whose activations are recomputed during backward
            (gradient checkpointing, :func:`~ptsparse.recovery.memory.checkpointed`).
        shard_blocks: under many ranks, train a copy of the student sharded with FSDP2, these blocks its units
            (:func:`~ptsparse.recovery.memory.sharded_copy`; masks must not move), whose full values are gathered
            into ``student`` at the end; ``None``: each rank trains the whole student under DistributedDataParallel.

    Returns:
        The loss terms (the objective's and the dynamics'), logged every 50 steps and at the last step.

    Raises:
        CheckpointError: the checkpoint belongs to another run or cannot be read.
        ConfigError: under many ranks, some batch is too small to give each rank a sample.
    """
    ranks = distributed.world()[1]
    smallest = len(calibration) % schedule.batch_size or schedule.batch_size  # the last batch, or every one
    if smallest < ranks:
        raise ConfigError(f"batch of {smallest} sample(s) for {ranks} ranks: every rank needs a sample of every "
                          f"batch; use a batch_size and calib_size whose batches hold at least {ranks}")
    if sparsity is None:
        zeros, total = count_zeros(targets)
        sparsity = zeros / total
    dynamics.prepare(student, targets, teacher=teacher, example=calibration.inputs[:2].to(device))
    device = torch.device(device)
    sharded = shard_blocks is not None and ranks > 1
    trained = sharded_copy(student, shard_blocks, device) if sharded else student  # the module the steps change
    groups = parameter_groups(trained, schedule.weight_decay, schedule.weight_decay_scope)
    optimizer = make_optimizer(groups, schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, schedule.warmup_iterations, schedule.iterations))
    fingerprint = _fingerprint(schedule, run_id or {})
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = TrainState(trained, targets, optimizer, 0, schedule.iterations, list(budgets or []), sparsity)
    history: list[dict[str, float]] = []
    stopwatch = stopwatch or Stopwatch()
    if resume and checkpoint is not None and checkpoint.is_file():
        state.step, history, earlier = _load_checkpoint(checkpoint, fingerprint, trained, optimizer, scheduler,
                                                        dynamics, sharded)
        stopwatch.earlier = earlier
        log.info("resumed recovery at step %d of %d from %s", state.step, schedule.iterations, checkpoint)
    else:
        dynamics.on_start(state)

    teacher.train(teacher_bn == "train")
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    names = objective.features(student, targets)
    student_tap, teacher_tap = _FeatureTap(trained, names), _FeatureTap(teacher, names)
    trained.train()
    # No buffers are sent each step: every rank's dynamics decide the same masks (and check it), and BatchNorm
    # statistics are averaged at checkpoints and at the end. The parameters stay those DDP was built with.
    model = trained if ranks == 1 or sharded else DistributedDataParallel(
        trained, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    try:
        with checkpointed(trained, recompute_blocks):
            steps = range(state.step, schedule.iterations)
            for step in progress(steps, show_progress, "recovery", total=len(steps)):
                state.step = step
                batch = batch_at(calibration, step, schedule)
                x = distributed.local_batch(batch).to(device)
                share = len(x) * ranks / len(batch)  # the single process's mean over the global batch
                with autocast(schedule.precision, device):
                    with torch.no_grad():
                        teacher_out = teacher(x)
                    terms = objective(model(x), teacher_out, student_tap.features, teacher_tap.features,
                                      progress=step / schedule.iterations)
                extra = dynamics.loss_terms(state)
                if "loss" in extra:
                    extra["loss"] = terms["loss"] + extra["loss"]
                terms.update(extra)
                optimizer.zero_grad(set_to_none=True)
                (terms["loss"] * share).backward()
                dynamics.optimizer_step(state)
                scheduler.step()
                state.step = step + 1
                dynamics.after_step(state)
                if step % 50 == 0 or step + 1 == schedule.iterations:
                    history.append({"step": step + 1, **_global_means(terms, share / ranks)})
                if checkpoint is not None and schedule.checkpoint_every and state.step % schedule.checkpoint_every == 0:
                    average_norm_statistics(trained)  # every rank resumes from rank 0's copy: the same on each
                    model_state, optimizer_state = full_states(trained, optimizer) if sharded else (
                        trained.state_dict(), optimizer.state_dict())
                    if distributed.is_main():
                        _save_checkpoint(checkpoint, fingerprint, state.step, model_state, optimizer_state,
                                         scheduler, dynamics, history, stopwatch.elapsed())
    finally:
        student_tap.remove()
        teacher_tap.remove()
        del model
    if sharded:
        gather_into(student, trained)
        del trained
        state.model = student
    dynamics.on_end(state)
    average_norm_statistics(student)
    student.eval()
    return history


def _global_means(terms: dict[str, torch.Tensor], weight: float) -> dict[str, float]:
    """The loss terms over the global batch: the sum over ranks of each rank's values times its ``weight``."""
    values = torch.stack([value.detach().float().cpu() for value in terms.values()]) * weight
    return dict(zip(terms, distributed.all_reduce_(values).tolist()))


def _save_checkpoint(path: Path, fingerprint: str, step: int, model_state: dict[str, Any],
                     optimizer_state: dict[str, Any], scheduler, dynamics: Dynamics,
                     history: list[dict[str, float]], elapsed_s: float) -> None:
    payload = {"fingerprint": fingerprint, "ranks": distributed.world()[1], "step": step, "model": model_state,
               "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
               "dynamics": dynamics.state_dict(), "history": history, "elapsed_s": elapsed_s}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, refused if a run on another number of ranks wrote it (each rank's slice of a
    batch, and so each step, would differ)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  any unreadable file is the same problem to the user
        raise CheckpointError(f"recovery checkpoint {path} cannot be read: {error}".splitlines()[0]) from None
    written, ranks = int(payload.get("ranks", 1)), distributed.world()[1]
    if written != ranks:
        raise CheckpointError(f"recovery checkpoint {path} is of a run on {written} rank(s), this one has {ranks}: "
                              f"resume it on {written}, or delete it or run without --resume")
    return payload


def _load_checkpoint(path: Path, fingerprint: str, student: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, dynamics: Dynamics, sharded: bool = False) -> tuple[int, list[dict[str, float]], float]:
    """Restores a checkpoint (full state dicts, each rank keeping its shards of a ``sharded`` student); returns its
    step, its loss history and the run's wall time up to it."""
    payload = _read_checkpoint(path)
    if payload.get("fingerprint") != fingerprint:
        raise CheckpointError(f"recovery checkpoint {path} belongs to a run with other settings; "
                              "delete it or run without --resume")
    if sharded:
        load_full_states(student, optimizer, payload["model"], payload["optimizer"])
    else:
        student.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    dynamics.load_state_dict(payload["dynamics"])
    return int(payload["step"]), list(payload["history"]), float(payload.get("elapsed_s", 0.0))
