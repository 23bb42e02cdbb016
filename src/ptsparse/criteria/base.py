"""The criterion axis: a score per weight saying how much the model needs it (higher = keep).

Contract: ``scores(model, targets, calibration)`` returns ``{layer name: tensor of the weight's shape}``.
A criterion that needs calibration data says so with ``requires_data``; one that needs none ignores it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .._registry import Registry
from ..data import Calibration
from ..targets import Target


class Criterion(Protocol):
    """Scores every weight of every target; the result has the weight's shape."""

    requires_data: bool

    @classmethod
    def from_config(cls, config) -> Criterion: ...

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]: ...


CRITERIA: Registry[type] = Registry("criterion")
