"""Which layers are sparsified: discovery by module type and name glob, and weight counts.

A *target* is a module whose ``weight`` ptsparse prunes and counts. Sparsity is always counted over
the weights of the targets (never biases or norms), as the fraction of exact zeros.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError, UnknownOptionError

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}


@dataclass(frozen=True)
class Target:
    """One prunable layer.

    Attributes:
        name: the module's qualified name in the model (``"stages.0.0.conv1"``).
        module: the module itself (in the model being sparsified).
    """

    name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer computes with (masked, if a mask is attached)."""
        return self.module.weight

    @property
    def shape(self) -> torch.Size:
        return self.module.weight.shape

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    @property
    def fan_in(self) -> int:
        """Weights per output channel (``in_features``, or ``in_channels / groups * kernel volume``)."""
        return self.numel // self.shape[0]


def resolve_layer_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """Module classes for type names such as ``"Conv2d"``.

    Raises:
        UnknownOptionError: a name is not one of :data:`LAYER_TYPES`.
    """
    types = []
    for name in names:
        if name not in LAYER_TYPES:
            raise UnknownOptionError(f"unknown layer type {name!r}; choose from: {', '.join(LAYER_TYPES)}")
        types.append(LAYER_TYPES[name])
    return tuple(types)


def find_targets(
    model: nn.Module,
    layer_types: Sequence[str] = tuple(LAYER_TYPES),
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> list[Target]:
    """Finds the layers to sparsify, in module order.

    A layer is a target when its type is one of ``layer_types``, its qualified name matches a glob in
    ``include`` and none in ``exclude``. Grouped and depthwise convolutions are ordinary targets. A language
    model's output layer (:func:`output_embeddings`: ``lm_head``, often tied to the input embedding) never is:
    pruning it would drop vocabulary logits (and, tied, the embedding with them); globs may still name it.

    Raises:
        UnknownOptionError: a layer type is unknown, or an include/exclude glob matches no layer of
            those types (most often a typo); the message lists the layers that exist.
        ModelError: no layer is left to sparsify.
    """
    types = resolve_layer_types(layer_types)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, types) and isinstance(getattr(module, "weight", None), torch.Tensor)]
    names = [name for name, _ in candidates]
    kept_dense = output_embeddings(model)
    candidates = [(name, module) for name, module in candidates if module not in kept_dense]
    if not names:
        raise ModelError(f"the model has nothing to prune: it has no {'/'.join(layer_types)} layer")
    for glob in (*include, *exclude):
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UnknownOptionError(f"layer pattern {glob!r} matches no prunable layer; layers: {shown or 'none'}")
    targets = [
        Target(name, module)
        for name, module in candidates
        if any(fnmatch.fnmatchcase(name, g) for g in include)
        and not any(fnmatch.fnmatchcase(name, g) for g in exclude)
    ]
    if not targets:
        raise ModelError(
            f"the model has nothing to prune: no {'/'.join(layer_types)} layer is left after include "
            f"{list(include)} and exclude {list(exclude)}"
        )
    return targets


def output_embeddings(model: nn.Module) -> list[nn.Module]:
    """The output layers of the language models inside ``model``: what ``get_output_embeddings()`` of a
    transformers model returns (its ``lm_head``; ``None`` for classifiers)."""
    found = []
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        layer = get() if callable(get) else None
        if isinstance(layer, nn.Module) and layer not in found:
            found.append(layer)
    return found


def count_zeros(targets: Sequence[Target]) -> tuple[int, int]:
    """Exact zeros and total weights over ``targets`` (of the weights as the layers compute with them)."""
    zeros = total = 0
    with torch.no_grad():
        for target in targets:
            weight = target.weight
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros, total
