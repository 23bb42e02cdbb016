"""Data parallelism on ``torch.distributed``: the process group, each rank's part of the work, and reductions.

A run is data-parallel when a default process group is initialised: by ``torchrun`` for the command line
(:func:`process_group`), or by the caller of :func:`ptsparse.sparsify`, who then calls it on every rank with
the same model, calibration data and config. Every rank holds the same calibration sample (it is small) and
computes on its own disjoint part of it: a contiguous slice of each global batch in distillation
(:func:`local_batch`; DistributedDataParallel averages the gradients), whole batches in turn for BatchNorm
statistics (:func:`my_turns`, then summed with :func:`all_reduce_`). Rank 0 alone writes. Without a group,
or with a world of one, every helper is the identity, so a single process runs the same code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from itertools import islice
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError

T = TypeVar("T")

# How long a rank waits in a collective for the others before the run fails (torchrun also ends every rank
# as soon as one exits with an error).
TIMEOUT = timedelta(minutes=10)


def world() -> tuple[int, int]:
    """This process's rank and the number of ranks: ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes (always true without a process group)."""
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (or another launcher setting its variables) started this process as one of many."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextmanager
def process_group(timeout: timedelta = TIMEOUT) -> Iterator[None]:
    """Within the context, the default process group of a ``torchrun`` launch exists (the command line's).

    gloo carries CPU tensors and, where CUDA is available, NCCL carries CUDA tensors, each rank using the GPU of
    its ``LOCAL_RANK``. Nothing happens without ``torchrun`` or when a group already exists.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index is this rank's GPU under a process group (``torchrun`` sets it from
    ``LOCAL_RANK``; a caller who initialised the group sets it with ``torch.cuda.set_device``)."""
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def local_batch(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (sizes differ by at most one sample between ranks)."""
    rank, size = world()
    return batch if size == 1 else torch.tensor_split(batch, size)[rank]


def my_turns(items: Iterable[T]) -> Iterator[T]:
    """The items this rank handles when the ranks take them in turn: ``rank``, ``rank + world``, ..."""
    rank, size = world()
    return islice(items, rank, None, size)


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the ranks in place (nothing without a group) and returns it."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def digest_of(tensors: Iterable[torch.Tensor]) -> str:
    """A SHA-256 hex digest of the tensors' values, in order."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def same_on_every_rank(value: str | Iterable[torch.Tensor], what: str) -> None:
    """Checks that every rank holds the same ``value``: a string, or tensors compared by :func:`digest_of` (only
    digested under many ranks).

    Raises:
        DistributedError: some rank holds another value; the message names ``what`` and the ranks that differ.
    """
    size = world()[1]
    if size == 1:
        return
    if not isinstance(value, str):
        value = digest_of(value)
    values: list[str | None] = [None] * size
    dist.all_gather_object(values, value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise DistributedError(f"{what} differ between ranks: rank(s) {', '.join(map(str, differing))} do not "
                               f"match rank 0")
