"""Attention heads: which output rows of each q/k/v projection layer belong to which head.

Layouts recognised (by attribute names, so no timm or transformers import is needed):

* timm ``Attention``: one fused Linear ``qkv`` (dim -> 3 * num_heads * head_dim) whose rows are laid out as
  ``(3, num_heads, head_dim)``, attributes ``num_heads``, ``head_dim`` (and ``attn_dim``), output projection
  ``proj``. A head's rows are its q, k and v rows: ``3 * head_dim`` of them.
* Hugging Face BERT-style self-attention: Linears ``query``, ``key``, ``value`` with rows laid out as
  ``(num_heads, head_dim)``, attributes ``num_attention_heads``, ``attention_head_size`` (and
  ``all_head_size``); the output projection is the sibling ``...attention.output.dense``.
* Hugging Face ``q_proj``/``k_proj``/``v_proj`` attention with ``num_attention_heads`` and ``head_dim`` (ViT in
  transformers 5); output projection ``o_proj``.

A module whose projections do not have ``heads * head_dim`` rows each (grouped-query attention, a head count
attribute out of date) is not recognised, and its layers are treated as any other layer.

Our reading: a head is pruned whole, in q, k and v at once. With its q, k and v rows (and their biases) zero,
the head's queries and keys are zero, so it attends uniformly, over values that are zero: the head outputs
exactly zero (zero values alone already give that), and removing it, with the output projection's input
columns it feeds, leaves the model's outputs unchanged. Pruning part of a head would leave heads of different
sizes, which no attention module can run once the rows are removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadLayout:
    """How one kind of attention module names its parts.

    Attributes:
        projections: names of its q/k/v Linear children (one name for a fused qkv layer).
        heads: attribute holding the head count.
        head_dim: attribute holding the rows per head of each of q, k and v.
        width: attribute holding ``heads * head_dim``, if the module has one (updated with the head count).
    """

    projections: tuple[str, ...]
    heads: str
    head_dim: str
    width: str | None = None

    @property
    def fused(self) -> bool:
        """One layer holds q, k and v, laid out as ``(3, heads, head_dim)``."""
        return len(self.projections) == 1


LAYOUTS = (
    HeadLayout(("qkv",), "num_heads", "head_dim", "attn_dim"),  # timm
    HeadLayout(("query", "key", "value"), "num_attention_heads", "attention_head_size", "all_head_size"),  # HF BERT
    HeadLayout(("q_proj", "k_proj", "v_proj"), "num_attention_heads", "head_dim"),  # HF ViT (transformers 5)
)


@dataclass(frozen=True)
class AttentionHeads:
    """The heads of one attention module.

    Attributes:
        name: qualified name of the attention module.
        module: the module itself.
        layout: its :class:`HeadLayout`.
        num_heads: heads it has.
        projections: projection layer name -> that layer's output rows of each head (``projections[p][h]`` are
            the rows of head ``h``), for the projections asked for.
    """

    name: str
    module: nn.Module
    layout: HeadLayout
    num_heads: int
    projections: dict[str, tuple[tuple[int, ...], ...]]

    def rows(self, layer: str) -> torch.Tensor:
        """Rows of ``layer`` per head, a ``(num_heads, rows per head)`` index tensor."""
        return torch.tensor(self.projections[layer])

    def rows_per_head(self, layer: str) -> int:
        return len(self.projections[layer][0])


def _recognise(module: nn.Module) -> HeadLayout | None:
    for layout in LAYOUTS:
        heads, head_dim = getattr(module, layout.heads, None), getattr(module, layout.head_dim, None)
        if not (isinstance(heads, int) and isinstance(head_dim, int) and heads > 0):
            continue
        layers = [getattr(module, name, None) for name in layout.projections]
        rows = (3 if layout.fused else 1) * heads * head_dim
        if all(isinstance(layer, nn.Linear) and layer.out_features == rows for layer in layers):
            return layout
    return None


def _head_rows(layout: HeadLayout, heads: int, head_dim: int) -> tuple[tuple[int, ...], ...]:
    if layout.fused:  # rows (3, heads, head_dim): q, k and v rows of head h
        width = heads * head_dim
        return tuple(tuple(part * width + h * head_dim + i for part in range(3) for i in range(head_dim))
                     for h in range(heads))
    return tuple(tuple(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads))


def find_attention(model: nn.Module, layers: Sequence[str] | None = None) -> list[AttentionHeads]:
    """The attention modules of ``model`` and the head rows of their q/k/v projections.

    Args:
        model: any model (not modified).
        layers: keep only these projection layers (the targets of a run); ``None`` keeps all. A module with
            none of them left is dropped.

    Returns:
        One :class:`AttentionHeads` per recognised attention module, in module order.
    """
    wanted = None if layers is None else set(layers)
    found = []
    for name, module in model.named_modules():
        layout = _recognise(module)
        if layout is None:
            continue
        heads, head_dim = getattr(module, layout.heads), getattr(module, layout.head_dim)
        rows = _head_rows(layout, heads, head_dim)
        prefix = f"{name}." if name else ""
        projections = {prefix + p: rows for p in layout.projections if wanted is None or prefix + p in wanted}
        if projections:
            found.append(AttentionHeads(name, module, layout, heads, projections))
    return found


def heads_by_layer(attentions: Sequence[AttentionHeads]) -> dict[str, AttentionHeads]:
    """Projection layer name -> the :class:`AttentionHeads` it belongs to."""
    return {layer: attention for attention in attentions for layer in attention.projections}


def update_head_counts(attentions: Sequence[AttentionHeads]) -> None:
    """Sets each module's head count (and width attribute) from its projections' rows, after heads were removed.

    The rows per head stay as they are: only whole heads are ever removed.
    """
    for attention in attentions:
        module, layout = attention.module, attention.layout
        head_dim = getattr(module, layout.head_dim)
        rows = getattr(module, layout.projections[0]).out_features // (3 if layout.fused else 1)
        setattr(module, layout.heads, rows // head_dim)
        if layout.width is not None and hasattr(module, layout.width):
            setattr(module, layout.width, rows)


def whole_heads(dead: torch.Tensor, members: Mapping[str, Sequence[int]],
                heads: Mapping[str, AttentionHeads]) -> torch.Tensor:
    """Narrows ``dead`` (per channel of a coupled group) to whole heads of the attention projections in it.

    Args:
        dead: per group channel, whether it can be removed.
        members: layer name -> its row for each group channel (``ChannelGroup.members``).
        heads: :func:`heads_by_layer` of the model.

    Returns:
        ``dead`` where a projection's row is dead only if every row of its head is; a group holding a
        projection keeps at least its first head.
    """
    dead = dead.clone()
    projections = [name for name in members if name in heads]
    for name in projections:
        channel_of = {row: channel for channel, row in enumerate(members[name])}
        for rows in heads[name].projections[name]:
            channels = torch.tensor([channel_of[row] for row in rows if row in channel_of], dtype=torch.long)
            whole = len(channels) == len(rows) and bool(dead[channels].all())
            dead[channels] = whole
    if projections and bool(dead.all()):
        name = projections[0]
        channel_of = {row: channel for channel, row in enumerate(members[name])}
        dead[torch.tensor([channel_of[row] for row in heads[name].projections[name][0]])] = False
    return dead
