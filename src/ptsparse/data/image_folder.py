"""Images in class folders (``root/<class>/<image>``, the ImageNet layout), read with Pillow."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """Images under ``root/<class>/``, resized, centre-cropped and normalised.

    The shorter side is resized to ``resize`` (default: the crop size), then the centre ``crop x crop``
    is taken, as a model's evaluation transform does.

    Args:
        root: the folder of class folders. Class indices follow sorted folder names.
        crop: output height and width.
        resize: shorter side before cropping; ``None`` means ``crop``.
        channels: 1 (greyscale) or 3 (RGB).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.

    Raises:
        DataError: the folder does not exist or holds no images.
    """

    def __init__(self, root: str | os.PathLike, crop: int = 28, resize: int | None = None,
                 channels: int = 1, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        from PIL import Image  # Pillow is a core dependency; imported here to keep `import ptsparse` light

        self._image = Image
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise DataError(f"image folder {self.root} holds no images in class sub-folders "
                            f"(suffixes {', '.join(IMAGE_SUFFIXES)})")
        self.labels = torch.tensor([label for _, label in self.samples])
        self.crop, self.resize, self.channels = crop, resize or crop, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with self._image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                width, height = image.size
                scale = self.resize / min(width, height)
                size = (max(self.crop, round(width * scale)), max(self.crop, round(height * scale)))
                image = image.resize(size, self._image.BILINEAR)
                left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
                image = image.crop((left, top, left + self.crop, top + self.crop))
                array = np.asarray(image, dtype=np.float32) / 255.0
        except OSError as error:
            raise DataError(f"cannot read image {path}: {error}") from None
        x = torch.from_numpy(array.reshape(self.crop, self.crop, self.channels)).permute(2, 0, 1)
        return (x - self.mean) / self.std, label
