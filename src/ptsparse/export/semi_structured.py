"""2:4 kernels: eligible Linear weights become PyTorch semi-structured sparse tensors on CUDA.

Semi-structured (2:4) sparse matrix multiplication runs on the sparse tensor cores of NVIDIA GPUs of
compute capability 8.0 or newer (cuSPARSELt, else CUTLASS), in float16 or bfloat16. A Linear layer is
swapped when its weight holds at most 2 non-zeros in every 4 consecutive inputs (ptsparse's ``2:4``
pattern) and its shape meets the kernel's minimum sizes; convolutions keep dense kernels. Elsewhere
(CPU, older GPUs) nothing is swapped and the report says why, instead of failing: the zeros are then
multiplied like any other weight and give no speedup. Layers smaller than :data:`SMALL_FEATURES` in
either dimension are swapped but warned about: kernel overhead eats the halved work there.
"""

from __future__ import annotations

import copy
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


def _kernel_class():
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() \
        else SparseSemiStructuredTensorCUTLASS


def to_semi_structured(model: nn.Module, device: str | torch.device = "cuda",
                       dtype: str = "float16") -> tuple[nn.Module, dict[str, Any]]:
    """Swaps the eligible Linear weights of a copy of ``model`` to semi-structured sparse tensors.

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
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        rows, columns = module.weight.shape
        if not is_two_four(module.weight):
            report["skipped"][name] = "weight is not 2:4 sparse along its inputs"
            continue
        if rows % limits.sparse_min_rows or columns % limits.sparse_min_cols:
            report["skipped"][name] = (f"shape {rows}x{columns} is not a multiple of the kernel's "
                                       f"{limits.sparse_min_rows}x{limits.sparse_min_cols}")
            continue
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
