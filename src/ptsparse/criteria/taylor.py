"""First-order Taylor importance of output channels (Molchanov et al., CVPR 2019; ``baselines.md`` §9).

Per calibration batch b and output channel c of a layer:

* followed by a BatchNorm (gamma, beta): ``t_c = gamma_c * dL/dgamma_c + beta_c * dL/dbeta_c`` (the "gate"
  form, which also covers what flows through skip connections);
* otherwise: ``t_c = sum over the filter of w * dL/dw`` (+ ``b_c * dL/db_c``).

Importance ``I_c = mean_b t_c^2`` (``aggregation="squared"``, the paper) or ``mean_b |t_c|`` (``"abs"``,
HALP's code). The loss is cross-entropy against the labels when every sample has one, else against the
dense model's arg-max predictions (a KL to the dense model has zero gradient at the dense model).
Scores are measured once on the dense model; a channel's score is repeated over its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Calibration
from ..errors import ConfigError
from ..patterns import Pattern
from ..targets import Target
from .base import CRITERIA

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def following_norms(model: nn.Module, targets: list[Target], example: torch.Tensor) -> dict[str, nn.Module]:
    """The BatchNorm that directly consumes each target's output, found by tracing one forward pass."""
    produced: dict[int, str] = {}
    consumers: dict[str, nn.Module] = {}
    hooks = [t.module.register_forward_hook(lambda m, i, o, name=t.name: produced.__setitem__(id(o), name))
             for t in targets]

    def on_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        name = produced.get(id(inputs[0]))
        if name is not None:
            consumers.setdefault(name, module)

    hooks += [m.register_forward_pre_hook(on_norm) for m in model.modules() if isinstance(m, _NORMS)]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return consumers


@CRITERIA.register("taylor")
class Taylor:
    """First-order Taylor importance per output channel; for the ``channel`` pattern only.

    Args:
        aggregation: ``"squared"`` (mean of squared per-batch scores) or ``"abs"``.
        batch_size: calibration batch size of the per-batch scores.
    """

    requires_data = True
    statistics: tuple[str, ...] = ()
    patterns = ("channel",)

    def __init__(self, aggregation: str = "squared", batch_size: int = 64) -> None:
        if aggregation not in ("squared", "abs"):
            raise ConfigError(f"taylor_aggregation {aggregation!r} is not allowed; choose squared or abs")
        self.aggregation, self.batch_size = aggregation, batch_size

    @classmethod
    def from_config(cls, config) -> Taylor:
        return cls(aggregation=config.taylor_aggregation, batch_size=config.batch_size)

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        norms = following_norms(model, targets, calibration.inputs[:2].to(device))
        totals = {t.name: torch.zeros(t.shape[0], device=device) for t in targets}
        modes = {module: module.training for module in model.modules()}
        model.eval()  # running statistics stay untouched; gradients only
        batches = 0
        try:
            for x, y in calibration.batches(self.batch_size):
                x = x.to(device)
                model.zero_grad(set_to_none=True)
                logits = model(x)
                labels = y.to(device) if y is not None else logits.detach().argmax(1)
                F.cross_entropy(logits, labels).backward()
                for target in targets:
                    gate = self._gate(target, norms.get(target.name))
                    totals[target.name] += gate.pow(2) if self.aggregation == "squared" else gate.abs()
                batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            for module, mode in modes.items():
                module.training = mode
        return {t.name: (totals[t.name] / batches).view(-1, *([1] * (len(t.shape) - 1))).expand(t.shape).clone()
                for t in targets}

    @staticmethod
    def _gate(target: Target, norm: nn.Module | None) -> torch.Tensor:
        if norm is not None and norm.weight is not None and norm.weight.grad is not None:
            gate = norm.weight * norm.weight.grad
            if norm.bias is not None and norm.bias.grad is not None:
                gate = gate + norm.bias * norm.bias.grad
            return gate.detach()
        module = target.module
        gate = (module.weight * module.weight.grad).flatten(1).sum(1)
        if getattr(module, "bias", None) is not None and module.bias.grad is not None:
            gate = gate + module.bias * module.bias.grad
        return gate.detach()

    def prune_layer(self, target: Target, stats: dict[str, torch.Tensor], count: int,
                    pattern: Pattern) -> torch.Tensor:
        return pattern.mask(stats["scores"], count)
