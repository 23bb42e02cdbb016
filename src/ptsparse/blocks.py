"""Blocks: the repeated units of a network (residual blocks, transformer layers), whose outputs block-wise
objectives compare between the sparse student and the dense teacher.

Found automatically as the outermost modules that sit in a ``Sequential``/``ModuleList`` container and hold
two or more prunable layers, refined to the repeated units inside them where a found module holds two or
more such units itself (a timm ConvNeXt stage ``stages.0`` becomes ``stages.0.blocks.0``, ...). That gives:

========================================  ==============================================
model                                     blocks
========================================  ==============================================
the reference model                       ``stages.0.0`` ... ``stages.2.2``
torchvision ResNet                        ``layer1.0`` ... ``layer4.1``
torchvision MobileNetV2                   ``features.1`` ... ``features.17`` (inverted residuals)
torchvision RegNet                        ``trunk_output.block1.block1-0`` ...
timm ViT / DeiT                           ``blocks.0`` ... ``blocks.N``
timm ConvNeXt, Swin                       ``stages.0.blocks.0`` ..., ``layers.0.blocks.0`` ...
Hugging Face BERT / ViT (``hf:``)         ``hf.bert.encoder.layer.0`` ..., ``hf.vit.encoder.layer.0`` ...
Hugging Face Llama, Qwen2 (causal LMs)    ``hf.model.layers.0`` ... (decoder layers)
Hugging Face GPT-2                        ``hf.transformer.h.0`` ...
Hugging Face OPT                          ``hf.model.decoder.layers.0`` ...
========================================  ==============================================

Or named by the user with name globs (``blocks: ["layer*.*"]``), which replace the discovery.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from .errors import ConfigError
from .targets import Target

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def find_blocks(model: nn.Module, targets: Sequence[Target], names: Sequence[str] = ()) -> list[str]:
    """Qualified names of the model's blocks, in module order.

    Args:
        targets: the prunable layers (a block holds at least two of them).
        names: name globs choosing the blocks instead (``("stages.*",)``; ``*`` crosses dots, and a match
            inside another match is dropped); empty to discover them.

    Raises:
        ConfigError: a glob matches no module, or no block is found (the message says how to name them).
    """
    modules = dict(model.named_modules())
    if names:
        chosen = []
        for glob in names:
            matched = [name for name in modules if name and fnmatch.fnmatchcase(name, glob)]
            if not matched:
                raise ConfigError(f"block pattern {glob!r} matches no module of the model")
            chosen += [name for name in matched if name not in chosen]
        chosen = [name for name in modules if name in chosen]  # module order
        return [name for name in chosen if not any(name.startswith(outer + ".") for outer in chosen)]
    target_names = [t.name for t in targets]
    # candidates: non-container modules inside a container that hold two or more prunable layers
    candidates = []
    for name, module in modules.items():
        if not name or isinstance(module, _CONTAINERS):
            continue
        parent = modules[name.rpartition(".")[0]]
        held = sum(1 for t in target_names if t.startswith(name + "."))
        if isinstance(parent, _CONTAINERS) and held >= 2:
            candidates.append(name)
    blocks = _refine(_outermost(candidates), candidates)
    if not blocks:
        raise ConfigError("no blocks found automatically (modules inside a Sequential or ModuleList holding "
                          "two or more prunable layers); name them with `blocks`, e.g. ['layer*.*']")
    return blocks


def _outermost(names: list[str]) -> list[str]:
    """The names not inside another of ``names`` (module order kept)."""
    return [name for name in names if not any(name.startswith(other + ".") for other in names if other != name)]


def _refine(blocks: list[str], candidates: list[str]) -> list[str]:
    """Replaces each block that holds two or more candidate units by those units (recursively)."""
    refined = []
    for block in blocks:
        inner = _outermost([name for name in candidates if name.startswith(block + ".")])
        refined += _refine(inner, candidates) if len(inner) >= 2 else [block]
    return refined
