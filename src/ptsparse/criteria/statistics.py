"""Per-layer input statistics gathered by forward hooks: the one place every data-driven criterion uses.

Each statistic is three pure functions: ``make(module) -> state``,
``accumulate(state, module, inputs) -> state``, with ``inputs`` the layer's input batch, and
``finish(state) -> state`` once every batch is in. Convolutions see their inputs as patches (respecting
stride, padding including ``"same"`` and non-``zeros`` padding modes, dilation and groups), so a statistic
means the same thing for Linear and Conv layers.

A layer's *input vectors* are the rows of Linear inputs (leading dimensions flattened), or one patch
per output position of each sample for a convolution. Column ``j`` of an input vector pairs with
column ``j`` of the layer's 2-D weight view ``weight.flatten(1)`` (channel, then kernel offsets), one
view per group: states carry a leading ``groups`` dimension (1 for Linear and ungrouped convs).

* ``"input_norms"`` (Wanda, ``baselines.md`` §7): ``input_sq_norms`` of shape ``(groups, c)``, the sum
  over input vectors of ``x_j^2``, and ``input_count``, the number of input vectors.
* ``"hessian"`` (SparseGPT, §8.1): ``hessian`` of shape ``(groups, c, c)``, the mean of ``2 x x^T`` over
  input vectors, and ``hessian_count``.

Data-parallel (:mod:`ptsparse.distributed`): each rank feeds its turn of the calibration batches, whole
batches so that BatchNorm's batch statistics match one process's, and the sums and counts are added over
the ranks before ``finish``, so every rank holds the whole sample's statistics. Sums over batches are kept
in float64 and finished in float32: the order in which batches are added (by rank, then across ranks)
moves a sum by float64 rounding (about 1e-16 relative), so the float32 statistics equal one process's
unless a value lies that close to a float32 rounding boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..data import Calibration
from ..data.calibration import StopForward
from ..errors import ConfigError
from ..graph.calls import layers_called_through
from ..targets import Target
from ..offload import Offload, whole_model
from .block_inputs import BlockInputs, find_chains, inputs_for

Make = Callable[[nn.Module], dict[str, torch.Tensor]]
Accumulate = Callable[[dict[str, torch.Tensor], nn.Module, torch.Tensor], dict[str, torch.Tensor]]
Finish = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Patch buffers are built a few samples at a time so that one chunk holds at most this many values.
_PATCH_CHUNK = 1 << 24


def layer_groups(module: nn.Module) -> int:
    """Weight groups of a layer: ``groups`` for a convolution, 1 for Linear."""
    return module.groups if isinstance(module, _CONVS) else 1


def group_columns(module: nn.Module) -> int:
    """Columns of one group's 2-D weight view (``in_features``, or ``in/groups * kernel volume``)."""
    return module.weight[0].numel()


def _check_layer(module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, *_CONVS)):
        raise ConfigError(f"input statistics support Linear and Conv1d/2d/3d layers, not {type(module).__name__}")


def _padded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the convolution pads it (``"same"`` resolved, non-``zeros`` modes applied)."""
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):  # F.pad lists the last dimension first
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":  # PyTorch puts the odd extra on the right
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[i]
        pads += [left, right]
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def conv_windows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A view ``(samples, channels, *output positions, *kernel offsets)`` of the padded input, no copy.

    Entry ``[n, ch, *p, *a]`` is the input value that kernel offset ``a`` multiplies at output position
    ``p``: ``x_padded[n, ch, p * stride + a * dilation]`` per spatial dimension.
    """
    x = _padded(module, x)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    return x


def input_vectors(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input vectors as ``(rows, groups, c)``, columns in ``weight.flatten(1)`` order."""
    _check_layer(module)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, 1, module.in_features)
    windows = conv_windows(module, x)
    spatial = len(module.kernel_size)
    # (n, ch, *out, *k) -> (n, *out, ch, *k): one row per output position, (channel, offsets) columns.
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
    return windows.permute(order).reshape(-1, module.groups, group_columns(module))


def _chunks(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` split along samples so that each chunk's patch buffer stays small."""
    if isinstance(module, nn.Linear) or len(x) <= 1:
        return [x]
    per_sample = conv_windows(module, x[:1]).numel()
    return list(x.split(max(1, _PATCH_CHUNK // per_sample)))


def _zero_count(module: nn.Module) -> torch.Tensor:
    return torch.zeros((), dtype=torch.long, device=module.weight.device)


def make_input_norms(module: nn.Module) -> dict[str, torch.Tensor]:
    """Empty ``input_norms`` state: zero squared norms ``(groups, c)`` in float64 and a zero count."""
    _check_layer(module)
    norms = torch.zeros(layer_groups(module), group_columns(module), dtype=torch.float64,
                        device=module.weight.device)
    return {"input_sq_norms": norms, "input_count": _zero_count(module)}


def accumulate_input_norms(state: dict[str, torch.Tensor], module: nn.Module,
                           inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adds ``sum x_j^2`` over the batch's input vectors; no patch buffer for convolutions (§7)."""
    x = inputs.float()
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features)
        added, count = rows.square().sum(0).view(1, -1), len(rows)
    else:
        windows = conv_windows(module, x.square())  # strided view of the squared input
        spatial = len(module.kernel_size)
        added = windows.sum(dim=(0, *range(2, 2 + spatial))).reshape(module.groups, -1)
        count = math.prod(windows.shape[:1] + windows.shape[2:2 + spatial])
    return {"input_sq_norms": state["input_sq_norms"] + added, "input_count": state["input_count"] + count}


def finish_input_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The squared norms in float32."""
    return {**state, "input_sq_norms": state["input_sq_norms"].float()}


def make_hessian(module: nn.Module) -> dict[str, torch.Tensor]:
    """Empty ``hessian`` state: the sum of ``2 x x^T``, zeros ``(groups, c, c)`` in float64, and a zero count."""
    _check_layer(module)
    c = group_columns(module)
    hessian = torch.zeros(layer_groups(module), c, c, dtype=torch.float64, device=module.weight.device)
    return {"hessian": hessian, "hessian_count": _zero_count(module)}


def accumulate_hessian(state: dict[str, torch.Tensor], module: nn.Module,
                       inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adds the batch's ``2 X X^T`` (§8.1), per group, to the sum."""
    hessian, count = state["hessian"], state["hessian_count"]
    for chunk in _chunks(module, inputs.float()):
        rows = input_vectors(module, chunk).transpose(0, 1)  # (groups, m, c)
        hessian = hessian + 2 * torch.bmm(rows.transpose(1, 2), rows).double()
        count = count + rows.shape[1]
    return {"hessian": hessian, "hessian_count": count}


def finish_hessian(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sum divided by the count (zeros without inputs), in float32."""
    return {**state, "hessian": (state["hessian"] / state["hessian_count"].clamp(min=1)).float()}


# name -> (make, accumulate, finish).
STATISTICS: dict[str, tuple[Make, Accumulate, Finish]] = {
    "input_norms": (make_input_norms, accumulate_input_norms, finish_input_norms),
    "hessian": (make_hessian, accumulate_hessian, finish_hessian),
}


@torch.no_grad()
def gather_statistics_all(model: nn.Module, targets: Sequence[Target], calibration: Calibration,
                          names: Sequence[str], batch_size: int = 64, device: str | torch.device = "cpu",
                          block_inputs: BlockInputs | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Accumulates ``names`` over the inputs of every target in one pass of the calibration set.

    Under a process group each rank passes its turn of the batches (the cached block inputs hold only those)
    and the states are summed over the ranks (see the module docstring); every rank must call it.

    Args:
        block_inputs: the cached inputs of the block holding every target; the pass then runs that block
            alone instead of the model.

    Returns:
        By layer name, the accumulated states of every requested statistic, merged into one dict.

    Raises:
        ConfigError: a statistic name is unknown, or a layer's type has no statistics.
    """
    for name in names:
        if name not in STATISTICS:
            raise ConfigError(f"unknown statistic {name!r}; known: {', '.join(sorted(STATISTICS))}")
    states: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for target in targets:
        try:
            states[target.name] = {name: STATISTICS[name][0](target.module) for name in names}
        except ConfigError as error:
            raise ConfigError(f"layer {target.name}: {error}") from None

    # Once a first full batch has shown that every target runs exactly once per forward, later batches stop
    # as soon as the last of them has run, so the layers after it cost nothing (a layer-by-layer criterion
    # runs half the network per layer on average). A target that runs twice keeps full passes.
    calls: dict[str, int] = {}
    progress = {"batches": 0, "stop_early": False}

    def on_batch(module: nn.Module, inputs: tuple) -> None:
        if progress["batches"] == 1:
            progress["stop_early"] = len(calls) == len(states) and all(n == 1 for n in calls.values())
        progress["batches"] += 1
        calls.clear()

    def hook(layer: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach()
        for name in names:
            state = states[layer][name]
            if any(tensor.device != x.device for tensor in state.values()):  # made in CPU memory under offload
                state = {key: tensor.to(x.device) for key, tensor in state.items()}
            states[layer][name] = STATISTICS[name][1](state, module, x)
        calls[layer] = calls.get(layer, 0) + 1
        if progress["stop_early"] and len(calls) == len(states):
            raise StopForward

    handles = [target.module.register_forward_hook(lambda m, i, o, layer=target.name: hook(layer, m, i, o))
               for target in targets]
    runner = model if block_inputs is None else block_inputs.module
    handles.append(runner.register_forward_pre_hook(on_batch))
    try:
        with layers_called_through(model):  # Swin's attention applies its q/k/v through F.linear
            if block_inputs is None:
                calibration.feed(model, batch_size, device, batch_statistics=True, shard=True)
            else:
                block_inputs.feed()
    finally:
        for handle in handles:
            handle.remove()
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for layer, layer_states in states.items():
        merged[layer] = {}
        for name, state in layer_states.items():
            for tensor in state.values():
                distributed.all_reduce_(tensor)
            merged[layer].update(STATISTICS[name][2](state))
    return merged


def gather_statistics(model: nn.Module, target: Target, calibration: Calibration, names: Sequence[str],
                      batch_size: int = 64, device: str | torch.device = "cpu",
                      block_inputs: BlockInputs | None = None) -> dict[str, torch.Tensor]:
    """Runs the calibration set through ``model`` (or the cached block) and accumulates ``names`` over
    ``target``'s inputs.

    Returns:
        The accumulated states of every requested statistic, merged into one dict.

    Raises:
        ConfigError: a statistic name is unknown, or the layer's type has no statistics.
    """
    return gather_statistics_all(model, [target], calibration, names, batch_size, device, block_inputs)[target.name]


def gather_statistics_by_block(model: nn.Module, targets: Sequence[Target], calibration: Calibration,
                               names: Sequence[str], batch_size: int = 64, device: str | torch.device = "cpu",
                               offload: Offload | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """What :func:`gather_statistics_all` gathers over the model, with the targets inside chains of blocks gathered
    one block at a time on the block's cached inputs (:mod:`ptsparse.criteria.block_inputs`), as a layer-by-layer
    criterion does, and the others in one pass through the model. With ``offload`` only the block at work is on
    the device, which is what this is for: one whole-model pass costs less compute and no cache otherwise.

    Args:
        targets: the layers, in execution order; the model is not modified.
    """
    chains = find_chains(model, targets, calibration, batch_size, device, offload)
    blocks: list[tuple[int, int, list[Target]]] = []  # (chain, position, its targets) in execution order
    rest: list[Target] = []
    for target in targets:
        where = next(((c, chain.index_of(target.name)) for c, chain in enumerate(chains)
                      if chain.index_of(target.name) is not None), None)
        if where is None:
            rest.append(target)
        elif blocks and blocks[-1][:2] == where:
            blocks[-1][2].append(target)
        else:
            blocks.append((*where, [target]))
    merged: dict[str, dict[str, torch.Tensor]] = {}
    held: BlockInputs | None = None
    for _, _, members in blocks:
        held = inputs_for(members[0], chains, held, model, calibration, batch_size, device, offload)
        merged.update(gather_statistics_all(model, members, calibration, names, batch_size, device, held))
    if offload is not None:
        offload.hold(None)
    if rest:
        with whole_model(offload):
            merged.update(gather_statistics_all(model, rest, calibration, names, batch_size, device))
    return merged
