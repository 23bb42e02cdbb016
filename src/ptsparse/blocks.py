"""Blocks: the repeated units of a network (residual blocks, transformer layers), whose outputs block-wise
objectives compare between the sparse student and the dense teacher.

Found automatically as the outermost modules that sit in a ``Sequential``/``ModuleList`` container and hold
two or more prunable layers (``stages.0.1`` of the reference model, ``layer1.0`` of a torchvision ResNet,
``blocks.3`` of a timm ViT, ``encoder.layer.5`` of a BERT), or named by the user with name globs.
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
    blocks: list[str] = []
    for name, module in modules.items():
        if not name or isinstance(module, _CONTAINERS) or any(name.startswith(b + ".") for b in blocks):
            continue
        parent = modules[name.rpartition(".")[0]]
        held = sum(1 for t in target_names if t.startswith(name + "."))
        if isinstance(parent, _CONTAINERS) and held >= 2:
            blocks.append(name)
    if not blocks:
        raise ConfigError("no blocks found automatically (modules inside a Sequential or ModuleList holding "
                          "two or more prunable layers); name them with `blocks`, e.g. ['layer*.*']")
    return blocks
