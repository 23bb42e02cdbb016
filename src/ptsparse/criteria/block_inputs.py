"""Cached block inputs: a layer-by-layer criterion's pass over the calibration set runs one block, not the network.

A *chain* is a run of blocks (:func:`ptsparse.blocks.find_blocks`: residual blocks, transformer layers)
where each block's first input is the previous block's output, every other input (an attention mask,
position embeddings) is one the chain's first block received too, and each block runs once per forward.
For the layers inside a chain, the inputs of the current block are cached for every calibration batch
(in CPU memory with ``offload``, each batch moved to the device as the block runs on it, and the block itself
the only one on the device: :mod:`ptsparse.offload`); a layer's statistics pass runs that block alone on them,
and once the block's layers are pruned its outputs become the next block's inputs. That computes what full passes
through the partly pruned network compute (same batches, BatchNorm on batch statistics), at the cost of
one block per layer instead of the network up to it, and holds one block's inputs at a time. Under a
process group each rank caches only its turn of the batches (:func:`ptsparse.distributed.my_turns`), whose
statistics :func:`~ptsparse.criteria.statistics.gather_statistics_all` sums over the ranks.

The chains are checked on the first calibration batch by object identity, so a block fed by anything
else (a skip connection from further back, a tensor computed between blocks) starts a new chain, and a
model without blocks has none: its layers keep full passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..blocks import find_blocks
from ..data.calibration import Calibration, StopForward, inference_mode
from ..errors import ConfigError
from ..offload import HOME, Offload, moved, whole_model
from ..targets import Target

@dataclass
class Chain:
    """Blocks in order, each fed by the one before.

    Attributes:
        names: the blocks' qualified names.
        modules: the blocks.
        others: per block, its inputs after the first: ``(args[1:], kwargs)`` with every tensor replaced by
            the :class:`Slot` of the chain's first block's input it is.
    """

    names: list[str]
    modules: list[nn.Module]
    others: list[tuple[tuple, dict[str, Any]]]

    def index_of(self, layer: str) -> int | None:
        """Position of the block holding ``layer``, or ``None`` when no block of the chain does."""
        for index, name in enumerate(self.names):
            if layer.startswith(name + "."):
                return index
        return None


def _first_output(output: Any) -> torch.Tensor | None:
    """A block's output that the next block reads: the tensor, or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


@dataclass(frozen=True)
class Slot:
    """A tensor input of a chain's first block, by its path: an int for a positional argument or a str for a
    keyword, then the indices into the tuples, lists and dicts holding it (Llama's decoder layers take their
    rotary embeddings as a tuple ``position_embeddings=(cos, sin)``)."""

    path: tuple

    def of(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        key, *inner = self.path
        value = args[key] if isinstance(key, int) else kwargs[key]
        for index in inner:
            value = value[index]
        return value


def _tensor_paths(value: Any, path: tuple) -> Iterator[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in ``value`` and the tuples, lists and dicts inside it."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _tensor_paths(item, (*path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensor_paths(item, (*path, key))


def _mapped(value: Any, leaf: type, change: Callable[[Any], Any]) -> Any:
    """``value`` with every ``leaf`` inside its tuples, lists and dicts replaced by ``change(leaf)``."""
    if isinstance(value, leaf):
        return change(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_mapped(item, leaf, change) for item in value)
    if isinstance(value, dict):
        return {key: _mapped(item, leaf, change) for key, item in value.items()}
    return value


def find_chains(model: nn.Module, targets: Sequence[Target], calibration: Calibration, batch_size: int = 64,
                device: str | torch.device = "cpu", offload: Offload | None = None) -> list[Chain]:
    """The chains of blocks that hold targets, found on the first calibration batch (see the module docstring).

    Args:
        offload: the model is in CPU memory and runs on ``device`` one block at a time.

    Returns:
        The chains in execution order; empty when the model has no blocks.
    """
    try:
        names = find_blocks(model, targets)
    except ConfigError:
        return []
    modules = [model.get_submodule(name) for name in names]
    calls: list[tuple[int, tuple, dict[str, Any], Any]] = []  # (block, args, kwargs, output) in call order
    handles = [module.register_forward_hook(lambda m, a, k, o, i=i: calls.append((i, a, k, o)), with_kwargs=True)
               for i, module in enumerate(modules)]
    try:
        first = next(calibration.batches(batch_size))[0].to(device)
        with whole_model(offload), inference_mode(model, batch_statistics=True), torch.no_grad():
            model(first)
    finally:
        for handle in handles:
            handle.remove()
    counts = [sum(1 for call in calls if call[0] == i) for i in range(len(modules))]

    chains: list[Chain] = []
    previous_output: torch.Tensor | None = None
    slots: dict[int, Slot] = {}  # id of each tensor input of the chain's first block -> its slot

    def as_slots(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """A block's other inputs with each tensor as its slot; ``KeyError`` if one is not a first-block input."""
        return _mapped((args[1:], kwargs), torch.Tensor, lambda tensor: slots[id(tensor)])

    for index, args, kwargs, output in calls:
        if counts[index] != 1 or not args or not isinstance(args[0], torch.Tensor):
            previous_output = None
            continue
        others = None
        if chains and previous_output is not None and args[0] is previous_output:
            try:
                others = as_slots(args, kwargs)
            except KeyError:  # an input the chain's first block did not receive
                others = None
        if others is None:  # this block starts a new chain
            slots = {id(tensor): Slot(path) for key, value in [*enumerate(args), *kwargs.items()]
                     for path, tensor in _tensor_paths(value, (key,))}
            chains.append(Chain([], [], []))
            others = as_slots(args, kwargs)
        chains[-1].names.append(names[index])
        chains[-1].modules.append(modules[index])
        chains[-1].others.append(others)
        previous_output = _first_output(output)
    return chains


class BlockInputs:
    """The inputs of one block of a chain for every calibration batch, advanced block by block.

    Args:
        chain: the chain.
        inputs: per batch, the first block's ``(args, kwargs)``, tensors on the device, or in CPU memory with
            ``offload``.
        device: where the blocks run.
        offload: the model is in CPU memory: the held block moves to ``device`` while it runs (alone there), and
            the cached inputs stay in CPU memory, one batch at a time moved to ``device``.
    """

    def __init__(self, chain: Chain, inputs: list[tuple[tuple, dict[str, Any]]], device: str | torch.device,
                 offload: Offload | None = None) -> None:
        self.chain, self.device, self.offload = chain, device, offload
        self.storage = HOME if offload is not None else device  # where the cached inputs are
        self.position = 0
        self._start = inputs  # the first block's inputs (its other tensors feed every block's)
        self._current = [args[0] for args, _ in inputs]

    @classmethod
    def capture(cls, model: nn.Module, chain: Chain, calibration: Calibration, batch_size: int = 64,
                device: str | torch.device = "cpu", offload: Offload | None = None) -> BlockInputs:
        """Runs this rank's turn of the calibration batches up to the chain's first block and keeps that
        block's inputs (every batch without a process group)."""
        storage = HOME if offload is not None else device
        inputs: list[tuple[tuple, dict[str, Any]]] = []

        def keep(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            inputs.append((moved(args, storage), moved(kwargs, storage)))
            raise StopForward

        with whole_model(offload):
            # first among the block's hooks: the batch stops before offload would move the block in
            handle = chain.modules[0].register_forward_pre_hook(keep, with_kwargs=True, prepend=True)
            try:
                calibration.feed(model, batch_size, device, batch_statistics=True, shard=True)
            finally:
                handle.remove()
        return cls(chain, inputs, device, offload)

    @property
    def module(self) -> nn.Module:
        """The block whose inputs are held."""
        return self.chain.modules[self.position]

    def _batches(self) -> Iterator[tuple[tuple, dict[str, Any]]]:
        if self.offload is not None:
            self.offload.hold(self.module)
        args_rest, kwargs = self.chain.others[self.position]
        for main, (start_args, start_kwargs) in zip(self._current, self._start):
            args, kwargs_now = _mapped((args_rest, kwargs), Slot, lambda slot: slot.of(start_args, start_kwargs))
            yield moved((main, *args), self.device), moved(kwargs_now, self.device)

    @torch.no_grad()
    def feed(self) -> None:
        """Runs the held block on every cached batch (for hooks; :class:`StopForward` ends a batch early)."""
        with inference_mode(self.module, batch_statistics=True):
            for args, kwargs in self._batches():
                try:
                    self.module(*args, **kwargs)
                except StopForward:
                    pass

    @torch.no_grad()
    def advance(self, position: int) -> None:
        """Runs the blocks from the held one up to ``position`` (excluded); their outputs become the inputs."""
        while self.position < position:
            outputs = []
            with inference_mode(self.module, batch_statistics=True):
                for args, kwargs in self._batches():
                    outputs.append(_first_output(self.module(*args, **kwargs)).to(self.storage))
            self._current = outputs
            self.position += 1


def inputs_for(target: Target, chains: list[Chain], held: BlockInputs | None, model: nn.Module,
               calibration: Calibration, batch_size: int = 64, device: str | torch.device = "cpu",
               offload: Offload | None = None) -> BlockInputs | None:
    """The cached inputs of the block holding ``target`` (``held`` advanced, or captured anew), or ``None`` when no
    chain holds it."""
    for chain in chains:
        position = chain.index_of(target.name)
        if position is None:
            continue
        if held is None or held.chain is not chain or held.position > position:
            held = BlockInputs.capture(model, chain, calibration, batch_size, device, offload)
        held.advance(position)
        return held
    return None
