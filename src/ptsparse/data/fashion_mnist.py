"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

Nothing is downloaded: the files are read from ``/usr/share/datasets/fashion-mnist`` unless a
directory is given, or set in the environment variable ``PTSPARSE_FASHION_MNIST_DIR``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "PTSPARSE_FASHION_MNIST_DIR"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the IDX files: ``root``, else the environment variable, else the default."""
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or plain) into an array.

    Raises:
        DataError: the file is not a valid IDX file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path} is truncated or corrupt: header says shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"Fashion-MNIST file {directory / (stem + '.gz')} not found; install it with "
        f"`{INSTALL_HINT}` or point {ENV_VAR} at a directory holding the IDX files"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST images as normalised float tensors of shape (1, 28, 28) with integer labels.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: directory of the IDX files; see :func:`data_dir`.
        normalize: subtract :data:`MEAN` and divide by :data:`STD`.

    Raises:
        DataError: a file is missing or corrupt; the message names the path and the install command.
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 normalize: bool = True) -> None:
        if split not in _FILES:
            raise DataError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
        directory = data_dir(root)
        images = read_idx(_find(directory, _FILES[split][0]))
        labels = read_idx(_find(directory, _FILES[split][1]))
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise DataError(f"Fashion-MNIST files in {directory} do not match: "
                            f"images {images.shape}, labels {labels.shape}")
        x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
        self.images = (x - MEAN) / STD if normalize else x
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
