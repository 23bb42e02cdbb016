"""SparseGPT: approximate OBS pruning with a weight update, one layer at a time (``baselines.md`` §8).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023.
On the 2-D view ``W`` (rows x c, per group for grouped convs) and ``H = 2 X X^T / n`` of the layer's
inputs, the columns are swept in blocks of ``B``; a pruned weight's error ``e = (w - 0) / U_jj`` is
spread over the not yet processed columns through ``U``, the upper Cholesky factor of ``H^-1``
(``H^-1 = U^T U``), so the kept weights compensate for it. The saliency of a weight is
``w^2 / U_jj^2`` on the weights as updated so far.

* unstructured: each block prunes the lowest saliencies of the whole ``rows x B`` block, ``z_b`` of them
  with ``z_b`` rounded cumulatively so the layer total is exactly the requested count (§13.1, our
  reading for exact counts). The rows of all groups of a grouped conv compete in one ranking, each
  with its own group's ``U`` (our reading: the rows of the layer's 2-D view, as for magnitude).
* N:M: each group of M inputs chooses, per row, its ``M - N`` lowest saliencies when the sweep reaches
  it. For convolutions the columns are permuted to (kernel offset, channel) order so that a group is M
  consecutive input channels at one kernel position (§8.6).
* channel: not supported.

Inputs whose ``H_jj`` is 0 (never active on the calibration set) get ``H_jj = 1`` and a zero weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..data import Calibration
from ..errors import CalibrationError, IncompatibleOptionsError
from ..options import Options, option, positive
from ..patterns import NM, Channel, Pattern
from ..targets import Target
from .base import CRITERIA, Criterion

CHANNEL_ERROR = "sparsegpt does not support pattern 'channel'; use unstructured or N:M"


class Segment(NamedTuple):
    """Columns ``[start, end)`` whose mask is chosen together when the sweep reaches ``start``.

    Either ``per_row`` weights of every row are pruned (N:M), or ``count`` weights anywhere in the
    segment's columns of all rows of all groups (unstructured).
    """

    start: int
    end: int
    per_row: int = 0
    count: int | None = None


def drop_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sets ``H_jj = 1`` and ``W[:, j] = 0`` where ``H_jj == 0`` (per group; shapes ``(G, r, c)``, ``(G, c, c)``).

    Returns the weight, the Hessian and the dead columns ``(G, c)``; the zeroed weights rank lowest, so the
    sweep prunes them first, and the caller restores those it keeps (more dead inputs than the prune count,
    e.g. 3x3 taps that only see padding on 1x1 maps, must not add zeros beyond the target).
    """
    dead = hessian.diagonal(dim1=1, dim2=2) == 0
    hessian = hessian.clone()
    hessian.diagonal(dim1=1, dim2=2)[dead] = 1.0
    return weight.masked_fill(dead[:, None, :], 0.0), hessian, dead


def inverse_factor(hessian: torch.Tensor, dampening: float = 0.01, tries: int = 8) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` per group, ``lambda = dampening * mean(diag H)``.

    A group whose factorisation fails is retried with ten times its dampening (§8.3).

    Raises:
        CalibrationError: the Hessian is not finite, or still not factorisable after ``tries`` attempts.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise CalibrationError("the input Hessian holds non-finite values (inf or NaN activations)")
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    mean_diagonal = hessian.diagonal(dim1=1, dim2=2).mean(1)
    fraction = torch.full_like(mean_diagonal, dampening)
    for _ in range(tries):
        lower, info = torch.linalg.cholesky_ex(hessian + (fraction * mean_diagonal)[:, None, None] * eye)
        failed = info != 0
        if not bool(failed.any()):
            factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            failed = info != 0
            if not bool(failed.any()):
                return factor
        fraction = torch.where(failed, fraction * 10, fraction)
    raise CalibrationError(f"the input Hessian is not positive definite even with dampening "
                           f"{float(fraction.max()):g} x mean(diag H)")


def _select(saliency: torch.Tensor, segment: Segment) -> torch.Tensor:
    """Marks (True = prune) of a segment's lowest saliencies ``(G, r, w)``, earlier positions first among equals."""
    if segment.count is None:
        order = torch.sort(saliency, dim=2, stable=True).indices
        rank = torch.arange(saliency.shape[2], device=saliency.device).expand_as(order)
        return torch.zeros_like(saliency, dtype=torch.bool).scatter_(2, order, rank < segment.per_row)
    # Rows of all groups compete, as rows of the layer's 2-D view (out, c).
    flat = saliency.flatten()
    marks = torch.zeros_like(flat, dtype=torch.bool)
    marks[torch.sort(flat, stable=True).indices[: segment.count]] = True
    return marks.view(saliency.shape)


def sparsegpt_sweep(weight: torch.Tensor, factor: torch.Tensor, blocks: list[tuple[int, int]],
                    segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    """The column sweep with lazy batch updates (§8.5), batched over groups.

    Args:
        weight: ``(G, r, c)`` float32.
        factor: ``(G, c, c)`` upper Cholesky factors of the inverse Hessians.
        blocks: consecutive column ranges covering ``[0, c)``; every segment lies inside one block.
        segments: where and how many weights are pruned.

    Returns:
        The updated weight (pruned entries exactly 0) and the pruned marks, both ``(G, r, c)``.
    """
    weight = weight.clone()
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    by_start = {segment.start: segment for segment in segments}
    for b0, b1 in blocks:
        block = weight[:, :, b0:b1].clone()
        block_factor = factor[:, b0:b1, b0:b1]
        diagonal = block_factor.diagonal(dim1=1, dim2=2)  # (G, w)
        errors = torch.zeros_like(block)
        marks = torch.zeros_like(block, dtype=torch.bool)
        for j in range(b1 - b0):
            segment = by_start.get(b0 + j)
            if segment is not None:  # chosen lazily, on the weights as updated so far
                s, e = segment.start - b0, segment.end - b0
                saliency = block[:, :, s:e].square() / diagonal[:, None, s:e].square()
                marks[:, :, s:e] = _select(saliency, segment)
            column = block[:, :, j]
            kept = column.masked_fill(marks[:, :, j], 0.0)
            error = (column - kept) / diagonal[:, j, None]
            block[:, :, j + 1:] -= error[:, :, None] * block_factor[:, None, j, j + 1:]
            block[:, :, j] = kept  # exact zeros, not w - e * U_jj
            errors[:, :, j] = error
        weight[:, :, b0:b1] = block
        pruned[:, :, b0:b1] = marks
        weight[:, :, b1:] -= torch.bmm(errors, factor[:, b0:b1, b1:])
    return weight, pruned


def unstructured_plan(rows: int, columns: int, count: int,
                      blocksize: int) -> tuple[list[tuple[int, int]], list[Segment]]:
    """Blocks of ``blocksize`` columns; each prunes its share of ``count`` over all ``rows`` of the layer.

    Block ``[b0, b1)`` prunes ``round(s * rows * b1) - round(s * rows * b0)`` with ``s = count / (rows *
    columns)``, so the shares add up to ``count`` exactly.
    """
    total = rows * columns

    def rounded(entries: int) -> int:
        return (2 * count * entries + total) // (2 * total)  # round(count * entries / total), half up

    blocks = [(b0, min(b0 + blocksize, columns)) for b0 in range(0, columns, blocksize)]
    segments = [Segment(b0, b1, count=rounded(rows * b1) - rounded(rows * b0)) for b0, b1 in blocks]
    return blocks, segments


def nm_plan(positions: int, channels: int, pattern: NM,
            blocksize: int) -> tuple[list[tuple[int, int]], list[Segment]]:
    """Groups of ``pattern.m`` consecutive channels at each kernel position, packed into blocks.

    Columns are in (kernel position, channel) order. A partial last group of ``k`` channels (the
    ``pad`` fallback) prunes ``max(0, k - n)``. Blocks end on group boundaries.
    """
    segments = []
    for position in range(positions):
        for start in range(0, channels, pattern.m):
            size = min(pattern.m, channels - start)
            first = position * channels + start
            segments.append(Segment(first, first + size, per_row=max(0, size - pattern.n)))
    blocks, b0 = [], 0
    for segment in segments:
        if segment.end - b0 > blocksize and segment.start > b0:
            blocks.append((b0, segment.start))
            b0 = segment.start
    blocks.append((b0, positions * channels))
    return blocks, segments


def reconstruction_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor, samples: int) -> float:
    """``||(W - W_new) X||_F^2`` over all input vectors, from ``H = 2 X X^T / n``: ``n/2 * tr(D H D^T)``."""
    delta = (before - after).double()
    return float(samples / 2 * (torch.bmm(delta, hessian.double()) * delta).sum())


@CRITERIA.register("sparsegpt")
class SparseGPT(Criterion):
    """OBS-style pruning with a weight update; layers pruned in execution order on the pruned model's inputs.

    ``scores`` (for score-driven allocations) is ``|w|``: SparseGPT's saliencies change during its sweep,
    so layer counts come from (normalised) magnitude (§4, our reading). After each layer,
    ``errors[layer name]`` holds ``||(W - W_new) X||_F^2`` over the layer's calibration input vectors.

    Args:
        blocksize: columns per block of the lazy batch update.
        dampening: ``lambda / mean(diag H)``; raised tenfold until the Cholesky factorisation succeeds.

    Raises:
        ConfigError: ``blocksize`` < 1 or ``dampening`` <= 0.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="sparsegpt"):
        blocksize: int = option(128, "columns per lazy-update block", minimum=1)
        dampening: float = option(0.01, "dampening as a fraction of mean(diag H), raised x10 on a failed Cholesky",
                                  check=positive)

    requires_data = True
    statistics = ("hessian",)
    patterns = ("unstructured", "n:m")

    def __init__(self, blocksize: int = 128, dampening: float = 0.01) -> None:
        self.Settings(blocksize=blocksize, dampening=dampening)
        self.blocksize, self.dampening = blocksize, float(dampening)
        self.errors: dict[str, float] = {}

    def layer_errors(self) -> dict[str, float]:
        return dict(self.errors)

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None = None) -> dict[str, torch.Tensor]:
        return {target.name: target.weight.detach().abs() for target in targets}

    @torch.no_grad()
    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor:
        """Prunes ``count`` weights and updates the kept ones in ``target.module.weight`` in place.

        Raises:
            IncompatibleOptionsError: the pattern is ``channel``.
            CalibrationError: the layer's Hessian cannot be factorised.
            ValueError: an N:M count differs from what the pattern prunes in this layer.
        """
        if isinstance(pattern, Channel):
            raise IncompatibleOptionsError(CHANNEL_ERROR)
        parameter = target.module.weight.data
        shape = parameter.shape
        keep_all = torch.ones(shape, dtype=torch.bool, device=parameter.device)
        if count == 0 or (isinstance(pattern, NM) and not pattern.eligible(shape)):
            self.errors[target.name] = 0.0
            return keep_all
        hessian = stats["hessian"].float()
        groups, columns = hessian.shape[0], hessian.shape[-1]
        weight = parameter.float().reshape(groups, -1, columns)
        order = None
        if isinstance(pattern, NM):
            if count != pattern.prune_count(shape):
                raise ValueError(f"N:M prunes {pattern.prune_count(shape)} weights of {target.name}, not {count}")
            channels, positions = shape[1], math.prod(shape[2:])
            if positions > 1:  # (channel, offset) -> (offset, channel) columns
                order = torch.arange(columns, device=weight.device).view(channels, positions).t().flatten()
                weight, hessian = weight[:, :, order], hessian[:, order][:, :, order]
            blocks, segments = nm_plan(positions, channels, pattern, self.blocksize)
        else:
            blocks, segments = unstructured_plan(shape[0], columns, count, self.blocksize)
        live_weight, live_hessian, dead = drop_dead_inputs(weight, hessian)
        try:
            factor = inverse_factor(live_hessian, self.dampening)
        except CalibrationError as error:
            raise CalibrationError(f"sparsegpt, layer {target.name}: {error}") from None
        updated, pruned = sparsegpt_sweep(live_weight, factor, blocks, segments)
        updated = torch.where(dead[:, None, :] & ~pruned, weight, updated)  # kept dead inputs: never seen non-zero
        self.errors[target.name] = reconstruction_error(weight, updated, hessian, int(stats["hessian_count"]))
        if order is not None:
            inverse = torch.argsort(order)
            updated, pruned = updated[:, :, inverse], pruned[:, :, inverse]
        parameter.copy_(updated.reshape(shape))
        return ~pruned.reshape(shape)
