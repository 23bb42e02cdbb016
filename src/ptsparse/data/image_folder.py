"""Images in class folders (``root/<class>/<image>``, the ImageNet layout) or a flat folder of images, read with
Pillow and turned into tensors by a model's evaluation transform.

The built-in transform, :class:`ImageTransform`, is torchvision's ``ImageClassification`` evaluation
transform in plain Pillow: resize the shorter side (antialiased, long side truncated as torchvision does),
centre-crop, scale to [0, 1], normalise. Any other callable from a PIL image to a tensor can take its
place (``transform=``): ``ptsparse.models.zoo.image_transform`` gives timm's and Hugging Face's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# ImageNet statistics: the normalisation of torchvision's (and most timm) classification models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resize``, take the centre ``crop x crop``, scale to [0, 1], normalise.

    Matches torchvision's ``ImageClassification(crop_size, resize_size, mean, std, interpolation)`` on PIL
    images (the same Pillow resampling, size arithmetic and crop offsets).

    Attributes:
        crop: output height and width.
        resize: shorter side before cropping; ``None`` means ``crop``.
        channels: 1 (greyscale) or 3 (RGB).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: ``nearest``, ``bilinear``, ``bicubic`` or ``lanczos``.
    """

    crop: int
    resize: int | None = None
    channels: int = 3
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {self.channels}")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if not (isinstance(self.crop, int) and self.crop > 0) or (self.resize is not None and self.resize <= 0):
            raise DataError(f"image crop {self.crop} and resize {self.resize} must be positive integers")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise DataError(f"{name} {getattr(self, name)} needs 1 or {self.channels} values")

    def describe(self) -> dict:
        """The transform as plain data (for reports and messages)."""
        return {"resize": self.resize or self.crop, "crop": self.crop, "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("L" if self.channels == 1 else "RGB")
        resize = self.resize or self.crop
        width, height = image.size
        # torchvision's Resize(int): shorter side -> resize, longer side -> int(resize * long / short)
        if width <= height:
            size = (resize, int(resize * height / width))
        else:
            size = (int(resize * width / height), resize)
        size = (max(self.crop, size[0]), max(self.crop, size[1]))  # never smaller than the crop
        if size != image.size:
            image = image.resize(size, getattr(Image.Resampling, self.interpolation.upper()))
        left, top = int(round((size[0] - self.crop) / 2.0)), int(round((size[1] - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        array = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.reshape(self.crop, self.crop, self.channels).copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std


class ImageFolder(Dataset):
    """Images under ``root/<class>/`` (labelled) or directly under ``root`` (unlabelled), as tensors.

    With class folders, class indices follow sorted folder names and items are ``(x, label)``. A folder with
    no class folders but images of its own is read flat: items are ``(x, -1)``, ``labels`` is all ``-1`` and
    calibration sampled from it carries no labels.

    By default each image goes through :class:`ImageTransform` built from ``crop``, ``resize``, ``channels``,
    ``mean``, ``std`` and ``interpolation``; ``transform`` (a callable from a PIL image to a tensor, given the
    image in RGB) replaces it.

    Args:
        root: the folder of class folders, or of images.
        crop: output height and width.
        resize: shorter side before cropping; ``None`` means ``crop``.
        channels: 1 (greyscale) or 3 (RGB).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: resampling of the resize (``bilinear``, ``bicubic``, ...).
        transform: a model's own evaluation transform, used instead of the above.

    Raises:
        DataError: the folder does not exist or holds no images.
    """

    def __init__(self, root: str | os.PathLike, crop: int = 28, resize: int | None = None,
                 channels: int = 1, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 interpolation: str = "bilinear", transform: Callable | None = None) -> None:
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
        self.labelled = bool(self.samples)
        if not self.samples:  # no images in class folders: a flat folder of images, without labels
            self.samples = [(path, -1) for path in sorted(self.root.iterdir())
                            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
            if self.samples:
                self.classes = []
        if not self.samples:
            raise DataError(f"image folder {self.root} holds no images, neither in class sub-folders nor "
                            f"directly (suffixes {', '.join(IMAGE_SUFFIXES)})")
        self.labels = torch.tensor([label for _, label in self.samples])
        self.crop, self.resize, self.channels = crop, resize or crop, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform if transform is not None else ImageTransform(
            crop, resize, channels, tuple(float(m) for m in mean), tuple(float(s) for s in std), interpolation)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with self._image.open(path) as image:
                image.load()
                if not isinstance(self.transform, ImageTransform):
                    image = image.convert("RGB")
                x = self.transform(image)
        except OSError as error:
            raise DataError(f"cannot read image {path}: {error}") from None
        if not isinstance(x, torch.Tensor):
            raise DataError(f"the image transform returned {type(x).__name__} for {path}, not a tensor")
        return x, label
