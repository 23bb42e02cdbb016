"""Per-layer sparsities learned by FCPTS (``iee.md`` §6, recipe step 1): run FCPTS first, keep its allocation.

The allocation declares ``stage = "fcpts"``: before allocating, :func:`ptsparse.sparsify` runs the ``fcpts``
method on a copy of the dense model with :func:`ptsparse.config.stage_config` (FCPTS's preset with every change
the run made to its own preset: scope, caps, sparsity, seed, device, distillation and memory settings), and
hands its report over. The
allocation returns the per-layer sparsities that run ended with. The weights it trained are thrown away: the
run that asked for the allocation prunes the dense model with its own criterion and trains with its own
dynamics. It costs one FCPTS run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget


@ALLOCATIONS.register("fcpts")
class LearnedThresholdAllocation(Allocation):
    """The per-layer sparsities an FCPTS run learns at the same target (see the module docstring)."""

    needs_context = True
    patterns = ("unstructured",)
    stage = "fcpts"
    offloadable = False  # its stage distils the whole model

    def __init__(self) -> None:
        self.report: Mapping[str, Any] | None = None

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        if context is None or context.stage_report is None:
            raise ConfigError("allocation 'fcpts' takes the sparsities of an FCPTS run; it needs that run's report")
        self.report = context.stage_report
        learned = {layer["name"]: layer["achieved"] for layer in self.report["layers"]}
        missing = [layer.name for layer in layers if layer.name not in learned]
        if missing:
            raise ConfigError(f"allocation 'fcpts' found other layers than the run: {', '.join(missing)}")
        return {layer.name: learned[layer.name] for layer in layers}

    def summary(self) -> dict[str, Any] | None:
        if self.report is None:
            return {}
        return {"fcpts_wall_time_s": self.report["wall_time_s"],
                "learned": {layer["name"]: layer["achieved"] for layer in self.report["layers"]}}
