"""Linear layers that a model applies outside their own forward, seen as calls of the layer; and the projections
that ``nn.MultiheadAttention`` computes with its own weights.

torchvision's Swin attention (``ShiftedWindowAttention`` and its V2) holds its q/k/v and output projections as
``nn.Linear`` children but applies them as ``F.linear(x, self.qkv.weight, self.qkv.bias)``: the children's forward
never runs, so forward hooks on them (input statistics for Wanda and SparseGPT, the MAC count, the knapsack's cost
model) see nothing, and such a layer would be scored on no data and left out of the MACs. Inside
:func:`layers_called_through`, such a call runs the layer itself, so its hooks see its input and output; a bias
other than the layer's own (Swin V2 applies a copy with the keys' part zeroed) is added on top of the layer's
output as the difference of the two. A layer's weight is recognised by identity: the parameter, or, when a
parametrization (a mask) computes it, the tensor its parametrization last returned.

``nn.MultiheadAttention`` cannot be seen this way: its forward runs a native kernel, or a functional
implementation that computes with ``in_proj_weight`` (no layer of its own) and ``out_proj.weight`` inside one
dispatched call. Inside :func:`layers_called_through`, each of its calls is replayed by a copy that shares its
tensors and has an identity in place of ``out_proj``, which gives the attention's output before the projection, and
``out_proj`` is called on it, so its hooks see its input (the replay costs one more attention per call).
:func:`attention_projections` names the four products (q, k, v, out) from the attention's inputs, for the MAC
count and the knapsack's cost model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode


@contextmanager
def layers_called_through(model: nn.Module) -> Iterator[None]:
    """Within the block, a ``F.linear`` call that applies the weight of one of ``model``'s ``nn.Linear`` layers
    outside that layer's forward runs as a call of the layer, and the ``out_proj`` of an ``nn.MultiheadAttention``
    is called on the attention's output before it (see the module docstring). The model is not modified; its
    hooks are removed on exit."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owners: dict[int, list[nn.Linear]] = {}  # layers that tie one weight share it
    for layer in layers:
        if not parametrize.is_parametrized(layer, "weight"):
            owners.setdefault(id(layer.weight), []).append(layer)
    computed: dict[nn.Linear, torch.Tensor] = {}  # the last weight each parametrization returned, kept alive
    running: set[nn.Linear] = set()

    def on_weight(layer: nn.Linear):
        def record(parametrization: nn.Module, inputs, weight: torch.Tensor) -> None:
            previous = computed.get(layer)
            if previous is not None:
                owners.pop(id(previous), None)
            computed[layer], owners[id(weight)] = weight, [layer]
        return record

    def enter(layer: nn.Module, inputs) -> None:
        running.add(layer)

    def leave(layer: nn.Module, inputs, output) -> None:
        running.discard(layer)

    replays: dict[nn.Module, nn.Module] = {}

    def through_out_proj(attention: nn.Module, args: tuple, kwargs: dict, output) -> None:
        replay = replays.get(attention)
        if replay is None or replay.out_proj.weight.device != attention.out_proj.weight.device:  # (offload moves it)
            replays[attention] = _with_identity_out_proj(attention)
        mixed = replays[attention].forward(*args, **kwargs)  # forward: no hooks run
        attention.out_proj(mixed[0] if isinstance(mixed, tuple) else mixed)

    hooks = []
    for layer in layers:
        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave, always_call=True)]
        if parametrize.is_parametrized(layer, "weight"):
            hooks.append(layer.parametrizations.weight.register_forward_hook(on_weight(layer)))
    hooks += [m.register_forward_hook(through_out_proj, with_kwargs=True) for m in model.modules()
              if isinstance(m, nn.MultiheadAttention)]

    class ThroughLayers(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                x, weight, bias = _linear_arguments(*args, **kwargs)
                tied = owners.get(id(weight), ())
                if tied and running.isdisjoint(tied):
                    layer = tied[0]
                    output = layer(x)  # this mode is off inside its handler: the layer's own F.linear runs as is
                    if bias is not layer.bias:
                        output = output + _or_zero(bias) - _or_zero(layer.bias)
                    return output
            return func(*args, **kwargs)

    try:
        with ThroughLayers():
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _with_identity_out_proj(attention: nn.Module) -> nn.Module:
    """A copy of ``attention`` that shares its tensors but has an identity in place of ``out_proj``: its output is
    the attention's before the output projection."""
    shared = {id(tensor): tensor for tensor in (*attention.parameters(), *attention.buffers())}
    replay = copy.deepcopy(attention, shared)
    weight = attention.out_proj.weight
    identity = nn.Linear(attention.embed_dim, attention.embed_dim, attention.out_proj.bias is not None,
                         device=weight.device, dtype=weight.dtype).requires_grad_(False)
    identity.weight.copy_(torch.eye(attention.embed_dim))
    if identity.bias is not None:
        identity.bias.zero_()
    replay.out_proj = identity
    return replay


def _linear_arguments(input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return input, weight, bias


def _or_zero(bias: torch.Tensor | None) -> torch.Tensor | float:
    return 0.0 if bias is None else bias


@dataclass(frozen=True)
class Projection:
    """One product of an ``nn.MultiheadAttention`` with a weight matrix: ``weight`` (its rows of ``in_proj_weight``,
    or ``out_proj.weight``; ``out_proj`` is that layer) applied at ``positions`` positions of the pass."""

    part: str  # "q", "k", "v" or "out"
    weight: torch.Tensor
    positions: int
    bias: bool
    out_proj: nn.Linear | None = None


def attention_projections(attention: nn.MultiheadAttention, args: Sequence,
                          kwargs: Mapping) -> list[Projection]:
    """The q, k, v and output projections that one call of ``attention`` (positional ``args`` and ``kwargs`` of
    its forward: query, key, value) computes, with the positions of each, counted over the whole call."""
    names = ("query", "key", "value")
    query, key, value = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(names))
    width = attention.embed_dim
    if attention.in_proj_weight is not None:
        q, k, v = attention.in_proj_weight.chunk(3)
    else:
        q, k, v = attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight
    bias = attention.in_proj_bias is not None
    out = attention.out_proj
    return [Projection("q", q, query.numel() // width, bias),
            Projection("k", k, key.numel() // attention.kdim, bias),
            Projection("v", v, value.numel() // attention.vdim, bias),
            Projection("out", out.weight, query.numel() // width, out.bias is not None, out)]
