"""Patterns turn a score per weight and a prune count into a boolean mask (``True`` = kept).

* ``unstructured``: prune the lowest-scoring weights anywhere in the layer.
* ``N:M`` (e.g. ``2:4``): in every group of M consecutive weights along the input dimension keep the N
  highest. For convolutions the groups run along the input channels at a fixed kernel position, the
  layout sparse tensor cores expect (``baselines.md`` §6).
* ``channel``: prune whole output channels, scored by the mean of their weights' scores (a channel
  criterion repeats its channel score over the weights, so the mean is that score). The q/k/v projections
  of attention modules (:mod:`ptsparse.attention`) prune whole heads instead: a head's unit is its rows in
  that layer, its score the mean of their scores, and separate q, k and v layers prune the same heads.
  Channels coupled across layers (a residual stream, a depthwise convolution and its input) are pruned
  together, as one unit, whatever the criterion (:mod:`ptsparse.coupled`).

Each is registered in :data:`PATTERNS` under its kind (``unstructured``, ``channel``, ``n:m``); the options
of the channel and N:M patterns are their ``Settings`` (``channel_multiple``, ``nm_fallback``).

``mask`` and ``unit_size`` take the layer's qualified name, which only the channel pattern reads.

Ties are broken by position (the earlier weight is pruned first), so masks are deterministic.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ._registry import Registry
from .attention import AttentionHeads
from .errors import ConfigError
from .options import Options, option

if TYPE_CHECKING:
    from .coupled import CoupledUnits

log = logging.getLogger(__name__)

PATTERNS: Registry[type] = Registry("pattern")


def channel_scores(scores: torch.Tensor) -> torch.Tensor:
    """A score per output channel: the mean of its row's scores (in float64, so that a channel criterion's score,
    repeated over the row, comes back exactly)."""
    return scores.flatten(1).double().mean(1).float()


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` lowest scores, earlier positions first among equals."""
    order = torch.sort(scores.flatten().float(), stable=True).indices
    return order[:count]


@PATTERNS.register("unstructured")
@dataclass(frozen=True)
class Unstructured:
    """Any weight may be pruned on its own."""

    name: str = "unstructured"
    kind = "unstructured"

    def unit_size(self, shape: torch.Size, layer: str | None = None) -> int:
        return 1

    def mask(self, scores: torch.Tensor, prune: int, layer: str | None = None) -> torch.Tensor:
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[lowest(scores, prune)] = False
        return keep.view(scores.shape)


@PATTERNS.register("channel")
@dataclass(frozen=True)
class Channel:
    """Whole output channels (rows of a Linear weight, filters of a convolution) are pruned.

    Args:
        heads: attention projection layer name -> its module's heads (:func:`ptsparse.attention.heads_by_layer`
            of the run's targets). Those layers prune whole heads: the unit is one head's rows, and heads are
            ranked by the mean of their rows' scores. The projections of one attention module get equal head
            counts (:meth:`attention_of` keys them; see :func:`~ptsparse.allocation.exact_counts`) and prune
            the same heads: the first of them masked ranks its heads, and each prunes the lowest-ranked of that
            order (our reading: a per-layer criterion sees one layer's scores at a time). Where ``units`` holds
            them, they are a coupled unit instead.
        multiple: channels are pruned ``multiple`` at a time in every other layer whose width is a multiple of
            it, so the kept widths stay multiples of it too (8 or 16 suit the blocked CPU kernels of
            onnxruntime and oneDNN); a layer of another width prunes single channels.
        units: the coupled channel units of the run's layers (:class:`~ptsparse.coupled.CoupledUnits`): their
            members are planned and masked by unit (:func:`~ptsparse.criteria.prune_model`), not by
            :meth:`mask`; ``None`` where coupling could not be traced: every layer prunes on its own.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="channel"):
        multiple: int = option(1, "prune channels N at a time so kept widths stay multiples of N (8 suits "
                               "onnxruntime)", minimum=1)

    name: str = "channel"
    heads: Mapping[str, AttentionHeads] = field(default_factory=dict, compare=False, repr=False)
    multiple: int = 1
    units: CoupledUnits | None = field(default=None, compare=False, repr=False)
    _head_order: dict[str, torch.Tensor] = field(default_factory=dict, init=False, compare=False, repr=False)
    kind = "channel"

    def channel_size(self, shape: torch.Size, layer: str | None = None) -> int:
        """Weights of one prunable channel of the layer: a row, or a head's rows in an attention projection."""
        rows = self.heads[layer].rows_per_head(layer) if layer in self.heads else 1
        return rows * (shape.numel() // shape[0])

    def unit_size(self, shape: torch.Size, layer: str | None = None) -> int:
        together = self.multiple if layer not in self.heads and shape[0] % self.multiple == 0 else 1
        return together * self.channel_size(shape, layer)

    def pruned_channels(self, prune: int, shape: torch.Size, layer: str | None = None) -> int:
        """Channels (heads, in an attention projection) that ``prune`` weights amount to, in whole units."""
        unit = self.unit_size(shape, layer)
        return prune // unit * (unit // self.channel_size(shape, layer))

    def attention_of(self, layer: str) -> str | None:
        """The attention module whose whole heads ``layer`` prunes, or ``None`` for an ordinary layer."""
        attention = self.heads.get(layer)
        return attention.name if attention is not None else None

    def mask(self, scores: torch.Tensor, prune: int, layer: str | None = None) -> torch.Tensor:
        per_channel = channel_scores(scores)
        units = self.pruned_channels(prune, scores.shape, layer)
        keep = torch.ones(len(per_channel), dtype=torch.bool, device=scores.device)
        if layer in self.heads:
            attention = self.heads[layer]
            rows = attention.rows(layer).to(scores.device)
            order = self._head_order.get(attention.name)
            if order is None:
                order = lowest(per_channel[rows].mean(1), attention.num_heads)
                self._head_order[attention.name] = order
            keep[rows[order[:units]].flatten()] = False
        else:
            keep[lowest(per_channel, units)] = False
        return keep.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores).clone()


@PATTERNS.register("n:m")
@dataclass(frozen=True)
class NM:
    """N of every M consecutive weights along the input dimension are kept.

    Args:
        n: weights kept per group.
        m: group size.
        fallback: for a layer whose inputs per group are not a multiple of M, ``"skip"`` leaves it dense
            (with a warning) and ``"pad"`` pads the last group with virtual zeros that rank lowest, so a
            partial group of ``r`` real weights keeps ``min(n, r)``. A layer with fewer than M inputs per
            group (a depthwise conv, a 1- or 3-channel stem with M = 4) is never eligible.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="nm"):
        fallback: str = option("skip", "layers whose inputs are not a multiple of M: skip (stay dense) or pad",
                               choices=("skip", "pad"))

    n: int
    m: int
    fallback: str = "skip"
    kind = "n:m"

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    def unit_size(self, shape: torch.Size, layer: str | None = None) -> int:
        return 1

    def eligible(self, shape: torch.Size) -> bool:
        inputs = shape[1]
        if inputs < self.m:
            return False
        return inputs % self.m == 0 or self.fallback == "pad"

    def prune_count(self, shape: torch.Size) -> int:
        """Weights this pattern prunes in a layer of ``shape`` (0 when the layer is not eligible)."""
        if not self.eligible(shape):
            return 0
        inputs, positions = shape[1], shape.numel() // shape[1]
        full, rest = divmod(inputs, self.m)
        return positions * (full * (self.m - self.n) + max(0, rest - self.n))

    def mask(self, scores: torch.Tensor, prune: int | None = None, layer: str | None = None) -> torch.Tensor:
        shape = scores.shape
        if not self.eligible(shape):
            return torch.ones(shape, dtype=torch.bool, device=scores.device)
        # (out, in, *kernel) -> (out, *kernel, in): groups run along the input channels.
        moved = scores.float().movedim(1, -1)
        inputs = shape[1]
        padded = -(-inputs // self.m) * self.m
        if padded != inputs:
            fill = torch.full((*moved.shape[:-1], padded - inputs), float("-inf"), device=scores.device)
            moved = torch.cat([moved, fill], dim=-1)
        groups = moved.reshape(-1, self.m)
        order = torch.sort(groups, dim=1, stable=True, descending=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, order[:, : self.n], True)
        # Dropping the virtual columns leaves a partial group of r real weights keeping min(n, r).
        keep = keep.reshape(*moved.shape)[..., :inputs]
        expected = self.prune_count(shape)
        if prune is not None and prune != expected:
            raise ValueError(f"N:M prunes {expected} weights of this layer, not {prune}")
        return keep.movedim(-1, 1).contiguous()


Pattern = Unstructured | Channel | NM

_NM_SYNTAX = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(spec: str, nm_fallback: str = "skip") -> Pattern:
    """Parses ``"unstructured"``, ``"channel"`` or ``"N:M"`` (0 < N < M).

    Raises:
        ConfigError: the text is none of these, or N >= M.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"pattern must be a string, got {spec!r}")
    if spec == "unstructured":
        return Unstructured()
    if spec == "channel":
        return Channel()
    match = _NM_SYNTAX.match(spec)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(f"pattern {spec!r}: N:M needs 0 < N < M, got N={n}, M={m}")
        return NM(n, m, NM.Settings(fallback=nm_fallback).fallback)
    raise ConfigError(f"unknown pattern {spec!r}; choose 'unstructured', 'channel' or 'N:M' such as '2:4'")


def pattern_kind(spec: str) -> str:
    """The registered kind of a pattern text: ``unstructured``, ``channel`` or ``n:m``.

    Raises:
        ConfigError: the text is not a pattern.
    """
    return parse_pattern(spec).kind
