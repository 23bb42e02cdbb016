"""Text data for transformers: one padded sample per line (classifiers), or packed token windows (causal LMs).

``text:FILE`` (:func:`ptsparse.data.load_source`) reads the file one way or the other by the model's kind: a causal
language model gets :class:`PackedText` (the whole file one token stream, cut into windows of ``seq_len`` tokens,
the calibration of SparseGPT and Wanda, and what perplexity scores), a sequence classifier :class:`TextLines`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError


def _read(path: Path, seq_len: int) -> str:
    """The text of ``path``, after checking that it exists and that ``seq_len`` is allowed."""
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise DataError(f"sequence length must be an integer >= 2, got {seq_len}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read text file {path}: {error}") from None


class TextLines(Dataset):
    """The non-blank lines of a UTF-8 text file, each tokenised, truncated and padded to ``seq_len`` tokens.

    Items are ``(token_ids, -1)`` with ``token_ids`` an int64 tensor of shape ``(seq_len,)``; the data carries
    no labels. Padding uses the tokenizer's pad token (its end-of-text token when it has none); the Hugging
    Face wrapper of :mod:`ptsparse.models.zoo` masks the pad positions out of attention.

    Args:
        path: the text file.
        tokenizer: a Hugging Face tokenizer (``AutoTokenizer.from_pretrained(directory)``), or any callable
            taking ``(lines, seq_len)`` and returning an int64 tensor ``(len(lines), seq_len)``.
        seq_len: tokens per sample (special tokens included).

    Raises:
        DataError: the file is missing, unreadable or has no non-blank line, or ``seq_len`` < 2.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Callable, seq_len: int = 128) -> None:
        self.path = Path(path)
        lines = [line.strip() for line in _read(self.path, seq_len).splitlines()]
        self.lines = [line for line in lines if line]
        if not self.lines:
            raise DataError(f"text file {self.path} has no non-blank line; give one sample per line")
        self.seq_len = seq_len
        self.ids = tokenize(tokenizer, self.lines, seq_len)
        self.labels = torch.full((len(self.lines),), -1, dtype=torch.long)
        self.labelled = False

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.ids[index], -1


class PackedText(Dataset):
    """A UTF-8 text file as one token stream, cut into non-overlapping windows of ``seq_len`` tokens.

    The whole file is tokenised at once, with the tokenizer's own special tokens (Llama's begin-of-text token
    at the start, none for GPT-2); window ``i`` holds tokens ``[i * seq_len, (i + 1) * seq_len)`` and the tail
    shorter than a window is left out. Items are ``(window, -1)``: the windows carry no padding and no labels, and
    :func:`~ptsparse.data.sample_calibration` draws them by seed as it draws images. ``tokens`` holds the whole
    stream, which :func:`ptsparse.evaluate.perplexity` scores.

    Args:
        path: the text file.
        tokenizer: a Hugging Face tokenizer, or any callable taking the text and returning its token ids.
        seq_len: tokens per window.

    Raises:
        DataError: the file is missing or unreadable, ``seq_len`` < 2, or the text holds fewer tokens than one
            window.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Callable, seq_len: int = 128) -> None:
        self.path = Path(path)
        self.tokens = tokenize_stream(tokenizer, _read(self.path, seq_len))
        windows = len(self.tokens) // seq_len
        if windows == 0:
            raise DataError(f"text file {self.path} holds {len(self.tokens)} tokens, fewer than one window of "
                            f"--seq-len {seq_len}; give more text or a seq_len of at most {len(self.tokens)}")
        self.seq_len = seq_len
        self.windows = self.tokens[: windows * seq_len].view(windows, seq_len)
        self.labels = torch.full((windows,), -1, dtype=torch.long)
        self.labelled = False

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.windows[index], -1


def tokenize(tokenizer: Callable, lines: list[str], seq_len: int) -> torch.Tensor:
    """Token ids ``(len(lines), seq_len)`` of ``lines``: truncated and padded to ``seq_len``."""
    if not hasattr(tokenizer, "pad_token_id"):  # a plain callable
        ids = torch.as_tensor(tokenizer(lines, seq_len), dtype=torch.long)
    else:
        if tokenizer.pad_token_id is None:
            if getattr(tokenizer, "eos_token", None) is None:
                raise DataError("the tokenizer has neither a pad nor an end-of-text token to pad samples with")
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(lines, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        ids = encoded["input_ids"].long()
    if ids.shape != (len(lines), seq_len):
        raise DataError(f"the tokenizer gave token ids of shape {tuple(ids.shape)}, expected {(len(lines), seq_len)}")
    return ids


def tokenize_stream(tokenizer: Callable, text: str) -> torch.Tensor:
    """The token ids of ``text`` as one int64 stream ``(tokens,)``."""
    if hasattr(tokenizer, "pad_token_id"):  # a Hugging Face tokenizer; verbose=False: no warning for long text
        ids = torch.as_tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(tokenizer(text), dtype=torch.long)
    if ids.dim() != 1:
        raise DataError(f"the tokenizer gave token ids of shape {tuple(ids.shape)} for the text, expected one "
                        "stream (tokens,)")
    return ids
