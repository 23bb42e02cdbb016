"""First-order Taylor importance of output channels (Molchanov et al., CVPR 2019; ``baselines.md`` §9).

Per calibration batch b and output channel c of a layer:

* followed by a BatchNorm (gamma, beta): ``t_c = gamma_c * dL/dgamma_c + beta_c * dL/dbeta_c`` (the "gate"
  form, which also covers what flows through skip connections);
* otherwise: ``t_c = sum over the filter of w * dL/dw`` (+ ``b_c * dL/db_c``).

Importance ``I_c = mean_b t_c^2`` (``aggregation="squared"``, the paper) or ``mean_b |t_c|`` (``"abs"``,
HALP's code). The loss is cross-entropy against the labels when every sample has one, else against the
dense model's arg-max predictions (a KL to the dense model has zero gradient at the dense model); for a causal
language model (:func:`taylor_loss`), next-token cross-entropy on the calibration tokens themselves.
Scores are measured once on the dense model; a channel's score is repeated over its weights. Under a process
group each rank scores its turn of the batches (:func:`ptsparse.distributed.my_turns`; the model is in eval mode,
so a batch's gradients are one process's) and the float64 sums and batch counts are added over the ranks: the
scores equal one process's up to float64 rounding of the sum's order (about 1e-16 relative) before float32.

Coupled channels (our reading, so that pruned channels can be physically removed): channels that only
exist together (the outputs of layers added into one residual stream, a depthwise convolution and its
input) are scored and pruned as one unit, as under every criterion (:mod:`ptsparse.coupled`). Taylor's scores
estimate the change of the loss, one scale in every layer (``comparable_scores``), so a unit's score is the sum
of its members' scores as they are (every gate writing into the stream). Taylor requires the coupling: where
torch-pruning is missing or cannot trace the model, the run is refused before any gradient is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..data import Calibration
from ..norms import following_norms
from ..options import Options, option
from ..patterns import Pattern
from ..targets import Target
from .base import CRITERIA, Criterion


def taylor_loss(logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The loss whose gradients score channels: cross-entropy against ``labels``, else against the model's own
    arg-max predictions; for a causal language model (integer ``x`` of shape ``(batch, seq)``, logits
    ``(batch, seq, vocab)``), next-token cross-entropy on ``x`` itself, the loss it was trained on (unlabelled
    text carries its own targets, where the arg-max of a token would only echo the model)."""
    if logits.dim() == 3 and not x.is_floating_point() and x.shape == logits.shape[:2]:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return F.cross_entropy(logits, labels if labels is not None else logits.detach().argmax(1))


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """First-order Taylor importance per output channel; for the ``channel`` pattern only.

    Coupled channels are found with torch-pruning (``pip install 'ptsparse[export]'``); without it,
    :func:`~ptsparse.sparsify` raises :class:`~ptsparse.export.MissingExtraError` naming that command.

    Args:
        aggregation: ``"squared"`` (mean of squared per-batch scores) or ``"abs"``.
        batch_size: calibration batch size of the per-batch scores.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="taylor"):
        aggregation: str = option("squared", "mean of squared (paper) or absolute (HALP) per-batch channel scores",
                                  choices=("squared", "abs"))

    requires_data = True
    patterns = ("channel",)
    comparable_scores = True
    requires_coupling = True
    offloadable = False  # gradients through the whole model

    def __init__(self, aggregation: str = "squared", batch_size: int = 64) -> None:
        self.aggregation, self.batch_size = self.Settings(aggregation=aggregation).aggregation, batch_size

    @classmethod
    def from_config(cls, config) -> Taylor:
        return cls(**config.settings_of(cls).to_dict(), batch_size=config.batch_size)

    def scores(self, model: nn.Module, targets: list[Target],
               calibration: Calibration | None) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        norms = following_norms(model, targets, calibration.inputs[:2].to(device))
        totals = {t.name: torch.zeros(t.shape[0], dtype=torch.float64, device=device) for t in targets}
        modes = {module: module.training for module in model.modules()}
        model.eval()  # running statistics stay untouched; gradients only
        batches = torch.zeros((), dtype=torch.long, device=device)
        try:
            for x, y in distributed.my_turns(calibration.batches(self.batch_size)):
                x = x.to(device)
                model.zero_grad(set_to_none=True)
                taylor_loss(model(x), x, y.to(device) if y is not None else None).backward()
                for target in targets:
                    gate = self._gate(target, norms.get(target.name))
                    gate = gate.pow(2) if self.aggregation == "squared" else gate.abs()
                    totals[target.name] += gate.double()
                batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            for module, mode in modes.items():
                module.training = mode
        for total in (*totals.values(), batches):
            distributed.all_reduce_(total)
        channel = {name: (total / batches).float() for name, total in totals.items()}
        return {t.name: channel[t.name].view(-1, *([1] * (len(t.shape) - 1))).expand(t.shape).clone()
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
        return pattern.mask(stats["scores"], count, target.name)
