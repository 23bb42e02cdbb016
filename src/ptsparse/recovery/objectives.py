"""Recovery objectives: what the sparse student minimises against the frozen dense teacher.

Contract: an objective is called with the student's and teacher's outputs (and, when ``needs_features``
is true, their targets' outputs by layer name) and returns named loss terms with ``"loss"`` as their sum.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .._registry import Registry
from ..errors import ConfigError

Features = dict[str, torch.Tensor]


class Objective(Protocol):
    """Returns named loss terms, ``"loss"`` being the one that is minimised."""

    needs_features: bool

    @classmethod
    def from_config(cls, config) -> Objective: ...

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, student_features: Features,
                 teacher_features: Features) -> dict[str, torch.Tensor]: ...


OBJECTIVES: Registry[type] = Registry("objective")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T)) * T^2``, summed over classes and averaged over the batch."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def output_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1) and averaged over the batch and positions."""
    return (student - teacher).pow(2).sum(1).mean()


@OBJECTIVES.register("kd_logits")
class KDLogits:
    """Logit distillation at temperature ``T`` (Hinton et al. 2015), the default of FCPTS and UniPTS.

    Args:
        temperature: softmax temperature (4 in both papers' code).
    """

    needs_features = False

    def __init__(self, temperature: float = 4.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    @classmethod
    def from_config(cls, config) -> KDLogits:
        return cls(temperature=config.temperature)

    def __call__(self, student, teacher, student_features, teacher_features):
        kd = kd_kl(student, teacher, self.temperature)
        return {"kd": kd, "loss": kd}


@OBJECTIVES.register("layer_mse")
class LayerMSE:
    """Sum over the targeted layers of the MSE between student and teacher layer outputs."""

    needs_features = True

    @classmethod
    def from_config(cls, config) -> LayerMSE:
        return cls()

    def __call__(self, student, teacher, student_features, teacher_features):
        terms = {name: output_mse(student_features[name], teacher_features[name]) for name in student_features}
        total = torch.stack(list(terms.values())).sum()
        return {"layer_mse": total, "loss": total}
