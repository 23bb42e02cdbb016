"""Method presets: a method is a registered function that returns its picks, nothing else.

A preset takes the run's pattern (a preset may pick other parts for channels) and returns config keys: one
option on each axis (allocation, criterion, recovery, objective, dynamics) and the settings of the parts it
picks, by part (``{"distill": {"lr": 0.01}}``). :func:`ptsparse.config.resolve_config` lays them over the
defaults; keys the user gives win over them. A preset needing an algorithm of its own means a part is
missing: add the part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._registry import Registry

Preset = Callable[[str], dict[str, Any]]

METHODS: Registry[Preset] = Registry("method")

# The seed methods' distillation budget: 100 epochs of the calibration set (the default length), SGD lr 0.01
# with one epoch of warm-up then cosine, weight decay 3e-4, horizontal flips.
DISTILL_RECIPE: dict[str, Any] = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 3e-4, "augment": "flip"}
