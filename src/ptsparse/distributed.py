"""Data parallelism on ``torch.distributed``: the process group, each rank's part of the work, and reductions.

A run is data-parallel when a default process group is initialised: by ``torchrun`` for the command line
(:func:`process_group`), or by the caller of :func:`ptsparse.sparsify`, who then calls it on every rank with
the same model, calibration data and config. Every rank holds the same calibration sample (it is small) and
computes on its own disjoint part of it: a contiguous slice of each global batch in distillation
(:func:`local_batch`; DistributedDataParallel averages the gradients), whole batches in turn for BatchNorm
statistics (:func:`my_turns`, then summed with :func:`all_reduce_`), whole items in turn for independent pieces
of work (search candidates, :func:`computed_in_turns`). Rank 0 alone writes. Decisions the ranks
make each on their own (masks) are checked with :func:`same_on_every_rank`, and an error on one rank ends every
rank with its message (:func:`failures_shared`). Without a group, or with a world of one, every helper is the
identity, so a single process runs the same code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from itertools import islice
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError, PeerFailedError, first_line

T = TypeVar("T")

# How long a rank waits in a collective for the others before the run fails (torchrun also ends every rank
# as soon as one exits with an error).
TIMEOUT = timedelta(minutes=10)
# Where a failing rank leaves its error in the process group's store for the others: FAILURE_KEY/<rank>.
FAILURE_KEY = "ptsparse/failure"


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


def computed_in_turns(items: Sequence[T], compute: Callable[[T], Sequence[float]], width: int,
                      wrap: Callable[[range], Iterable[int]] = iter) -> list[tuple[float, ...]]:
    """``compute(item)`` for every item: each rank computes its turn of them (:func:`my_turns`: item ``i`` on rank
    ``i % world``), and every rank gets every result, in item order.

    The ``width`` floats of each result travel in float64, added to zeros, so every rank receives exactly the
    values the rank that computed them had. ``compute`` must not enter a collective (the ranks compute different
    items at the same time). ``wrap`` wraps the range of this rank's item indices (a progress bar).
    """
    rank, size = world()
    values = torch.zeros(len(items), width, dtype=torch.float64)
    for index in wrap(range(rank, len(items), size)):
        values[index] = torch.tensor([float(value) for value in compute(items[index])], dtype=torch.float64)
    if size > 1:
        on_device = values.to(_collective_device())
        dist.all_reduce(on_device)
        values = on_device.cpu()
    return [tuple(row) for row in values.tolist()]


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], source: int) -> None:
    """Every rank's ``tensors`` take rank ``source``'s values, in place (nothing without a group)."""
    if world()[1] > 1:
        for tensor in tensors:
            dist.broadcast(tensor, source)


def digest_of(tensors: Iterable[torch.Tensor]) -> str:
    """A SHA-256 hex digest of the tensors' values, in order."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _collective_device() -> torch.device:
    """Where small tensors of a collective live: this rank's GPU for an NCCL-only group, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def same_on_every_rank(value: str | Iterable[torch.Tensor], what: str) -> None:
    """Checks that every rank holds the same ``value``: a string, or tensors compared by :func:`digest_of` (only
    digested under many ranks).

    Costs one all-reduce of two integers when the ranks agree; only when they do not are the values gathered, to
    name the ranks that differ.

    Raises:
        DistributedError: some rank holds another value; the message names ``what`` and the ranks that differ.
    """
    size = world()[1]
    if size == 1:
        return
    value = hashlib.sha256(value.encode()).hexdigest() if isinstance(value, str) else digest_of(value)
    key = int(value[:15], 16)  # 60 bits: its negation fits in int64
    extremes = torch.tensor([key, -key], device=_collective_device())
    dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
    if int(extremes[0]) == -int(extremes[1]):  # smallest == largest
        return
    values: list[str | None] = [None] * size
    dist.all_gather_object(values, value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    raise DistributedError(f"{what} differ between ranks: rank(s) {', '.join(map(str, differing))} do not "
                           f"match rank 0")


@contextmanager
def failures_shared() -> Iterator[None]:
    """Within the context (or the function it decorates), an error on one rank ends every rank, each knowing why.

    Under many ranks, an exception raised here on this rank (an interrupt too) is first left for the others in
    the process group's store. A collective that fails here because another rank ended (its connections
    closed as its process exited; otherwise after :data:`TIMEOUT`) raises :class:`PeerFailedError` instead of the
    backend's error, naming the rank that failed and its error where it left one.

    Raises:
        PeerFailedError: a collective failed because another rank ended.
    """
    rank, size = world()
    if size == 1:
        yield
        return
    store = dist.distributed_c10d._get_default_store()  # no public accessor; torch's own wrappers use it too
    store.delete_key(f"{FAILURE_KEY}/{rank}")  # what an earlier run in this process left
    try:
        yield
    except PeerFailedError:
        raise
    except BaseException as error:
        if _collective_failure(error):
            raise _peer_failure(store, rank, size, error) from None
        message = ("interrupted" if isinstance(error, KeyboardInterrupt)
                   else f"{type(error).__name__}: {first_line(error)}")
        try:
            store.set(f"{FAILURE_KEY}/{rank}", message)
        except Exception:  # noqa: BLE001  the store's host ended first: the others say a rank ended unheard
            pass
        raise


def _collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed (gloo raises a plain RuntimeError naming itself)."""
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in markers))


def _peer_failure(store: dist.Store, rank: int, size: int, error: BaseException) -> PeerFailedError:
    """The error of the lowest rank that left one in ``store``, else one that says a rank ended without a word.

    Raises:
        KeyboardInterrupt: that rank was interrupted (Ctrl-C reaches every rank, not all at once).
    """
    for other in (r for r in range(size) if r != rank):
        key = f"{FAILURE_KEY}/{other}"
        try:
            message = store.get(key).decode() if store.check([key]) else None
        except Exception:  # noqa: BLE001  the store is gone with the rank that hosted it
            break
        if message == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C reached that rank first: this run was interrupted, not failed
        if message is not None:
            return PeerFailedError(f"rank {other} failed: {message}", other)
    return PeerFailedError(f"another rank ended without an error message (killed?); rank {rank} saw: "
                           f"{first_line(error)}")
