"""ptsparse: post-training sparsity for PyTorch models.

Give it a trained dense model and a small calibration set; get back a sparse model at an exact target
sparsity (unstructured, N:M or whole channels) with a per-layer report.

Example (the bundled reference model and Fashion-MNIST, as in the README's quick start):
    >>> import ptsparse
    >>> from ptsparse.data import FashionMNIST, sample_calibration
    >>> from ptsparse.models import load_reference
    >>> model = load_reference()
    >>> calib = sample_calibration(FashionMNIST("train"), 1024, seed=0)
    >>> result = ptsparse.sparsify(model, calib, sparsity=0.9, method="magnitude")
    >>> round(ptsparse.sparsity_of(result.model), 4)
    0.9
    >>> directory = ptsparse.save(result, "runs/rn20-90")
    >>> sorted(file.name for file in directory.iterdir())
    ['config.yaml', 'model.safetensors', 'report.json']
    >>> sparse = ptsparse.load("runs/rn20-90")  # rebuilds the reference ResNet-20, recorded as its architecture
    >>> round(ptsparse.sparsity_of(sparse), 4)
    0.9
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from . import export  # noqa: F401  (registers the export formats, and their checkpoint readers)
from .checkpoint import load_into, load_state, shape_to_checkpoint
from .config import SparsityConfig, resolve_config
from .errors import PtsparseError
from .models import load_checkpoint
from .sparsify import SparsifyResult, sparsify, sparsity_of

__version__ = "0.1.0"


def save(result: SparsifyResult, directory: str | os.PathLike, force: bool = False) -> Path:
    """Writes a result's sparse weights, resolved config and report into ``directory`` (see
    :meth:`SparsifyResult.save`: an earlier result there is replaced whole; other files need ``force``)."""
    return result.save(directory, force)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Loads a sparse model written by :func:`save` or ``ptsparse export`` (any ptsparse safetensors checkpoint).

    Compressed checkpoints (``--format compressed``) are decoded to the exact weights; channel-removed
    ones (``--format channels``) rebuild the architecture and shrink its layers to the stored sizes.

    Args:
        path: an output directory or a ``.safetensors`` file.
        model: a module of the same architecture to load into (a copy is returned; ``model`` is not
            modified). Not needed when the checkpoint names a registered architecture.

    Raises:
        CheckpointError: the file is missing or corrupt, or does not fit the model.
    """
    if model is None:
        return load_checkpoint(path)[0]
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    state, metadata = load_state(path)
    metadata = metadata or {}
    model = copy.deepcopy(model)
    shape_to_checkpoint(model, state, metadata, source=f"checkpoint {path}")
    return load_into(model, state, source=f"checkpoint {path}").eval()


__all__ = ["PtsparseError", "SparsifyResult", "SparsityConfig", "load", "resolve_config", "save",
           "sparsify", "sparsity_of", "__version__"]
