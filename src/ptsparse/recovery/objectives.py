"""Recovery objectives: what the sparse student minimises against the frozen dense teacher.

Contract: ``features(model, targets)`` names the modules whose outputs the objective compares (none
for logit distillation); the objective is then called with the student's and teacher's outputs and those
modules' outputs by name and the run's ``progress`` (fraction of steps done, for objectives with a schedule),
and returns named loss terms with ``"loss"`` as the one minimised.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import Registry
from ..blocks import find_blocks
from ..errors import ConfigError
from ..options import Options, Part, option, positive
from ..targets import Target

log = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]


class Objective(Part, abc.ABC):
    """Returns named loss terms, ``"loss"`` being the one that is minimised.

    Options are declared as ``Settings`` (:mod:`ptsparse.options`); :meth:`features` names the modules whose
    outputs the objective compares (none: logits only).
    """


    def features(self, model: nn.Module, targets: Sequence[Target]) -> list[str]:
        return []

    @abc.abstractmethod
    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, student_features: Features,
                 teacher_features: Features, progress: float = 0.0) -> dict[str, torch.Tensor]: ...


OBJECTIVES: Registry[type] = Registry("objective")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T)) * T^2``, summed over classes (the last dimension) and averaged over
    the rest: the batch, and for a language model's ``(batch, seq, vocab)`` logits every token position too."""
    log_student = F.log_softmax(student_logits.flatten(0, -2) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def channel_sum_mean(squares: torch.Tensor) -> torch.Tensor:
    """``squares`` summed over channels and averaged over the batch and positions. Channels are dim 1 (``(batch,
    channels, *spatial)``), except for a 3-D output, read as a transformer's ``(batch, tokens, hidden)``: summed over
    the hidden size, so the term does not grow with the sequence length (a Conv1d's ``(batch, channels, length)``
    output is then summed over its positions instead: the same up to a constant factor)."""
    return squares.sum(-1 if squares.dim() == 3 else 1).mean()


def output_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels and averaged over the batch and positions (:func:`channel_sum_mean`)."""
    return channel_sum_mean((student - teacher).pow(2))


@OBJECTIVES.register("kd_logits")
class KDLogits(Objective):
    """Logit distillation at temperature ``T`` (Hinton et al. 2015), the default of FCPTS and UniPTS.

    Args:
        temperature: softmax temperature (4 in both papers' code).
    """

    @dataclass(frozen=True)
    class Settings(Options, part="kd_logits"):
        temperature: float = option(4.0, "distillation temperature", check=positive)

    def __init__(self, temperature: float = 4.0) -> None:
        self.temperature = self.Settings(temperature=temperature).temperature

    def __call__(self, student, teacher, student_features, teacher_features, progress=0.0):
        kd = kd_kl(student, teacher, self.temperature)
        return {"kd": kd, "loss": kd}


@OBJECTIVES.register("layer_mse")
class LayerMSE(Objective):
    """Sum over the targeted layers of the MSE between student and teacher layer outputs."""

    def features(self, model, targets):
        return [t.name for t in targets]

    def __call__(self, student, teacher, student_features, teacher_features, progress=0.0):
        terms = {name: output_mse(student_features[name], teacher_features[name]) for name in student_features}
        total = torch.stack(list(terms.values())).sum()
        return {"layer_mse": total, "loss": total}


@OBJECTIVES.register("kd_blocks")
class KDBlocks(Objective):
    """Logit distillation plus the MSE between student and teacher at every block output (FCPTS's "local
    KD": a network-level sum of block losses, trained jointly, not block by block).

    Args:
        temperature: softmax temperature of the logit term.
        no_blocks: a model in which no blocks are found automatically: ``"error"``, or ``"logits"`` (the logit
            term alone, with a warning). Blocks named with ``blocks`` must always exist.
        normalize: ``"none"`` (the squared error summed over channels, FCPTS's form) or ``"teacher"`` (each block's
            error divided by the teacher's mean squared output there, so every block weighs the same whatever
            the scale of its activations)
        blocks: name globs of the blocks; empty to find them automatically (:func:`ptsparse.blocks.find_blocks`).
    """

    @dataclass(frozen=True)
    class Settings(Options, part="kd_blocks"):
        temperature: float = option(4.0, "temperature of the logit term", check=positive)
        no_blocks: str = option("error", "a model where no blocks are found automatically: error, or logits (the "
                                "logit term alone, with a warning)", choices=("error", "logits"))
        normalize: str = option("none", "block error: none (squared error summed over channels, FCPTS's) or teacher "
                                "(relative to the teacher's mean squared output, so every block weighs the same)",
                                choices=("none", "teacher"))

    def __init__(self, temperature: float = 4.0, no_blocks: str = "error", normalize: str = "none",
                 blocks: Sequence[str] = ()) -> None:
        self.logits = KDLogits(temperature)
        self.no_blocks, self.normalize = no_blocks, normalize
        self.blocks = tuple(blocks)

    @classmethod
    def from_config(cls, config) -> KDBlocks:
        return cls(**config.settings_of(cls).to_dict(), blocks=config.blocks)

    def features(self, model, targets):
        try:
            return find_blocks(model, targets, self.blocks)
        except ConfigError:
            if self.blocks or self.no_blocks == "error":
                raise
            log.warning("kd_blocks: no blocks found in the model; distilling the logits alone (name blocks with "
                        "--blocks to add their outputs)")
            return []

    def __call__(self, student, teacher, student_features, teacher_features, progress=0.0):
        kd = self.logits(student, teacher, {}, {})["kd"]
        if not student_features:
            return {"kd": kd, "block_mse": torch.zeros_like(kd), "loss": kd}
        errors = []
        for name in student_features:
            student_out, teacher_out = _tensor(student_features[name]), _tensor(teacher_features[name])
            error = output_mse(student_out, teacher_out)
            if self.normalize == "teacher":
                error = error / channel_sum_mean(teacher_out.pow(2)).clamp_min(1e-12)  # the teacher's output_mse from 0
            errors.append(error)
        blocks = torch.stack(errors).sum()
        return {"kd": kd, "block_mse": blocks, "loss": kd + blocks}


@OBJECTIVES.register("base_decayed")
class BaseDecayed(Objective):
    """UniPTS's base-decayed distillation (Xie et al., CVPR 2024; ``unipts.md`` §2).

    ``L = (T^2 / B) * sum_b sum_j p_bj * (ln p_bj - ln q_bj / tau)`` with ``p = softmax(z_teacher / T)``,
    ``q = softmax(z_student / T_s)`` and ``tau = tau0 * gamma ** (epochs * progress)``: the log base
    ``exp(tau)`` decays over training (from e^8 to about e^3 by default), so the gradient
    ``(T^2 / tau) (q - p) / B`` grows as the student nears the teacher. ``tau`` follows the run's progress,
    so it ends at the same value for any number of steps (the spec's reading for budgets other than 100
    epochs). ``L`` is not zero at the optimum; the plain ``KL(p || q)`` is logged beside it as ``kd``.

    Args:
        temperature: ``T`` of the teacher's softmax.
        student_temperature: ``T_s``; 1 as the authors' code (the student is pulled toward the softened
            teacher), or ``T`` for symmetric distillation. ``tau0=1, gamma=1, T_s=T`` is plain KD.
        tau0: the initial ``tau``.
        gamma: decay of ``tau`` per epoch.
        epochs: the epochs ``gamma`` is applied over (100 in the paper).
    """

    @dataclass(frozen=True)
    class Settings(Options, part="base_decayed"):
        temperature: float = option(4.0, "softmax temperature T of the teacher", check=positive)
        student_temperature: float = option(1.0, "softmax temperature of the student (1 as UniPTS's code)",
                                            check=positive)
        tau0: float = option(8.0, "initial log base tau", check=positive)
        tau_decay: float = option(0.99, "decay of tau per epoch", check=positive)
        tau_epochs: float = option(100.0, "epochs the decay spans, spread over the run (tau ends at tau0 * "
                                   "tau_decay ** tau_epochs)", minimum=0)

    def __init__(self, temperature: float = 4.0, student_temperature: float = 1.0, tau0: float = 8.0,
                 gamma: float = 0.99, epochs: float = 100.0) -> None:
        self.Settings(temperature, student_temperature, tau0, gamma, epochs)
        self.temperature, self.student_temperature = temperature, student_temperature
        self.tau0, self.gamma, self.epochs = tau0, gamma, epochs

    @classmethod
    def from_config(cls, config) -> BaseDecayed:
        settings = config.settings_of(cls)
        return cls(settings.temperature, settings.student_temperature, settings.tau0, settings.tau_decay,
                   settings.tau_epochs)

    def tau(self, progress: float) -> float:
        return self.tau0 * self.gamma ** (self.epochs * progress)

    def __call__(self, student, teacher, student_features, teacher_features, progress=0.0):
        tau = self.tau(progress)
        log_p = F.log_softmax(teacher / self.temperature, dim=-1)
        log_q = F.log_softmax(student / self.student_temperature, dim=-1)
        loss = (log_p.exp() * (log_p - log_q / tau)).sum(-1).mean() * self.temperature**2
        kd = (log_p.exp() * (log_p - log_q)).sum(-1).mean().detach()
        return {"kd": kd, "base_decayed": loss, "tau": torch.tensor(tau), "loss": loss}


def _tensor(output) -> torch.Tensor:
    """A block's output tensor (transformer layers return tuples whose first item is the hidden state)."""
    return output[0] if isinstance(output, (tuple, list)) else output
