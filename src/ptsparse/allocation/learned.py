"""Per-layer sparsities learned by FCPTS (``iee.md`` §6, recipe step 1): run FCPTS first, keep its allocation.

The allocation runs the ``fcpts`` preset (ERK start, one learned magnitude threshold per layer, logit
distillation, exact projection) on a copy of the dense model with the run's scope (layer types, include,
exclude, caps), sparsity, seed, device and distillation length, and returns the per-layer sparsities it
ended with. The weights it trained are thrown away: the run that asked for the allocation prunes the
dense model with its own criterion and trains with its own dynamics. It costs one FCPTS run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .base import ALLOCATIONS, AllocationContext, LayerBudget

# What the FCPTS run shares with the run that asks for its allocation.
SHARED_FIELDS = ("layer_types", "include", "exclude", "layer_caps", "max_sparsity", "iterations", "batch_size",
                 "seed", "device", "teacher_bn", "checkpoint_every")


@ALLOCATIONS.register("fcpts")
class LearnedThresholdAllocation:
    """The per-layer sparsities an FCPTS run learns at the same target (see the module docstring).

    Args:
        shared: the run's values of :data:`SHARED_FIELDS`.
    """

    needs_scores = False
    needs_context = True
    patterns = ("unstructured",)

    def __init__(self, shared: Mapping[str, Any] | None = None) -> None:
        self.shared = dict(shared or {})
        self.report: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config) -> LearnedThresholdAllocation:
        return cls({name: getattr(config, name) for name in SHARED_FIELDS})

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        from ..sparsify import sparsify

        if context is None:
            raise ConfigError("allocation 'fcpts' trains on the model and calibration data; it needs a context")
        result = sparsify(context.model, context.calibration, method="fcpts", sparsity=sparsity, progress=False,
                          **self.shared)
        self.report = result.report
        learned = {layer["name"]: layer["achieved"] for layer in result.report["layers"]}
        missing = [layer.name for layer in layers if layer.name not in learned]
        if missing:
            raise ConfigError(f"allocation 'fcpts' found other layers than the run: {', '.join(missing)}")
        return {layer.name: learned[layer.name] for layer in layers}

    def summary(self) -> dict[str, Any]:
        if self.report is None:
            return {}
        return {"fcpts_wall_time_s": self.report["wall_time_s"],
                "learned": {layer["name"]: layer["achieved"] for layer in self.report["layers"]}}
