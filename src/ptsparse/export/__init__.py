"""Exports that make a sparse model really smaller or faster, and the measurements that say so.

=================  ===========================================================================  ==========================
format             what it gives                                                                  needs
=================  ===========================================================================  ==========================
``compressed``     safetensors with each sparse tensor as bitmask + non-zero values (smaller file;  core
                   same model after ``ptsparse.load``, same speed)
``channels``       dead channels physically removed: a smaller, faster dense model               ``torch-pruning``
``onnx``           ONNX file with the zeros baked in, checked against PyTorch with onnxruntime    ``onnx``, ``onnxscript``,
                                                                                                   ``onnxruntime``
``hf``             a Hugging Face model's directory (config, safetensors with the zeros, its       ``transformers``
                   tokenizer) that ``from_pretrained`` loads, checked by reloading it
=================  ===========================================================================  ==========================

Each format is one module that registers its writer, its checkpoint reader and what ``ptsparse export`` prints
after writing (:mod:`.base`, :data:`FORMATS`). 2:4 kernels (:mod:`.semi_structured`) swap weights at run time on
CUDA and are not a file format; :mod:`.latency` benchmarks whole models with the cost model of
:mod:`ptsparse.graph.cost`. The optional packages install with ``pip install 'ptsparse[export]'``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import MissingExtraError, require
from ..checkpoint import check_new_directory, save_model
from ..errors import CheckpointError, ConfigError
from ..models import REFERENCE_LM, REFERENCE_MODELS, load_checkpoint, load_reference, resolve_model, zoo
from .base import FORMATS, ExportFormat

# Each format module registers its format on import, in the order of the table above.
# isort: off
from . import compressed  # noqa: F401
from . import channels  # noqa: F401
from . import onnx  # noqa: F401
from . import hf  # noqa: F401
# isort: on

# One sample's shape for the registered architectures (channel removal and ONNX trace an example input).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"reference_resnet20": (1, 28, 28), "reference_mobilenet": (1, 28, 28)}


def check_format(name: str) -> ExportFormat:
    """The export format called ``name``.

    Raises:
        UnknownOptionError: there is none; the message lists the formats.
    """
    return FORMATS.get(name)


def input_shape_for(architecture: str | None, given: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """One sample's input shape: ``given``, else the registered architecture's (an image model spec's: what its
    preprocessing makes of an image, e.g. ``(3, 224, 224)``).

    Raises:
        ConfigError: neither is known, or the architecture reads token ids (a language model or text classifier),
            which the float inputs built from a shape cannot feed.
    """
    if zoo.is_spec(architecture) and zoo.reads_token_ids(architecture):
        raise ConfigError(f"architecture {architecture!r} reads token ids: tracing exports (channels, onnx) and "
                          "bench-latency feed float inputs of a shape, so they do not apply to it; export it with "
                          "--format hf or compressed")
    if given:
        return tuple(given)
    if architecture in INPUT_SHAPES:
        return INPUT_SHAPES[architecture]
    if zoo.is_spec(architecture) and (shape := zoo.image_input_shape(architecture)) is not None:
        return shape
    raise ConfigError(f"no input shape is known for architecture {architecture!r}; give one, e.g. --input-shape 3 224 224")


def example_inputs(input_shape: tuple[int, ...], batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """A deterministic random batch of inputs (for tracing and output checks)."""
    return torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(seed))


def dense_checkpoint_bytes(model: nn.Module) -> int:
    """Size of the model's ordinary (dense) safetensors checkpoint, as ``ptsparse.save`` writes it."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "dense.safetensors"
        save_model(model, path)  # tensors shared by tied weights are stored once per name
        return path.stat().st_size


def export_model(model: nn.Module, format: str, path: str | os.PathLike, *, metadata: dict | None = None,
                 input_shape: tuple[int, ...] | None = None, value_dtype: str | None = None) -> dict[str, Any]:
    """Exports ``model`` in ``format`` to the file ``path`` (written atomically, only on success).

    Args:
        model: a ptsparse result model (masks baked in); never modified.
        format: a name in :data:`FORMATS`: ``compressed``, ``channels``, ``onnx`` or ``hf``.
        path: the file to write (``hf``: a new or empty directory).
        metadata: checkpoint metadata to keep (``architecture`` lets ``ptsparse.load`` rebuild the model).
        input_shape: one sample's shape; needed by ``channels`` and ``onnx`` unless the architecture is known.
        value_dtype: formats that take one (``compressed``): ``keep`` (bit-exact), ``float16`` or ``bfloat16``.

    Returns:
        The export's report (sizes, parameters, MACs, checks), with ``bytes`` of the written file (of a
        directory's files) and, for a file, ``dense_bytes`` of the dense checkpoint.

    Raises:
        UnknownOptionError: unknown format.
        MissingExtraError: the format needs an optional package that is missing.
        ExportError: the model cannot be exported in that format.
    """
    exporter = check_format(format)
    if exporter.directory:
        check_new_directory(path)
    elif Path(path).is_dir():
        raise ConfigError(f"export output {str(path)!r} is a directory; give the file to write, e.g. "
                          f"model{exporter.suffix}")
    if value_dtype not in (None, "keep") and not exporter.value_dtype:
        formats = ", ".join(name for name in FORMATS.names() if FORMATS.get(name).value_dtype)
        raise ConfigError(f"a value dtype applies to --format {formats} only, not {format!r}")
    metadata = {k: v for k, v in (metadata or {}).items() if k not in ("format", "version", "value_dtype", "modules")}
    example = example_inputs(input_shape_for(metadata.get("architecture"), input_shape)) if exporter.traced else None
    report = exporter.write(model, path, metadata, example=example, value_dtype=value_dtype)
    if exporter.directory:  # a dense checkpoint itself: no size to compare
        report["bytes"] = sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())
        return report
    report["bytes"] = Path(path).stat().st_size
    report["dense_bytes"] = dense_checkpoint_bytes(model)
    report["size_ratio"] = report["dense_bytes"] / report["bytes"]
    return report


def load_model(spec: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A reference model or any ptsparse checkpoint (plain, compressed, channel-removed): the model and its metadata.

    Raises:
        CheckpointError: the path does not exist or the file cannot be loaded.
    """
    if str(spec) in REFERENCE_MODELS:
        return load_reference(str(spec)), {"architecture": REFERENCE_MODELS[str(spec)]}
    if str(spec) == REFERENCE_LM:
        model, architecture = resolve_model(REFERENCE_LM)
        return model, {"architecture": architecture}
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"model {str(spec)!r} is neither a reference model "
                              f"({', '.join([*REFERENCE_MODELS, REFERENCE_LM])}) nor an existing checkpoint path")
    return load_checkpoint(path)


__all__ = ["FORMATS", "ExportFormat", "INPUT_SHAPES", "MissingExtraError", "check_format", "dense_checkpoint_bytes",
           "example_inputs", "export_model", "input_shape_for", "load_model", "require"]
