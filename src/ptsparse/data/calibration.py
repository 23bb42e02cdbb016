"""The calibration set: deterministic sampling from a source, and one in-memory form for every input kind.

``sparsify`` accepts a DataLoader, any iterable of batches (``x`` or ``(x, y, ...)``), a Dataset, or a
tensor of inputs; :func:`as_calibration` turns each into a :class:`Calibration`, whose batches are
reproducible from a ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..errors import CalibrationError
from ..norms import BATCH_NORMS, kept_norm_statistics


def sample_indices(
    population: int,
    size: int,
    seed: int,
    labels: torch.Tensor | None = None,
    balanced: bool = False,
) -> torch.Tensor:
    """Chooses ``size`` distinct indices out of ``population``, fixed by ``seed``.

    With ``balanced=True`` (``labels`` required) every class gets ``size // classes`` samples and the
    first ``size % classes`` classes one more; a class too small to give its share gives all it has
    and the rest is drawn from the remaining samples.

    Returns:
        Sorted int64 indices.

    Raises:
        CalibrationError: ``size`` is not in [1, population], or ``balanced`` without labels.
    """
    if not 1 <= size <= population:
        raise CalibrationError(f"calibration size {size} is not in [1, {population}] (samples available)")
    generator = torch.Generator().manual_seed(seed)
    if not balanced:
        return torch.randperm(population, generator=generator)[:size].sort().values
    if labels is None or len(labels) != population or bool((labels < 0).any()):
        raise CalibrationError("class-balanced sampling needs a label for every sample")
    classes = labels.unique()
    chosen = []
    for position, label in enumerate(classes.tolist()):
        members = (labels == label).nonzero().flatten()
        share = size // len(classes) + (1 if position < size % len(classes) else 0)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:share]])
    picked = torch.cat(chosen)
    if len(picked) < size:
        rest = torch.ones(population, dtype=torch.bool)
        rest[picked] = False
        pool = rest.nonzero().flatten()
        picked = torch.cat([picked, pool[torch.randperm(len(pool), generator=generator)[: size - len(picked)]]])
    return picked.sort().values


def digest(tensor: torch.Tensor) -> str:
    """A short SHA-256 hex digest of a tensor's values (used for calibration indices or inputs)."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


@dataclass
class Calibration:
    """Calibration inputs held in memory.

    Attributes:
        inputs: all samples, first dimension = samples.
        labels: one label per sample, or ``None`` when the data carries none.
        hash: digest of the sampled indices (or of the inputs when they were given directly).
        indices: the indices drawn from the source, when it was sampled.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None
    hash: str
    indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yields ``(x, y)`` batches; shuffled by ``generator`` when one is given, else in order."""
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            index = order[start: start + batch_size]
            yield self.inputs[index], (self.labels[index] if self.labels is not None else None)

    @torch.no_grad()
    def feed(self, model: torch.nn.Module, batch_size: int = 64, device: str | torch.device = "cpu",
             batch_statistics: bool = False, shard: bool = False) -> None:
        """Runs every batch through ``model`` in eval mode (for its hooks), restoring its state afterwards.

        A hook that has what it needs from a batch may raise :class:`StopForward`: the rest of that
        batch's forward pass is skipped.

        Args:
            batch_statistics: normalise BatchNorm layers with each batch's own statistics instead of
                their running ones (see :func:`inference_mode`).
            shard: run only this rank's turn of the batches (:func:`ptsparse.distributed.my_turns`), for
                statistics the caller then sums over the ranks; every batch without a process group.
        """
        batches = self.batches(batch_size)
        with inference_mode(model, batch_statistics):
            for x, _ in distributed.my_turns(batches) if shard else batches:
                try:
                    model(x.to(device))
                except StopForward:
                    pass


@contextmanager
def inference_mode(module: torch.nn.Module, batch_statistics: bool = False) -> Iterator[None]:
    """Puts ``module`` in eval mode for calibration passes and restores its modes (and statistics) after.

    Args:
        batch_statistics: BatchNorm layers normalise with each batch's own statistics instead of their
            running ones (which belong to the dense model and drift once layers are pruned); the running
            statistics are left untouched.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    if batch_statistics:
        for norm in module.modules():
            if isinstance(norm, BATCH_NORMS):
                norm.train()
    try:
        with kept_norm_statistics(module) if batch_statistics else nullcontext():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class StopForward(Exception):
    """Raised by a forward hook to end the current forward pass of :meth:`Calibration.feed` early."""


def _stack_items(source: Dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs and labels of dataset items ``x``, ``(x,)`` or ``(x, y, ...)``; labels ``None`` if any is missing."""
    inputs, labels = [], []
    for index in indices:
        item = source[index]
        x, y = _split_batch(item)
        inputs.append(x)
        labels.append(None if y is None else int(y))
    if any(y is None or y < 0 for y in labels):
        return torch.stack(inputs), None
    return torch.stack(inputs), torch.tensor(labels)


def sample_calibration(source: Dataset, size: int, seed: int, balanced: bool = False) -> Calibration:
    """Draws ``size`` samples from ``source`` by ``seed`` (optionally class-balanced)."""
    labels = getattr(source, "labels", None)
    indices = sample_indices(len(source), size, seed, labels=labels, balanced=balanced)
    inputs, targets = _stack_items(source, indices.tolist())
    return Calibration(inputs, targets, digest(indices), indices)


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | int | None]:
    """``x`` or ``(x, y, ...)`` -> ``(x, y or None)``; also used for single dataset items."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        label = batch[1] if len(batch) > 1 and isinstance(batch[1], (torch.Tensor, int)) else None
        return batch[0], label
    raise CalibrationError(
        f"a calibration batch must be a tensor or a tuple (x, y, ...) of tensors, got {type(batch).__name__}"
    )


def as_calibration(calib: object) -> Calibration:
    """Turns any supported calibration input into a :class:`Calibration`.

    Args:
        calib: a :class:`Calibration`, a tensor of inputs, a Dataset of ``(x, y)`` items, a DataLoader,
            or an iterable of batches ``x`` or ``(x, y, ...)``.

    Raises:
        CalibrationError: the data is empty or of a kind that is not supported.
    """
    if isinstance(calib, Calibration):
        result = calib
    elif isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or len(calib) == 0:
            raise CalibrationError("calibration tensor is empty; give at least one sample")
        result = Calibration(calib, None, digest(calib))
    elif isinstance(calib, Dataset) and hasattr(calib, "__len__") and not isinstance(calib, Iterable):
        if len(calib) == 0:
            raise CalibrationError("calibration dataset is empty; give at least one sample")
        inputs, labels = _stack_items(calib, list(range(len(calib))))
        result = Calibration(inputs, labels, digest(inputs))
    elif isinstance(calib, Iterable):
        xs, ys = [], []
        for batch in calib:
            x, y = _split_batch(batch)
            xs.append(x)
            ys.append(y)
        if not xs or sum(len(x) for x in xs) == 0:
            raise CalibrationError("calibration data is empty; give at least one batch")
        inputs = torch.cat(xs)
        labels = torch.cat(ys) if all(y is not None for y in ys) else None
        result = Calibration(inputs, labels, digest(inputs))
    else:
        raise CalibrationError(
            f"unsupported calibration data {type(calib).__name__}; give a DataLoader, an iterable of "
            "batches, a Dataset or a tensor"
        )
    if len(result) == 0:
        raise CalibrationError("calibration data is empty; give at least one sample")
    return result
