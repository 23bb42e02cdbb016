"""Layer-wise reconstruction (POT; ``baselines.md`` §11): each masked layer, alone, learns to reproduce
the dense layer's outputs on the dense model's inputs.

Per layer, in execution order: optional weight correction (rescale each output channel's kept weights so
the filter keeps its dense mean and spread), optional bias correction (the bias that makes the sparse
layer's mean output per channel equal the dense one), then Adam on the kept weights and the bias against
the dense outputs, cached over the calibration set, one random batch per iteration, stopping early once
the loss is below ``stop_loss``.

Our reading (``baselines.md`` §11.6, ``fold_bn=False``): BatchNorm is not folded; the convolution's own
output is reconstructed and BatchNorm is re-calibrated at the end, so the exported model keeps the
original architecture.

Layers are independent: each learns from the dense model's inputs and outputs, never from another sparse layer,
and draws its batches from a generator seeded by the run's seed and its position. Data-parallel
(:mod:`ptsparse.distributed`), the ranks therefore share the layers, not the samples: layer ``i`` (in execution
order) is cached, corrected and reconstructed on rank ``i % world`` alone, on the whole calibration set, and its
weight and bias are then broadcast from that rank. Each layer gets exactly the single process's computation; the
masks are the same, and the weights equal one process's up to the float rounding of a different thread count.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .._progress import progress
from ..data import Calibration
from ..masking import mask_of, trainable
from ..targets import Target
from .objectives import output_mse


def cache_layer_io(model: nn.Module, name: str, calibration: Calibration, batch_size: int,
                   device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs of module ``name`` of ``model`` (eval mode) over the calibration set."""
    module = model.get_submodule(name)
    inputs, outputs = [], []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(output.detach())

    handle = module.register_forward_hook(record)
    try:
        calibration.feed(model, batch_size, device)
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


@torch.no_grad()
def correct_weights(module: nn.Module) -> None:
    """POT weight correction: per output channel c, ``W_c <- r_c * W_c + m_c`` with
    ``r_c = std(W_c) / std(W_c * M_c)`` and ``m_c = mean(W_c) - mean(r_c * W_c * M_c)``."""
    mask = mask_of(module)
    if mask is None:
        return
    weight = trainable(module)
    dense = weight.flatten(1)
    sparse = (weight * mask).flatten(1)
    ratio = dense.std(1) / (sparse.std(1) + 1e-9)
    shift = dense.mean(1) - (ratio[:, None] * sparse).mean(1)
    corrected = ratio[:, None] * dense + shift[:, None]
    weight.copy_(corrected.view_as(weight))


def _per_channel(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(channels, everything else): Linear keeps channels last, convolutions in dimension 1."""
    return output.movedim(-1 if isinstance(module, nn.Linear) else 1, 0).flatten(1)


@torch.no_grad()
def correct_bias(module: nn.Module, inputs: torch.Tensor, dense_outputs: torch.Tensor, batch_size: int) -> None:
    """Adds to the bias the mean (over samples and positions) of dense minus sparse outputs per channel."""
    if getattr(module, "bias", None) is None:
        return
    total, count = torch.zeros_like(module.bias), 0
    for start in range(0, len(inputs), batch_size):
        gap = _per_channel(dense_outputs[start: start + batch_size] - module(inputs[start: start + batch_size]), module)
        total += gap.sum(1)
        count += gap.shape[1]
    trainable(module, "bias").add_(total / count)  # behind its mask under the channel pattern


def _trained(module: nn.Module) -> list[torch.Tensor]:
    """What reconstruction changes: the stored weight, then the bias if there is one (behind their masks)."""
    bias = [trainable(module, "bias")] if getattr(module, "bias", None) is not None else []
    return [trainable(module), *bias]


def reconstruct_layers(student: nn.Module, teacher: nn.Module, targets: list[Target], calibration: Calibration, *,
                       iterations: int = 2000, lr_weight: float = 1e-5, lr_bias: float = 1e-4,
                       batch_size: int = 64, weight_correction: bool = True, bias_correction: bool = True,
                       stop_loss: float = 1e-5, seed: int = 0, device: str | torch.device = "cpu",
                       show_progress: bool = False) -> dict[str, float]:
    """Reconstructs every target of ``student`` against the same-named layer of ``teacher``.

    Returns:
        The final reconstruction loss per layer.
    """

    def reconstruct(item: tuple[int, Target]) -> tuple[float]:
        index, target = item
        module = target.module
        inputs, dense_outputs = cache_layer_io(teacher, target.name, calibration, batch_size, device)
        if weight_correction:
            correct_weights(module)
        if bias_correction:
            correct_bias(module, inputs, dense_outputs, batch_size)
        optimizer = torch.optim.Adam([{"params": [tensor], "lr": lr}
                                      for tensor, lr in zip(_trained(module), (lr_weight, lr_bias))])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        loss = torch.tensor(float("inf"))
        for _ in range(iterations):
            batch = torch.randint(len(inputs), (batch_size,), generator=generator)
            loss = output_mse(module(inputs[batch]), dense_outputs[batch])
            if float(loss.detach()) < stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (float(loss.detach()),)

    losses = distributed.computed_in_turns(list(enumerate(targets)), reconstruct, 1,
                                           lambda mine: progress(mine, show_progress, "reconstruct layers"))
    ranks = distributed.world()[1]
    for index, target in enumerate(targets):
        distributed.broadcast_(_trained(target.module), index % ranks)
    return {target.name: loss for target, (loss,) in zip(targets, losses)}
