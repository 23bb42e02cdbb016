"""Models by name: the bundled reference model, and checkpoints written by ptsparse.

``--model`` accepts ``reference`` (the committed, trained ResNet-20 for Fashion-MNIST) or the path of a
safetensors checkpoint whose metadata names a registered architecture (every checkpoint ptsparse writes
does), or a sparsify output directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from torch import nn

from .._registry import Registry
from ..checkpoint import load_into, load_state, resize_modules
from ..errors import CheckpointError
from .reference import ReferenceResNet, reference_resnet

ARCHITECTURES: Registry[Callable[[], nn.Module]] = Registry("architecture")
ARCHITECTURES.register("reference_resnet20")(reference_resnet)

REFERENCE_WEIGHTS = "reference_resnet20.safetensors"


def reference_weights_path() -> Path:
    """Path of the committed reference weights inside the installed package."""
    return Path(str(resources.files(__package__).joinpath("weights", REFERENCE_WEIGHTS)))


def reference_metadata() -> dict:
    """Accuracy, recipe and seed of the committed reference weights."""
    return json.loads(reference_weights_path().with_suffix(".json").read_text())


def load_checkpoint(path: str | os.PathLike, architecture: str | None = None) -> tuple[nn.Module, dict]:
    """Builds the architecture named in a checkpoint's metadata and loads its weights (eval mode).

    Args:
        path: a ``.safetensors`` file, or a directory holding ``model.safetensors``.
        architecture: overrides the name stored in the file.

    Raises:
        CheckpointError: the file is missing, corrupt, names no known architecture, or does not fit it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    state, metadata = load_state(path)
    name = architecture or (metadata or {}).get("architecture")
    if name is None:
        raise CheckpointError(
            f"checkpoint {path} does not name its architecture; pass model= (Python) or use a "
            f"checkpoint written by ptsparse (known: {', '.join(ARCHITECTURES.names())})"
        )
    if name not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {path} names architecture {name!r}; known: {', '.join(ARCHITECTURES.names())}")
    model = ARCHITECTURES.get(name)()
    if (metadata or {}).get("format") == "channels":  # channel-removed: the layers are smaller than built
        resize_modules(model, metadata.get("modules", {}), state, source=f"checkpoint {path}")
    model = load_into(model, state, source=f"checkpoint {path}")
    return model.eval(), dict(metadata or {}, architecture=name)


def load_reference() -> ReferenceResNet:
    """The trained reference ResNet-20 (eval mode), from the weights committed with the package."""
    model, _ = load_checkpoint(reference_weights_path(), architecture="reference_resnet20")
    return model


def resolve_model(spec: str | os.PathLike) -> tuple[nn.Module, str]:
    """``--model``: ``"reference"`` or a checkpoint path; returns the model and its architecture name."""
    if str(spec) == "reference":
        return load_reference(), "reference_resnet20"
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"model {str(spec)!r} is neither 'reference' nor an existing checkpoint path")
    model, metadata = load_checkpoint(path)
    return model, metadata["architecture"]


__all__ = ["ARCHITECTURES", "ReferenceResNet", "load_checkpoint", "load_reference", "reference_metadata",
           "reference_resnet", "reference_weights_path", "resolve_model"]
