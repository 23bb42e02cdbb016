"""Model quality on held-out data: accuracy of a classifier, perplexity of a causal language model, and agreement
of a sparse model with its dense original."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from ._progress import progress
from .data import PackedText
from .errors import DataError


@torch.no_grad()
def predictions(model: nn.Module, data: Dataset, batch_size: int = 512, device: str = "cpu",
                show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max predictions and labels of ``model`` (in eval mode) over ``data``."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, y in progress(loader, show_progress, "evaluate"):
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512, device: str = "cpu",
             show_progress: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``data`` as a fraction in [0, 1].

    In a data-parallel run (:mod:`ptsparse.distributed`) every rank calls it: each predicts its contiguous part of
    ``data`` and the counts are summed.
    """
    rank, ranks = distributed.world()
    part = data if ranks == 1 else Subset(data, torch.tensor_split(torch.arange(len(data)), ranks)[rank].tolist())
    preds, labels = predictions(model, part, batch_size, device, show_progress)
    counts = distributed.all_reduce_(torch.tensor([float((preds == labels).sum()), float(len(labels))],
                                                  dtype=torch.float64))
    return float(counts[0] / counts[1])


def default_stride(max_length: int) -> int:
    """The stride of :func:`perplexity` unless given: half a window, so every token sees at least half a
    window of context (all of it near the start of the text)."""
    return max(1, max_length // 2)


def sliding_windows(tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a stream of ``tokens`` tokens: ``(begin, end, first)`` with tokens
    ``[begin, end)`` in the window and ``[first, end)`` scored, so every token but the first is scored once.

    Raises:
        DataError: ``max_length`` < 2, ``stride`` not in [1, max_length - 1], or fewer than 2 tokens.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"perplexity window (max length) must be an integer >= 2, got {max_length}")
    if not isinstance(stride, int) or not 1 <= stride < max_length:
        raise DataError(f"perplexity stride {stride} is not allowed; it must be in [1, {max_length - 1}] (windows "
                        f"of {max_length} tokens overlap, so the first token of each is predicted by the one before)")
    if tokens < 2:
        raise DataError(f"perplexity needs at least 2 tokens of text, got {tokens}")
    windows, scored_to = [], 1  # the first token has no context: never scored
    for begin in range(0, tokens, stride):
        end = min(begin + max_length, tokens)
        windows.append((begin, end, scored_to))
        scored_to = end
        if end == tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, max_length: int, stride: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu", show_progress: bool = False) -> float:
    """Perplexity of a causal language model on a token stream: ``exp`` of the mean negative log-likelihood of
    each token given the ones before it, by sliding windows (the Hugging Face recipe).

    Windows of ``max_length`` tokens start every ``stride`` tokens; each scores only the tokens the window
    before it did not (:func:`sliding_windows`), so every token after the first is scored exactly once, with
    at least ``max_length - stride`` tokens of context (fewer only at the start of the text).

    In a data-parallel run (:mod:`ptsparse.distributed`) every rank calls it: each scores its contiguous part of
    the windows, and the log-likelihood sums (float64) and token counts are summed over the ranks.

    Args:
        model: returns next-token logits ``(batch, seq, vocab)`` for token ids ``(batch, seq)``.
        tokens: the stream, int64 ``(tokens,)`` (:attr:`~ptsparse.data.PackedText.tokens`).
        max_length: tokens per window (at most what the model's positions allow).
        stride: tokens between window starts, in [1, max_length - 1]; default :func:`default_stride`.
        batch_size: windows per forward pass.

    Raises:
        DataError: a window setting is not allowed, the text is too short, or the model does not return
            ``(batch, seq, vocab)`` logits.
    """
    stride = default_stride(max_length) if stride is None else stride
    windows = sliding_windows(len(tokens), max_length, stride)
    rank, ranks = distributed.world()
    windows = windows if ranks == 1 else [windows[i] for i in torch.tensor_split(torch.arange(len(windows)),
                                                                                 ranks)[rank].tolist()]
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # negative log-likelihood, scored tokens
    batches = [windows[i: i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in progress(batches, show_progress, "perplexity"):
        for length in sorted({end - begin for begin, end, _ in batch}):  # windows of one length per pass
            same = [window for window in batch if window[1] - window[0] == length]
            ids = torch.stack([tokens[begin:end] for begin, end, _ in same]).to(device)
            logits = model(ids)
            if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                raise DataError(f"perplexity needs next-token logits (batch, seq, vocab) from a causal language "
                                f"model; the model returned shape {tuple(logits.shape)} for {tuple(ids.shape)}")
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1).double()  # position j predicts token j + 1
            positions = torch.arange(1, length, device=nll.device)
            scored = torch.stack([positions >= first - begin for begin, _, first in same])
            sums += torch.stack([nll[scored].sum(), scored.sum().double()]).cpu()
    model.train(was_training)
    sums = distributed.all_reduce_(sums)
    return math.exp(float(sums[0] / sums[1]))


def metric_of(data: Dataset) -> str:
    """What held-out ``data`` measures: ``"perplexity"`` for packed text (:class:`~ptsparse.data.PackedText`),
    else ``"accuracy"`` (a labelled dataset)."""
    return "perplexity" if isinstance(data, PackedText) else "accuracy"


def measure(model: nn.Module, data: Dataset, device: str | torch.device = "cpu", show_progress: bool = False) -> float:
    """:func:`metric_of` ``data`` for ``model``: perplexity over packed text (windows of its ``seq_len``, the
    default stride), else accuracy."""
    if isinstance(data, PackedText):
        return perplexity(model, data.tokens, data.seq_len, device=device, show_progress=show_progress)
    return accuracy(model, data, device=str(device), show_progress=show_progress)


def protocol(data: Dataset) -> dict[str, Any]:
    """How :func:`measure` scores ``data``, for the report."""
    if isinstance(data, PackedText):
        return {"metric": "perplexity", "max_length": data.seq_len, "stride": default_stride(data.seq_len),
                "scored_tokens": len(data.tokens) - 1}
    return {"metric": "accuracy", "samples": len(data)}


def agreement(model: nn.Module, reference: nn.Module, data: Dataset, batch_size: int = 512,
              device: str = "cpu") -> float:
    """Fraction of samples on which ``model`` and ``reference`` predict the same class."""
    ours, _ = predictions(model, data, batch_size, device)
    theirs, _ = predictions(reference, data, batch_size, device)
    return float((ours == theirs).float().mean())
