"""Offload: the model stays in CPU memory and its blocks visit the device one at a time.

With ``offload`` a run keeps the model's parameters and buffers in CPU memory and moves onto the device only what
is running:

* a layer-by-layer criterion's pass on a block's cached inputs (:mod:`ptsparse.criteria.block_inputs`) moves that
  block alone (:meth:`Offload.hold`), and it stays there while its layers are pruned;
* a pass through the whole model (probing, evaluation, the passes that produce a chain's first inputs or gather
  the statistics of a layer outside every block) runs inside :meth:`Offload.whole`: the modules outside the
  blocks (embeddings, stem, final norm, output layer) move onto the device for the pass, and each block moves
  there as it is called, the block before it going back first.

So at most one block's weights are on the device at a time. The blocks are the ones cached block inputs use
(:func:`ptsparse.blocks.find_blocks`, found automatically); a model without blocks moves whole in a whole-model
pass. Moving a module keeps its parameter objects (``Module.to`` swaps their data), so targets, masks and tied
weights stay attached. Only passes without gradients can run this way: a pass that trains or differentiates
through the whole model (distillation, Taylor scores) needs it all on the device, so ``offload`` refuses those
parts (``offloadable`` in each part's declaration). Distillation's own memory savers are in
:mod:`ptsparse.recovery.memory`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .blocks import find_blocks
from .errors import ConfigError
from .targets import Target

HOME = torch.device("cpu")


class Offload:
    """Moves a model's blocks between CPU memory and ``device``, one block on the device at a time.

    Args:
        model: the model, in CPU memory.
        blocks: the qualified names of its blocks (none: the model moves whole).
        device: where passes run.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str], device: str | torch.device) -> None:
        self.model, self.device = model, torch.device(device)
        self.block_names = tuple(blocks)
        self.blocks = [model.get_submodule(name) for name in blocks]
        self.resident: nn.Module | None = None  # the block on the device, if any
        self._whole = False  # inside whole()

    @classmethod
    def of(cls, model: nn.Module, targets: Sequence[Target], device: str | torch.device) -> Offload:
        """An offload of ``model`` by the blocks found automatically (those cached block inputs use)."""
        try:
            blocks = find_blocks(model, targets)
        except ConfigError:
            blocks = []
        return cls(model, blocks, device)

    def move(self, module: nn.Module, resident: bool, recurse: bool = True) -> None:
        """Moves ``module``'s parameters and buffers (its own only, unless ``recurse``) onto the device, or back to
        CPU memory: the one place where they change device."""
        where = self.device if resident else HOME
        module._apply(lambda tensor: tensor.to(where), recurse=recurse)

    def hold(self, block: nn.Module | None) -> None:
        """Puts ``block`` on the device, after moving the block there before it back (``None``: none there)."""
        if block is self.resident:
            return
        if self.resident is not None:
            self.move(self.resident, False)
        self.resident = None
        if block is not None:
            self.move(block, True)
            self.resident = block

    def _outside(self) -> list[nn.Module]:
        """The modules outside every block (read each time: attaching a mask adds modules)."""
        return [module for name, module in self.model.named_modules()
                if not any(name == block or name.startswith(block + ".") for block in self.block_names)]

    @contextmanager
    def whole(self) -> Iterator[None]:
        """Within the context, a forward pass of the whole model runs on the device with one block there at a time
        (inputs of the model are moved there too); everything is back in CPU memory on exit. Nested, it does
        nothing more."""
        if self._whole:
            yield
            return
        self._whole, outside, handles = True, self._outside(), []
        try:
            for module in outside:
                self.move(module, True, recurse=False)
            handles = [block.register_forward_pre_hook(lambda block, args: self.hold(block), prepend=True)
                       for block in self.blocks]
            handles.append(self.model.register_forward_pre_hook(
                lambda model, args, kwargs: (moved(args, self.device), moved(kwargs, self.device)),
                prepend=True, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.hold(None)
            for module in outside:
                self.move(module, False, recurse=False)
            self._whole = False


def whole_model(offload: Offload | None) -> AbstractContextManager:
    """``offload.whole()``, or nothing to do without offload (the model is on the device already)."""
    return offload.whole() if offload is not None else nullcontext()


def moved(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor inside its tuples, lists and dicts moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(item, device) for item in value)
    if isinstance(value, dict):
        return {key: moved(item, device) for key, item in value.items()}
    return value
