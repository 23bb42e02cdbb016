"""Calibration data: sources (Fashion-MNIST files, image folders, tensors) and deterministic sampling."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .calibration import Calibration, as_calibration, digest, sample_calibration, sample_indices
from .fashion_mnist import MEAN, STD, FashionMNIST
from .image_folder import ImageFolder
from .tensors import TensorSource


def load_source(name: str | os.PathLike, split: str = "train", root: str | os.PathLike | None = None,
                image_size: int = 28, channels: int = 1) -> Dataset:
    """Resolves ``--data``: ``"fashion-mnist"`` or the path of an image folder.

    Args:
        name: ``"fashion-mnist"`` or a directory of class folders.
        split: ``"train"`` or ``"test"`` for Fashion-MNIST; an image folder may hold ``train/`` and
            ``val/`` (or ``test/``) sub-folders, else the folder itself is used for both.
        root: directory of the Fashion-MNIST files (overrides the environment variable).
        image_size: crop size for image folders.
        channels: channels for image folders. Greyscale folders are normalised with Fashion-MNIST's
            mean and standard deviation, as the reference model expects; RGB folders are scaled to [0, 1].

    Raises:
        DataError: the name is neither known nor an existing directory.
    """
    if str(name) == "fashion-mnist":
        return FashionMNIST(split, root=root)
    path = Path(name)
    if not path.is_dir():
        raise DataError(f"unknown data {str(name)!r}; give 'fashion-mnist' or an existing image folder")
    candidates = ["train"] if split == "train" else ["val", "test"]
    for sub in candidates:
        if (path / sub).is_dir():
            path = path / sub
            break
    stats = {"mean": (MEAN,), "std": (STD,)} if channels == 1 else {}
    return ImageFolder(path, crop=image_size, channels=channels, **stats)


__all__ = ["Calibration", "FashionMNIST", "ImageFolder", "TensorSource", "as_calibration", "digest",
           "load_source", "sample_calibration", "sample_indices"]
