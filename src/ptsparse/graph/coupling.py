"""Coupled output channels, found with torch-pruning's dependency graph.

Two layers' output channels are *coupled* when removing channel ``c`` of one forces removing a channel of
the other: layers whose outputs are added (residual streams), a depthwise convolution and its input, the
parts of a concatenation. torch-pruning traces the model once and groups every such dependency
(``DependencyGraph.get_all_groups``); a :class:`ChannelGroup` keeps, of each group, the prunable layers
that *produce* its channels and which of their output channels each group channel is.
:func:`head_groups` turns the groups of attention projections into groups whose channels are whole heads
(:mod:`ptsparse.attention`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .._extras import require
from ..attention import AttentionHeads
from ..errors import ExportError

PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels of several layers that can only be pruned together.

    Attributes:
        size: channels in the group.
        members: layer name -> its output channel for each of the group's channels (so
            ``members[name][c]`` is the channel of ``name`` that group channel ``c`` is); with ``width`` > 1,
            its ``width`` output channels (rows) for each group channel, one after the other.
        width: output rows of each member per group channel: 1, or a head's rows when the group's channels
            are attention heads (:func:`head_groups`).
    """

    size: int
    members: dict[str, tuple[int, ...]]
    width: int = 1

    def rows(self, name: str) -> torch.Tensor:
        """Output rows of member ``name`` per group channel, a ``(size, width)`` index tensor."""
        return torch.tensor(self.members[name]).view(self.size, self.width)


def head_group(attention: AttentionHeads, layers: Sequence[str]) -> ChannelGroup:
    """The heads of ``attention`` as a group of channels of its projections ``layers``."""
    return ChannelGroup(attention.num_heads,
                        {name: tuple(row for head in attention.projections[name] for row in head) for name in layers},
                        attention.rows_per_head(layers[0]))


def head_groups(groups: Sequence[ChannelGroup], heads: Mapping[str, AttentionHeads]) -> list[ChannelGroup]:
    """``groups`` with the channels of attention projections taken as whole heads.

    A group whose members are all projections of one attention module (torch-pruning couples the rows of
    separate q, k and v layers) becomes the group of its heads. A projection in a group with other layers,
    which the recognised layouts do not give, leaves that group and forms a head group of its own.

    Args:
        groups: coupled channel groups (:func:`channel_groups`).
        heads: projection layer name -> its attention heads (:func:`ptsparse.attention.heads_by_layer`).
    """
    result = []
    for group in groups:
        projections = [name for name in group.members if name in heads]
        owners = {heads[name].name for name in projections}
        if not projections:
            result.append(group)
        elif len(projections) == len(group.members) and len(owners) == 1:
            result.append(head_group(heads[projections[0]], projections))
        else:
            others = {n: m for n, m in group.members.items() if n not in heads}
            if others:
                result.append(ChannelGroup(group.size, others))
            result += [head_group(heads[name], [name]) for name in projections]
    return result


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode (BatchNorm statistics stay untouched) and restores the modes after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def build_dependency_graph(model: nn.Module, example: torch.Tensor):
    """torch-pruning's dependency graph of ``model`` traced on ``example`` (eval mode, model unchanged).

    Raises:
        MissingExtraError: torch-pruning is not installed.
        ExportError: torch-pruning cannot trace the model.
    """
    tp = require("torch_pruning", "coupled channel pruning")
    with eval_mode(model), torch.enable_grad():
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as error:  # torch-pruning raises plain exceptions of many kinds while tracing
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"torch-pruning cannot trace the model: {reason}") from None


def iter_groups(graph, model: nn.Module, ignored: Sequence[nn.Module] = ()):
    """Yields ``(torch-pruning group, ChannelGroup)`` for every group rooted at a Conv/Linear output."""
    names = {module: name for name, module in model.named_modules()}
    for group in graph.get_all_groups(root_module_types=PRODUCER_TYPES, ignored_layers=list(ignored)):
        size = len(group.items[0][1])
        members: dict[str, tuple[int, ...]] = {}
        for item in group.items:
            module = item.dep.target.module
            if not isinstance(module, PRODUCER_TYPES) or not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            mapping = [-1] * size
            for index, root in zip(item.idxs, item.root_idxs):
                mapping[int(root)] = int(index)
            if -1 not in mapping and module in names:
                members[names[module]] = tuple(mapping)
        yield group, ChannelGroup(size, members)


def channel_groups(model: nn.Module, example: torch.Tensor, layers: Sequence[str] | None = None) -> list[ChannelGroup]:
    """Groups of coupled output channels of the model's Conv and Linear layers.

    Args:
        model: the model (not modified; traced in eval mode).
        example: an input batch the model accepts.
        layers: keep only these layers in the groups (the targets of a run); ``None`` keeps all.

    Returns:
        One group per set of coupled channels that holds at least one of ``layers``.

    Raises:
        MissingExtraError: torch-pruning is not installed.
        ExportError: torch-pruning cannot trace the model.
    """
    graph = build_dependency_graph(model, example)
    wanted = None if layers is None else set(layers)
    groups = []
    for _, group in iter_groups(graph, model):
        members = {n: m for n, m in group.members.items() if wanted is None or n in wanted}
        if members:
            groups.append(ChannelGroup(group.size, members))
    return groups
