"""Calibration data held in memory as tensors."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import CalibrationError


class TensorSource(Dataset):
    """Inputs ``x`` (first dimension = samples) with optional labels ``y``.

    Items are ``(x_i, y_i)``, or ``(x_i, -1)`` when there are no labels.

    Raises:
        CalibrationError: ``x`` is empty, or ``y`` does not have one entry per sample.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or len(x) == 0:
            raise CalibrationError("calibration tensor is empty; give at least one sample")
        if y is not None and len(y) != len(x):
            raise CalibrationError(f"labels have {len(y)} entries but inputs have {len(x)} samples")
        self.x = x
        self.labels = y if y is not None else torch.full((len(x),), -1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.labels[index]
