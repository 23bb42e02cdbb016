"""2:4 kernels: eligible Linear weights become PyTorch semi-structured sparse tensors on CUDA.

Semi-structured (2:4) sparse matrix multiplication runs on the sparse tensor cores of NVIDIA GPUs of
compute capability 8.0 or newer (cuSPARSELt, else CUTLASS), in float16 or bfloat16. A Linear layer is
swapped when its weight holds at most 2 non-zeros in every 4 consecutive inputs (ptsparse's ``2:4``
pattern) and its shape meets the kernel's minimum sizes (:func:`two_four_layers`); convolutions keep dense
kernels. Hugging Face models are no different: their ``nn.Linear`` layers are swapped. transformers' ``Conv1D``
(GPT-2's Linear, its weight stored transposed, inputs x outputs) is no ptsparse target and so stays dense; one
that is 2:4 along its inputs becomes the ``nn.Linear`` it computes (:func:`as_linear`) and is swapped. Elsewhere
(CPU, older GPUs) nothing is swapped and the report says why, instead of failing: the zeros are then
multiplied like any other weight and give no speedup. Layers smaller than :data:`SMALL_FEATURES` in
either dimension are swapped but warned about: kernel overhead eats the halved work there.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..graph.cost import SMALL_FEATURES

KERNEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def unavailable_reason(device: str | torch.device) -> str | None:
    """Why 2:4 kernels cannot run on ``device``, or ``None`` when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"2:4 sparse kernels (torch semi-structured sparse tensors) run on CUDA GPUs of compute "
                f"capability 8.0 or newer only; on {device.type} the zeros are multiplied like any other weight, "
                f"so 2:4 sparsity gives no speedup there")
    if not torch.cuda.is_available():
        return "no CUDA device is visible, so 2:4 sparse kernels cannot run"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"2:4 sparse kernels need compute capability 8.0 or newer; this GPU has {major}.{minor}, "
                f"so 2:4 sparsity gives no speedup on it")
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row holds at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.reshape(weight.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


def _conv1d_type() -> type | None:
    """transformers' ``Conv1D``, where transformers is loaded (a model holding one has loaded it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a Linear or a transformers ``Conv1D`` as outputs x inputs; ``None`` for other modules."""
    if isinstance(module, nn.Linear):
        return module.weight
    conv1d = _conv1d_type()
    return module.weight.t() if conv1d is not None and isinstance(module, conv1d) else None


def as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a transformers ``Conv1D`` computes (its weight transposed)."""
    inputs, outputs = conv1d.weight.shape
    linear = nn.Linear(inputs, outputs, device=conv1d.weight.device, dtype=conv1d.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    return linear


def two_four_layers(model: nn.Module, min_rows: int, min_columns: int) -> tuple[list[str], dict[str, str]]:
    """The Linear (and transformers ``Conv1D``) layers that 2:4 kernels take, and why they take no other.

    Args:
        model: the model.
        min_rows: the kernel's minimum number of outputs; a layer's must be a multiple of it.
        min_columns: the same for the inputs.

    Returns:
        The names of the layers whose weights are 2:4 sparse along their inputs and whose shapes are multiples
        of the minimum sizes, and the other layers' names -> why not.
    """
    eligible, skipped = [], {}
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None:
            continue
        rows, columns = weight.shape
        if not is_two_four(weight):
            skipped[name] = "weight is not 2:4 sparse along its inputs"
        elif rows % min_rows or columns % min_columns:
            skipped[name] = f"shape {rows}x{columns} is not a multiple of the kernel's {min_rows}x{min_columns}"
        else:
            eligible.append(name)
    return eligible, skipped


def _kernel_class():
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() \
        else SparseSemiStructuredTensorCUTLASS


def to_semi_structured(model: nn.Module, device: str | torch.device = "cuda",
                       dtype: str = "float16") -> tuple[nn.Module, dict[str, Any]]:
    """Swaps the eligible Linear weights of a copy of ``model`` to semi-structured sparse tensors
    (:func:`two_four_layers`; an eligible transformers ``Conv1D`` becomes an ``nn.Linear`` first).

    Args:
        model: a model with 2:4-sparse Linear weights (``sparsify(..., pattern="2:4")``); not modified.
        device: where the model will run; 2:4 kernels need a CUDA GPU of compute capability >= 8.0.
        dtype: ``float16`` or ``bfloat16``; on CUDA the copy is cast to it (the kernels' dtypes).

    Returns:
        The model (on CUDA: a cast copy with swapped layers; elsewhere: an unchanged copy) and a report:
        ``available``, ``reason`` (when not), ``swapped``, ``skipped`` (layer -> why) and ``warnings``.

    Raises:
        ConfigError: ``dtype`` is not float16 or bfloat16.
    """
    if dtype not in KERNEL_DTYPES:
        raise ConfigError(f"2:4 kernel dtype {dtype!r} is not allowed; choose float16 or bfloat16")
    model = copy.deepcopy(model).eval()
    reason = unavailable_reason(device)
    report: dict[str, Any] = {"available": reason is None, "swapped": [], "skipped": {}, "warnings": []}
    if reason is not None:
        report["reason"] = reason
        report["warnings"].append(reason)
        return model, report
    kernel = _kernel_class()
    limits = kernel._DTYPE_SHAPE_CONSTRAINTS[KERNEL_DTYPES[dtype]]
    model = model.to(device=device, dtype=KERNEL_DTYPES[dtype])
    eligible, report["skipped"] = two_four_layers(model, limits.sparse_min_rows, limits.sparse_min_cols)
    for name in eligible:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            module = as_linear(module)
            model.set_submodule(name, module)
        rows, columns = module.weight.shape
        module.weight = nn.Parameter(kernel.from_dense(module.weight.detach().contiguous()), requires_grad=False)
        report["swapped"].append(name)
        if min(rows, columns) < SMALL_FEATURES:
            report["warnings"].append(
                f"{name}: {rows}x{columns} is small; 2:4 kernels rarely beat dense ones below "
                f"{SMALL_FEATURES} features")
    if not report["swapped"]:
        report["warnings"].append("no Linear layer was eligible for 2:4 kernels (convolutions keep dense kernels): "
                                  "no speedup")
    return model, report
