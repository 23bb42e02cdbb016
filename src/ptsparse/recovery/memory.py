"""Memory savers for distillation on large models: mixed precision and gradient checkpointing of blocks.

* ``precision="bf16"`` runs the teacher's and student's forward passes and the objective under
  ``torch.autocast`` in bfloat16 (Conv/Linear in bf16, reductions and losses in fp32 as autocast decides);
  weights, gradients and optimizer state stay fp32. bf16 keeps fp32's exponent range, so no loss scaling
  is needed, which keeps every mask dynamics' gradient criterion valid unchanged. fp16 is not offered: it
  needs a gradient scaler whose skipped steps the mask dynamics would have to follow.
* ``grad_checkpointing`` wraps each block (:func:`ptsparse.blocks.find_blocks`) of the student in
  ``torch.utils.checkpoint``: its activations are recomputed in the backward pass instead of stored. The
  recomputation leaves BatchNorm running statistics as they were, so they are updated once per step, as
  without checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..norms import kept_norm_statistics

PRECISIONS = ("fp32", "bf16")


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
