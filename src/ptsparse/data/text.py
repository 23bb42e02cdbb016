"""Text calibration for transformers: one sample per line, tokenised into fixed-length token-id rows."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError


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
        if not self.path.is_file():
            raise DataError(f"text file {self.path} does not exist")
        if not isinstance(seq_len, int) or seq_len < 2:
            raise DataError(f"sequence length must be an integer >= 2, got {seq_len}")
        try:
            lines = [line.strip() for line in self.path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read text file {self.path}: {error}") from None
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
