"""Output layers: the layers whose output channels are the model's output channels (the classes), which channel
pruning must keep. Found by walking the autograd graph back from the model's output through operations that carry
each channel to the same channel (activations, pooling, flatten, reshape, ...), so a classifier followed by ReLU
and pooling (SqueezeNet) counts as well as one whose output is the model's output.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping

import torch

# Autograd nodes (``ReluBackward0`` without ``Backward0``) that carry each channel of their input to the same channel
# of their output, alone or beside others: what may lie between an output layer and the model's output.
CHANNEL_PRESERVING_OPS = frozenset({
    "Relu", "Hardtanh", "Gelu", "Sigmoid", "Silu", "Hardswish", "Hardsigmoid", "Tanh", "LeakyRelu", "Elu", "Mish",
    "Softmax", "LogSoftmax", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AvgPool2D",
    "AdaptiveMaxPool2D", "MaxPool2DWithIndices", "Mean", "Sum", "View", "UnsafeView", "Reshape", "Clone", "Squeeze",
    "Unsqueeze", "Permute", "Transpose", "Select", "Slice", "Expand", "Cat", "Add", "Sub", "Mul", "Div",
    "NativeBatchNorm", "CudnnBatchNorm", "ToCopy", "Alias",
})


def _op_name(node: object) -> str:
    return re.sub(r"Backward\d*$", "", type(node).__name__)


def feeding_the_output(result: object, produced: Mapping[object, Hashable]) -> set:
    """The layers (values of ``produced``: a layer's output autograd node -> the layer) that feed ``result`` through
    channel-preserving operations only; an output that is a layer's own output counts too."""
    if not isinstance(result, torch.Tensor) or result.grad_fn is None:
        return set()
    found, seen, stack = set(), set(), [result.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node in produced:
            found.add(produced[node])
        elif _op_name(node) in CHANNEL_PRESERVING_OPS:
            stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def record_output_nodes(produced: dict[object, Hashable], key: Hashable):
    """A forward hook that records ``output.grad_fn -> key`` in ``produced`` (for :func:`feeding_the_output`)."""

    def hook(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced[output.grad_fn] = key

    return hook


def traceable_input(example: torch.Tensor) -> torch.Tensor:
    """``example`` requiring gradients when it can, so the graph exists even when the model's parameters are frozen."""
    return example.detach().requires_grad_() if example.is_floating_point() else example
