"""Calibration data: sources (Fashion-MNIST files, image folders, text files, tensors) and deterministic sampling."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .calibration import Calibration, as_calibration, digest, sample_calibration, sample_indices
from .fashion_mnist import MEAN, STD, FashionMNIST
from .image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageTransform
from .tensors import TensorSource
from .text import PackedText, TextLines

TEXT_PREFIX = "text:"


def load_source(name: str | os.PathLike, split: str = "train", root: str | os.PathLike | None = None,
                image_size: int = 28, channels: int = 1, transform: Callable | None = None,
                tokenizer: Callable | None = None, seq_len: int = 128, packed: bool = False) -> Dataset:
    """Resolves ``--data``: ``"fashion-mnist"``, ``"text:FILE"`` or the path of an image folder.

    Args:
        name: ``"fashion-mnist"``, ``"text:FILE"`` (for transformers: see ``packed``) or a directory
            of class folders (or a flat directory of images, read without labels).
        split: ``"train"`` or ``"test"`` for Fashion-MNIST; an image folder may hold ``train/`` and
            ``val/`` (or ``test/``) sub-folders, else the folder itself is used for both. A text file is
            the same for both.
        root: directory of the Fashion-MNIST files (overrides the environment variable).
        image_size: crop size for image folders without ``transform``.
        channels: channels for image folders without ``transform``. Greyscale folders are normalised with
            Fashion-MNIST's mean and standard deviation, as the reference model expects; RGB folders are
            scaled to [0, 1].
        transform: a model's evaluation transform (PIL image -> tensor, e.g. from
            :func:`ptsparse.models.zoo.image_transform`); replaces ``image_size`` and ``channels``.
        tokenizer: the tokenizer of ``text:`` data (:func:`ptsparse.models.zoo.load_tokenizer`).
        seq_len: tokens per ``text:`` sample.
        packed: read ``text:`` data as :class:`PackedText` (the whole file one token stream cut into windows of
            ``seq_len`` tokens: for causal language models) instead of :class:`TextLines` (one padded sample
            per line: for sequence classifiers).

    Raises:
        DataError: the name is neither known nor an existing directory or text file, or text data comes
            without a tokenizer.
    """
    if str(name) == "fashion-mnist":
        return FashionMNIST(split, root=root)
    if str(name).startswith(TEXT_PREFIX):
        if tokenizer is None:
            raise DataError(f"{str(name)!r}: text data needs a tokenizer; use a Hugging Face model whose "
                            "directory holds one (--model hf:DIR)")
        text = PackedText if packed else TextLines
        return text(str(name)[len(TEXT_PREFIX):], tokenizer, seq_len)
    path = Path(name)
    if not path.is_dir():
        raise DataError(f"unknown data {str(name)!r}; give 'fashion-mnist', 'text:FILE' or an existing image folder")
    candidates = ["train"] if split == "train" else ["val", "test"]
    for sub in candidates:
        if (path / sub).is_dir():
            path = path / sub
            break
    if transform is not None:
        return ImageFolder(path, transform=transform)
    stats = {"mean": (MEAN,), "std": (STD,)} if channels == 1 else {}
    return ImageFolder(path, crop=image_size, channels=channels, **stats)


def has_labels(source: Dataset) -> bool:
    """Whether every item of ``source`` carries a label (flat image folders and text files carry none)."""
    labels = getattr(source, "labels", None)
    return labels is not None and len(labels) > 0 and bool((labels >= 0).all())


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Calibration", "FashionMNIST", "ImageFolder", "ImageTransform",
           "PackedText", "TensorSource", "TextLines", "as_calibration", "digest", "has_labels", "load_source",
           "sample_calibration", "sample_indices"]
