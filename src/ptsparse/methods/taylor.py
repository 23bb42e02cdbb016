"""``taylor``: one-shot channel pruning by first-order Taylor importance (``baselines.md`` §9).

Whole output channels, the same fraction in every layer (the output layer stays whole), scored on the
dense model with cross-entropy against its own predictions, then BatchNorm re-calibration.
"""

from __future__ import annotations

import dataclasses

from ..config import SparsityConfig
from .base import METHODS


@METHODS.register("taylor")
def taylor(**overrides) -> SparsityConfig:
    base = SparsityConfig(method="taylor", pattern="channel", allocation="uniform", criterion="taylor",
                          taylor_aggregation="squared")
    return dataclasses.replace(base, **overrides)
