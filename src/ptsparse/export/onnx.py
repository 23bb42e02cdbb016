"""ONNX export of any ptsparse model (masks are already baked in as zeros), checked with onnxruntime.

The model is exported with PyTorch's ``torch.export``-based exporter (``dynamo=True``) with a dynamic
batch dimension, then run with onnxruntime on the example inputs and on a batch of another size; the
file is renamed into place only when both match PyTorch's outputs within tolerance. ptsparse does not read
ONNX files back; ``ptsparse bench-latency`` times them with onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import require
from ..checkpoint import atomic_path
from ..errors import ExportError, first_line
from ..graph.cost import CONV_TYPES
from .base import ExportFormat, check_outputs, no_speedup_warnings, register_format

DEFAULT_OPSET = 18
# onnxruntime's CPU convolutions work on blocks of channels; channel-pruned widths off these multiples ran slower
# than dense on this project's CPU (benchmarks/RESULTS.md, "Exports"), and multiples of it ran faster.
ORT_CHANNEL_BLOCK = 8


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silences one logger's warnings for the duration of the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def onnxruntime_outputs(path: str | os.PathLike, inputs: torch.Tensor) -> torch.Tensor:
    """Runs an ONNX file with onnxruntime on CPU and returns its first output."""
    ort = require("onnxruntime", "checking ONNX exports")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: inputs.cpu().numpy()})[0])


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                tolerance: float = 1e-4) -> dict[str, Any]:
    """Exports ``model`` to ONNX at ``path`` and checks it against PyTorch with onnxruntime.

    Args:
        model: the model (a copy is exported in eval mode, on CPU).
        example: an input batch (its batch size is exported as dynamic).
        path: destination ``.onnx`` file, written only if the check passes.
        opset: ONNX opset version.
        tolerance: the largest difference from PyTorch's outputs allowed, relative to their largest magnitude.

    Returns:
        ``{"format": "onnx", "opset": ..., "bytes": file size, "max_relative_difference": ...}``.

    Raises:
        MissingExtraError: onnx, onnxscript or onnxruntime is not installed.
        ExportError: the exporter fails, or onnxruntime's outputs differ from PyTorch's.
    """
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "ONNX export")
    model = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    other = torch.cat([example, example[:1]]) if len(example) > 1 else torch.cat([example, example])
    with torch.no_grad():
        expected = [model(example), model(other)]
    with atomic_path(path) as temporary:
        try:
            # The exporter prints its progress, and warns about torchvision operators it cannot register
            # when torchvision is absent; keep the CLI's output to the report.
            with contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx._internal.exporter._registration"):
                torch.onnx.export(model, (example,), str(temporary), dynamo=True, input_names=["input"],
                                  output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                  opset_version=opset, external_data=False)
        except Exception as error:  # the exporter raises many kinds; report it as an export problem
            reason = first_line(error)
            raise ExportError(f"ONNX export failed: {reason}") from None
        difference = 0.0
        for inputs, reference in zip((example, other), expected):
            outputs = onnxruntime_outputs(temporary, inputs)
            difference = max(difference, check_outputs(
                outputs, reference, tolerance, f"onnxruntime's outputs differ from PyTorch's (batch of {len(inputs)}; "
                                               "nothing was written)"))
        size = Path(temporary).stat().st_size
    return {"format": "onnx", "opset": opset, "bytes": size, "max_relative_difference": difference}


def _write(model: nn.Module, path: str | os.PathLike, metadata: dict, *, example: torch.Tensor,
           value_dtype: str | None) -> dict[str, Any]:
    """The format's writer: :func:`export_onnx` (the metadata has no place in an ONNX file)."""
    return export_onnx(model, example, path)


def _warnings(model: nn.Module, metadata: dict[str, Any]) -> list[str]:
    """The zeros' warnings (:func:`~ptsparse.export.base.no_speedup_warnings`), and for a channel-pruned model,
    the convolutions whose widths onnxruntime's blocked kernels do not fit."""
    warnings = no_speedup_warnings(model, metadata)
    if (metadata.get("config") or {}).get("pattern") == "channel":
        convs = [m for m in model.modules() if isinstance(m, CONV_TYPES)]
        odd = [m for m in convs if m.out_channels % ORT_CHANNEL_BLOCK]
        if odd:
            warnings.append(
                f"{len(odd)} of {len(convs)} convolutions keep a width that is not a multiple of {ORT_CHANNEL_BLOCK}; "
                f"onnxruntime's CPU convolutions work on blocks of channels, and such models ran slower than the dense "
                f"one under onnxruntime (torchvision MobileNetV2 at half its MACs: 0.89x); prune with "
                f"`--channel-multiple {ORT_CHANNEL_BLOCK}` to keep every width a multiple of {ORT_CHANNEL_BLOCK}")
    return warnings


def _summary(report: dict[str, Any], path: str | os.PathLike) -> str:
    return f"wrote {path}: {report['bytes']:,} bytes; onnxruntime matches PyTorch within {report['max_relative_difference']:.2g} of the output's scale"


register_format("onnx", ExportFormat(description="ONNX with the zeros baked in, checked with onnxruntime",
                                     write=_write, traced=True, suffix=".onnx", summary=_summary,
                                     warnings=_warnings))
