"""The export format axis: each format declares how it is written, read back and reported.

Contract: a format's ``write`` writes one file (a ``directory`` format: one directory) atomically and returns
its report; its ``reader`` (where ptsparse reads the file back) is registered with the checkpoint readers
(:data:`ptsparse.checkpoint.READERS`), so ``ptsparse.load`` and ``--model PATH`` read it; its ``warnings`` and
``summary`` are what ``ptsparse export`` prints after writing.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import Registry
from ..checkpoint import READERS, Reader
from ..errors import ExportError
from ..graph.cost import speedup_warnings


def no_speedup_warnings(model: nn.Module, metadata: dict[str, Any]) -> list[str]:
    """Where the exported model's zeros give no speed on CPU, for the pattern its run recorded."""
    return speedup_warnings(model, "cpu", (metadata.get("config") or {}).get("pattern"))


def size_summary(report: dict[str, Any], path: str | os.PathLike) -> str:
    """The written file's size against the dense checkpoint's."""
    return (f"wrote {path}: {report['bytes']:,} bytes, {report['size_ratio']:.2f}x smaller than the dense "
            f"checkpoint ({report['dense_bytes']:,} bytes)")


def float64_outputs(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """``model(example)`` computed by a float64 copy of ``model`` in eval mode, on CPU (``model`` is not modified)."""
    exact = copy.deepcopy(model).cpu().double().eval()
    example = example.cpu()
    with torch.no_grad():
        return exact(example.double() if example.is_floating_point() else example)


def check_outputs(outputs: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str,
                  exact: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """The largest difference of ``outputs`` from ``reference`` relative to the reference's largest magnitude
    (float sums reordered by an exporter or a smaller layer differ by about 1e-7 of the output's scale, whatever
    that scale is; a wrong model by far more).

    Args:
        outputs: the exported model's outputs.
        reference: the model's outputs.
        tolerance: the largest relative difference allowed.
        what: what changed the outputs, the start of the error message.
        exact: gives both outputs again in float64 (:func:`float64_outputs`); where the float32 difference is
            beyond ``tolerance`` they decide, since float32 rounding alone grows with depth (a random-weight
            inception_v3 moves by 3e-5 of its output scale between float32 and float64, and its channel-removed
            copy by up to 2e-4 in float32 but 1e-13 in float64).

    Returns:
        The relative difference (the float64 one where ``exact`` was used).

    Raises:
        ExportError: the shapes differ or the relative difference exceeds ``tolerance`` (the message gives it).
    """
    if outputs.shape != reference.shape:
        raise ExportError(f"{what}: output shape {tuple(outputs.shape)} instead of {tuple(reference.shape)}")
    difference, scale = _difference(outputs, reference)
    if difference > tolerance * scale and exact is not None and outputs.dtype != torch.float64:
        difference, scale = _difference(*exact())
    if difference > tolerance * scale:
        raise ExportError(f"{what}: largest output difference {difference:.3g} is {difference / scale:.2g} of the "
                          f"largest output magnitude {scale:.3g}, beyond the tolerance {tolerance:g}")
    return difference / scale


def _difference(outputs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The largest absolute difference and the reference's largest magnitude (at least 1e-12), in float64."""
    difference = float((outputs.double() - reference.double()).abs().max())
    return difference, max(float(reference.double().abs().max()), 1e-12)


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        description: what it gives, for ``ptsparse export --format``'s help.
        write: ``write(model, path, metadata, *, example, value_dtype)``: writes the file atomically and returns
            the export's report. ``example`` is an input batch for ``traced`` formats (else ``None``);
            ``value_dtype`` is the storage dtype asked for (``--dtype``), ``None`` unless the format takes one.
        reader: how ptsparse reads the file back (``ptsparse.load``); ``None`` where it does not (ONNX).
        traced: the writer runs the model on example inputs, so one sample's input shape must be known.
        value_dtype: the writer takes a storage dtype for the values.
        suffix: the usual file suffix, for hints.
        directory: the writer writes a directory (new or empty before), not a file.
        warnings: ``warnings(model, metadata)``: what ``ptsparse export`` warns about after writing.
        summary: ``summary(report, path)``: the line ``ptsparse export`` ends with.
    """

    description: str
    write: Callable[..., dict[str, Any]]
    reader: Reader | None = None
    traced: bool = False
    value_dtype: bool = False
    suffix: str = ".safetensors"
    directory: bool = False
    warnings: Callable[[nn.Module, dict[str, Any]], list[str]] = no_speedup_warnings
    summary: Callable[[dict[str, Any], str | os.PathLike], str] = size_summary


FORMATS: Registry[ExportFormat] = Registry("export format", ordered=True)  # named in the order registered


def register_format(name: str, format: ExportFormat) -> ExportFormat:
    """Registers ``format`` under ``name``, and its reader, if any, as the reader of checkpoints in that format."""
    FORMATS.register(name)(format)
    if format.reader is not None:
        READERS.register(name)(format.reader)
    return format

