"""The cost model: parameters, MACs and wall-clock latency on the current device, and where zeros buy no speed.

MACs are counted with forward hooks on Conv and Linear layers (multiply-accumulates per sample, the
layers that dominate a CNN's cost; norms, activations, pooling and the products of attention scores are not
counted), Linear layers that their parent applies through ``F.linear`` included, and the q/k/v and output
projections of ``nn.MultiheadAttention`` (:mod:`.calls`). ``macs`` is what dense kernels compute,
``nonzero_macs`` what a kernel that skipped every zero weight would compute: the gap between them is the speed
that unstructured zeros promise and dense kernels do not deliver.

Latency is the median over ``repeats`` timed runs after ``warmup`` untimed ones, with
``torch.inference_mode``; on CUDA each run is synchronised. Throughput is ``batch / median``. The spread of
the runs comes with it: the quartiles ``q1_ms`` and ``q3_ms`` (linear interpolation between the sorted runs,
as ``numpy.quantile`` does by default), their difference ``iqr_ms``, ``min_ms`` and ``max_ms``. Runs are
*noisy* when the interquartile range is more than :data:`NOISY_IQR` (20%) of the median: on an idle machine
repeated forward passes differ by a few percent, so a larger spread means something else took the CPU or GPU
while timing, and the median alone is not to be trusted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .calls import attention_projections, layers_called_through
from .coupling import eval_mode

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# 2:4 kernels lose to dense ones on Linear layers with fewer inputs or outputs than this.
SMALL_FEATURES = 1024
# Timed runs are noisy when their interquartile range is more than this fraction of their median.
NOISY_IQR = 0.2


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element of every parameter tensor)."""
    return sum(p.numel() for p in model.parameters())


def output_positions(module: nn.Module, output: torch.Tensor) -> int:
    """Positions of ``output``, from a pass of one sample, at which a Conv/Linear layer applies its weights:
    MACs = weights * this.

    A convolution: its output positions per channel. A Linear layer: every leading position of its input, all of
    them: an attention that folds its windows into the leading dimension (Swin's) applies it once per window.
    """
    channels = module.out_channels if isinstance(module, CONV_TYPES) else module.out_features
    return output.numel() // channels


@dataclass(frozen=True)
class Application:
    """One product with a weight matrix in a pass of one sample: ``layer`` (a Conv/Linear layer; for an
    ``nn.MultiheadAttention``'s q, k or v, which have no layer, a Linear of that shape on the meta device) applied
    with ``weight`` (the real tensor, masked where a mask is attached) at ``positions`` positions."""

    name: str  # the layer's; an attention's q, k and v: "<attention>.in_proj.q", ...
    layer: nn.Module
    weight: torch.Tensor
    positions: int
    input_shape: tuple[int, ...]  # one sample's input of a convolution; (positions, in_features) for a Linear


@torch.no_grad()
def weight_applications(model: nn.Module, example: torch.Tensor) -> list[Application]:
    """Every product with a weight matrix that one sample (``example[:1]``) runs through ``model`` in eval mode, in
    execution order, once per call: each Conv/Linear call, a Linear that its parent applies through ``F.linear``
    (:func:`~ptsparse.graph.calls.layers_called_through`) and the four projections of an
    ``nn.MultiheadAttention`` (:func:`~ptsparse.graph.calls.attention_projections`). The model is not modified."""
    names = {module: name for name, module in model.named_modules()}
    found: list[Application] = []

    def on_output(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        positions = output_positions(module, output)
        shape = tuple(inputs[0].shape[1:]) if isinstance(module, CONV_TYPES) else (positions, module.in_features)
        found.append(Application(names[module], module, module.weight, positions, shape))

    def on_attention(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        for projection in attention_projections(module, args, kwargs):
            rows, inputs = projection.weight.shape
            if projection.out_proj is not None:
                layer, name = projection.out_proj, names[projection.out_proj]
            else:
                layer = nn.Linear(inputs, rows, projection.bias, device="meta")
                name = f"{names[module]}.in_proj.{projection.part}"
            found.append(Application(name, layer, projection.weight, projection.positions,
                                     (projection.positions, inputs)))

    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    applied_there = {id(m.out_proj) for m in attentions}
    hooks = [m.register_forward_hook(on_output) for m in model.modules()
             if isinstance(m, (*CONV_TYPES, nn.Linear)) and id(m) not in applied_there]
    hooks += [m.register_forward_hook(on_attention, with_kwargs=True) for m in attentions]
    try:
        with eval_mode(model), layers_called_through(model):
            model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return found


def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of the model's Conv and Linear layers (a Linear layer applied through
    ``F.linear`` by its parent, as in torchvision's Swin attention, too) and ``nn.MultiheadAttention``'s
    projections: :func:`weight_applications`.

    Args:
        model: the model (run once in eval mode; not modified).
        example: an input batch; the counts are divided by its batch size.

    Returns:
        ``{"macs": dense MACs, "nonzero_macs": MACs with non-zero weights only}`` per sample.
    """
    applications = weight_applications(model, example)
    return {"macs": sum(a.positions * a.weight.numel() for a in applications),
            "nonzero_macs": sum(a.positions * int(a.weight.count_nonzero()) for a in applications)}


def synchronize(device: str | torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, device: str | torch.device = "cpu",
                    warmup: int = 10, repeats: int = 50, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median latency of one forward pass of a batch, after warm-up.

    Args:
        model: the model; moved to ``device`` and put in eval mode.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``.
        batch_size: samples per forward pass.
        warmup: untimed runs first (allocator, kernel selection, caches).
        repeats: timed runs; the median is reported.

    Returns:
        The statistics of :func:`latency_stats`: ``median_ms``, ``throughput`` (samples per second) and the
        spread of the timed runs (per batch).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def run() -> None:
        model(x)
        synchronize(device)

    return time_runs(run, batch_size, warmup, repeats)


def time_runs(run: Callable[[], object], batch_size: int, warmup: int, repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Calls ``run`` ``warmup`` times untimed, then ``repeats`` times timed; the statistics of those times.

    Args:
        clock: seconds, read before and after each timed run (a fake one in tests).

    Returns:
        :func:`latency_stats` of the timed runs.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return latency_stats(times, batch_size)


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolating linearly between neighbours (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_stats(times: list[float], batch_size: int) -> dict[str, float]:
    """Statistics of timed runs of one batch.

    Args:
        times: seconds per run (at least one).
        batch_size: samples per run.

    Returns:
        In milliseconds per batch: ``median_ms``; ``p10_ms`` and ``p90_ms`` (nearest rank); the quartiles
        ``q1_ms`` and ``q3_ms`` and ``iqr_ms = q3_ms - q1_ms``; ``min_ms`` and ``max_ms``. Also ``relative_iqr``
        (``iqr_ms / median_ms``; above :data:`NOISY_IQR` the runs are noisy), ``runs`` (how many) and
        ``throughput`` (samples per second at the median).
    """
    ordered = sorted(times)
    median = statistics.median(ordered)
    q1, q3 = quantile(ordered, 0.25), quantile(ordered, 0.75)
    return {"median_ms": median * 1e3, "p10_ms": ordered[len(ordered) // 10] * 1e3,
            "p90_ms": ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)] * 1e3,
            "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": ordered[0] * 1e3, "max_ms": ordered[-1] * 1e3,
            "relative_iqr": (q3 - q1) / median if median > 0 else 0.0, "runs": len(ordered),
            "throughput": batch_size / median if median > 0 else float("inf")}


def is_noisy(stats: dict[str, float]) -> bool:
    """Whether timed runs vary too much to trust their median: interquartile range > NOISY_IQR of the median."""
    return "iqr_ms" in stats and stats["iqr_ms"] > NOISY_IQR * stats["median_ms"]


def speedup_warnings(model: nn.Module, device: str | torch.device, pattern: str | None = None) -> list[str]:
    """Warnings where a model's sparsity gives no speed on ``device`` with the kernels PyTorch uses.

    Args:
        model: the model as it will run.
        device: where it runs.
        pattern: the sparsity pattern of the run (``"unstructured"``, ``"2:4"``, ``"channel"``), if known.
    """
    device = torch.device(device)
    weights = [m.weight for m in model.modules() if isinstance(m, (*CONV_TYPES, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    rows_zero = sum(int(w.flatten(1).eq(0).all(1).sum()) * w[0].numel() for w in weights)
    warnings = []
    scattered = zeros - rows_zero
    if total and scattered / total > 0.05 and pattern in (None, "unstructured"):
        warnings.append(
            f"{scattered / total:.0%} of the weights are zeros scattered inside dense tensors: dense kernels on "
            f"{device.type} multiply them like any other weight, so the model is no faster and its usual "
            f"checkpoint no smaller; `ptsparse export --format compressed` makes the file smaller, and channel "
            f"pruning (`--method taylor`, then `--format channels`) makes the model faster")
    if pattern is not None and ":" in pattern and device.type != "cuda":
        warnings.append(f"{pattern} sparsity runs on sparse kernels on CUDA GPUs only (semi-structured sparse "
                        f"tensors); on {device.type} the zeros are multiplied like any other weight: no speedup")
    elif pattern is not None and ":" in pattern:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        small = [m for m in linears if min(m.weight.shape) < SMALL_FEATURES]
        if len(small) == len(linears):
            warnings.append(f"{pattern}: 2:4 kernels speed up Linear layers only, and every Linear layer here has "
                            f"fewer than {SMALL_FEATURES} inputs or outputs, too small for them to beat dense "
                            f"kernels; convolutions keep dense kernels: expect no speedup")
    if rows_zero and total and rows_zero / total > 0.05:
        from ..models.zoo import is_causal_lm  # deferred: the zoo builds on this module

        warnings.append("whole rows are zero but still computed; the channel export, which removes them, does not "
                        "take language models" if is_causal_lm(model) else
                        "whole channels are zero but still computed: `ptsparse export --format channels` "
                        "removes them and makes the model faster")
    return warnings
