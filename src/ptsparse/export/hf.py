"""Hugging Face directories: a sparse Hugging Face model saved so that ``transformers`` loads it back.

A model built from ``--model hf:DIRECTORY`` holds the Hugging Face model at its attribute ``hf``
(:class:`~ptsparse.models.zoo.HFLogits`). This format writes that model with transformers' own
``save_pretrained``: ``config.json`` and ``model.safetensors`` (dense tensors holding the exact zeros; a model
over 50 GB in shards with an index; a weight tied to another, such as GPT-2's ``lm_head`` to its token
embedding, stored once and tied again on loading), plus the files of the source directory besides its config
and weights that transformers reads (:data:`SOURCE_FILES`: tokenizer, image processor, generation settings),
copied as they are. The source directory is the one the run's architecture ``hf:DIRECTORY`` names.
``AutoModelFor<Task>.from_pretrained(OUT)`` of the model's task (the model's own class), or ptsparse's
``--model hf:OUT``, loads the result.

Nothing appears under the final name until a check passes: transformers reloads the directory as the model's
class (holding a second copy of the model in memory meanwhile), and the reloaded model must give the sparse
model's outputs on an example input (token ids or images, by the model's ``main_input_name``) and hold its zeros
at the same places. The output must be a new or empty directory.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_directory
from ..errors import ExportError
from ..graph.coupling import eval_mode
from ..models import architecture_of, zoo
from ..targets import find_targets
from .base import ExportFormat, check_outputs, no_speedup_warnings, register_format

FORMAT = "hf"

# Files of a Hugging Face directory besides its config and weights: tokenizer, image processor, generation settings.
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                "generation_config.json")


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model that ``model`` holds at its attribute ``hf``.

    Raises:
        ExportError: ``model`` holds none.
    """
    wrapped = getattr(model, zoo.HF_PREFIX, None)
    if not (isinstance(wrapped, nn.Module) and hasattr(wrapped, "save_pretrained") and hasattr(wrapped, "config")):
        raise ExportError(f"format {FORMAT!r} exports Hugging Face transformers models (built from --model "
                          f"hf:DIRECTORY, held at the attribute 'hf'); this model is a {type(model).__name__}")
    return wrapped


def source_files(model: nn.Module, metadata: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The ``hf:`` directory the model was built from (the run's architecture, else the model's own tag) and
    which of :data:`SOURCE_FILES` it holds; ``(None, [])`` where that is unknown."""
    architecture = metadata.get("architecture") or architecture_of(model)
    if not zoo.is_spec(architecture) or zoo.parse_spec(architecture).kind != "hf":
        return None, []
    source = Path(zoo.parse_spec(architecture).name)
    return source, [name for name in SOURCE_FILES if (source / name).is_file()]


def example_input(hf: nn.Module, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic input batch for the wrapper around ``hf``: 8 token ids per sample, or images of the
    config's size, by ``hf.main_input_name``.

    Raises:
        ExportError: the model takes another input.
    """
    generator = torch.Generator().manual_seed(seed)
    name = getattr(hf, "main_input_name", None)
    if name == "input_ids":
        return torch.randint(hf.config.get_text_config().vocab_size, (batch_size, 8), generator=generator)
    if name == "pixel_values":
        size = getattr(hf.config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return torch.randn(batch_size, getattr(hf.config, "num_channels", 3), height, width, generator=generator)
    raise ExportError(f"format {FORMAT!r} checks models that take input_ids or pixel_values; "
                      f"{type(hf).__name__} takes {name!r}")


@contextlib.contextmanager
def _config_kept(config: Any):
    """Restores the config's attributes after the block (``save_pretrained`` records the dtype and class in it)."""
    attributes = dict(vars(config))
    try:
        yield
    finally:
        vars(config).clear()
        vars(config).update(attributes)


def _same_zeros(model: nn.Module, reloaded: nn.Module) -> int:
    """The zeros of ``model``'s prunable layers, after checking that ``reloaded`` has them at the same places.

    Raises:
        ExportError: a layer's zeros differ.
    """
    zeros = 0
    with torch.no_grad():
        for target in find_targets(model):
            kept = target.weight.cpu() == 0
            if not torch.equal(kept, reloaded.get_submodule(target.name).weight == 0):
                raise ExportError(f"transformers reloads {target.name} with other zeros than the sparse model's; "
                                  "nothing was written")
            zeros += int(kept.sum())
    return zeros


def export_hf(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
              tolerance: float = 1e-4) -> dict[str, Any]:
    """Writes the Hugging Face model inside ``model`` as a directory that ``from_pretrained`` loads, and checks it.

    Args:
        model: a ptsparse result of an ``hf:`` model (masks baked in); not modified.
        path: a new or empty directory, written only if the check passes.
        metadata: the run's metadata; its ``architecture`` (``hf:DIRECTORY``) names where the tokenizer files are.
        tolerance: the largest difference of the reloaded model's outputs allowed, relative to their largest
            magnitude.

    Returns:
        ``{"format": "hf", "class", "files", "source", "copied", "zeros", "max_relative_difference"}``:
        the Hugging Face class, the files written, the source directory and the files copied from it, and the
        zeros the reloaded model holds where the sparse model does.

    Raises:
        ExportError: ``model`` is not a Hugging Face model, or the reloaded model differs from it.
        ConfigError: ``path`` is a file or a directory holding files.
    """
    hf = hf_model(model)
    source, copied = source_files(model, metadata or {})
    example = example_input(hf)
    with eval_mode(model), torch.no_grad():
        expected = model(example.to(next(model.parameters()).device)).cpu()
    with atomic_directory(path) as staging:
        with _config_kept(hf.config):
            hf.save_pretrained(staging)
        for name in copied:
            shutil.copyfile(source / name, staging / name)
        # as ptsparse builds the model (GPT-2's Conv1D layers as Linear ones), so layers compare one to one
        reloaded = zoo.replace_conv1d(type(hf).from_pretrained(staging, local_files_only=True, dtype=hf.dtype))
        # The same wrapper around the reloaded model: a copy of `model` whose `hf` is `reloaded` itself.
        wrapper = copy.deepcopy(model, memo={id(hf): reloaded}).cpu().eval()
        with torch.no_grad():
            outputs = wrapper(example)
        difference = check_outputs(outputs, expected, tolerance, "transformers' reload of the directory gives other "
                                   "outputs than the sparse model (nothing was written)")
        zeros = _same_zeros(model, wrapper)
        files = sorted(item.name for item in staging.iterdir())
    return {"format": FORMAT, "class": type(hf).__name__, "files": files, "source": str(source) if source else None,
            "copied": copied, "zeros": zeros, "max_relative_difference": difference}


def _write(model: nn.Module, path: str | os.PathLike, metadata: dict, *, example: torch.Tensor | None,
           value_dtype: str | None) -> dict[str, Any]:
    """The format's writer: :func:`export_hf`."""
    return export_hf(model, path, metadata)


def _warnings(model: nn.Module, metadata: dict[str, Any]) -> list[str]:
    """The model's no-speedup warnings, and where no tokenizer or processor file came with it."""
    source, copied = source_files(model, metadata)
    if copied:
        return no_speedup_warnings(model, metadata)
    where = (f"the source directory {source} holds none of {', '.join(SOURCE_FILES)}" if source is not None
             else "the run does not name the hf: directory it came from")
    return no_speedup_warnings(model, metadata) + [f"no tokenizer or processor file was copied: {where}"]


def _summary(report: dict[str, Any], path: str | os.PathLike) -> str:
    copied = f"; copied {', '.join(report['copied'])} from {report['source']}" if report["copied"] else ""
    difference = report["max_relative_difference"]
    outputs = f"within {difference:.2g} of their scale" if difference else "exactly"
    return (f"wrote {path}: a {report['class']} for from_pretrained ({report['bytes']:,} bytes{copied}); reloaded, "
            f"it holds the sparse model's {report['zeros']:,} zeros and gives its outputs {outputs}")


register_format(FORMAT, ExportFormat(
    description="a Hugging Face directory (config, safetensors, tokenizer) that transformers' from_pretrained loads",
    write=_write, suffix="", directory=True, warnings=_warnings, summary=_summary))
