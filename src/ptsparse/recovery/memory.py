"""Memory savers for distillation on large models: mixed precision, gradient checkpointing of blocks, and the
student sharded over the ranks.

* ``precision="bf16"`` runs the teacher's and student's forward passes and the objective under
  ``torch.autocast`` in bfloat16 (Conv/Linear in bf16, reductions and losses in fp32 as autocast decides);
  weights, gradients and optimizer state stay fp32. bf16 keeps fp32's exponent range, so no loss scaling
  is needed, which keeps every mask dynamics' gradient criterion valid unchanged. fp16 is not offered: it
  needs a gradient scaler whose skipped steps the mask dynamics would have to follow.
* ``grad_checkpointing`` wraps each block (:func:`ptsparse.blocks.find_blocks`) of the student in
  ``torch.utils.checkpoint``: its activations are recomputed in the backward pass instead of stored. The
  recomputation leaves BatchNorm running statistics as they were, so they are updated once per step, as
  without checkpointing.
* ``shard="fsdp"`` (data-parallel runs): distillation trains a copy of the student whose parameters are sharded
  over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``, each block one unit, the rest the root's):
  each rank holds 1/N of the copy's parameters, gradients and optimizer state, and a block's full parameters
  only while it runs. Its gradients are averaged over the ranks as DistributedDataParallel's are, so the steps
  are the same. The masks stay parametrizations of the copy: a forward pass gathers each stored weight whole and
  masks it, so pruned weights stay zero; outside a forward pass a masked weight is a shard, which is why only
  masks that do not move (dynamics ``static``) can be sharded. At the end (and at checkpoints) the full values
  are gathered into the student on every rank. The student is still held whole while its copy trains (pruning
  needed it whole on one device), as is the teacher: what sharding saves is the training state.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import distributed
from ..norms import kept_norm_statistics

PRECISIONS = ("fp32", "bf16")
SHARDS = ("none", "fsdp")


def autocast(precision: str, device: str | torch.device) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device``'s type (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextmanager
def checkpointed(model: nn.Module, blocks: Sequence[str]) -> Iterator[None]:
    """Within the context, each named block of ``model`` recomputes its activations during backward.

    Only forward passes that train (module in train mode, gradients enabled) are checkpointed; the
    blocks' own ``forward`` is restored on exit.
    """
    modules = [model.get_submodule(name) for name in blocks]
    own_forwards = [module.__dict__.get("forward") for module in modules]  # usually none: the class's
    for module in modules:
        forward = module.forward

        def checkpointed_forward(*args, _module=module, _forward=forward, **kwargs):
            if not (_module.training and torch.is_grad_enabled()):
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), kept_norm_statistics(_module)), **kwargs)

        module.forward = checkpointed_forward
    try:
        yield
    finally:
        for module, own in zip(modules, own_forwards):
            if own is None:
                del module.forward  # the class's forward shows again
            else:
                module.forward = own


def sharded_copy(model: nn.Module, blocks: Sequence[str], device: torch.device) -> nn.Module:
    """A copy of ``model`` whose parameters FSDP2 shards over the ranks on ``device``: each named block is one
    unit (its parameters gathered while it runs), the rest of the model the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    mesh = init_device_mesh(device.type, (distributed.world()[1],))
    for name in blocks:
        fully_shard(sharded.get_submodule(name), mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def gather_into(model: nn.Module, sharded: nn.Module) -> None:
    """Writes the full values of ``sharded``'s parameters and buffers into ``model``, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.load_state_dict(get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)))


def full_states(sharded: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full (unsharded) state dicts of ``sharded`` and its optimizer on the CPU, for a checkpoint; rank 0 alone
    receives them (the others get empty ones), but every rank must call this (a collective)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(sharded, options=options),
            get_optimizer_state_dict(sharded, optimizer, options=options))


def load_full_states(sharded: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                     optimizer_state: dict[str, Any]) -> None:
    """Loads full state dicts (of :func:`full_states`) into ``sharded`` and its optimizer, each rank keeping its
    shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(sharded, model_state, options=options)
    set_optimizer_state_dict(sharded, optimizer, optimizer_state, options=options)
