"""Models by name: the bundled reference model, torchvision / timm / Hugging Face models, and checkpoints
written by ptsparse.

``--model`` accepts ``reference`` (the committed, trained ResNet-20 for Fashion-MNIST), a model spec
``torchvision:NAME``, ``timm:NAME`` or ``hf:DIRECTORY`` (:mod:`ptsparse.models.zoo`, optional extras), the
path of a safetensors checkpoint whose metadata names an architecture (every checkpoint ptsparse writes
does), or a sparsify output directory.

Architectures are the registered names (``reference_resnet20``) and every model spec: a result sparsified
from ``torchvision:resnet18`` records that string, and :func:`load_checkpoint` rebuilds the model from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path

from torch import nn

from .._registry import Registry
from ..checkpoint import load_into, load_state, shape_to_checkpoint
from ..errors import CheckpointError
from . import zoo
from .reference import ReferenceResNet, reference_resnet


class Architectures(Registry):
    """The registry of architecture names, which also resolves every ``torchvision:``, ``timm:`` and ``hf:``
    spec to a constructor of that model (random weights; a checkpoint's own are loaded into it)."""

    def get(self, name: str) -> Callable[[], nn.Module]:
        if zoo.is_spec(name) and not super().__contains__(name):
            return partial(zoo.build_model, name, load_weights=False)
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or zoo.is_spec(name)

    def names(self) -> list[str]:
        return super().names() + list(zoo.SPEC_FORMS)


ARCHITECTURES: Registry[Callable[[], nn.Module]] = Architectures("architecture")
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
    shape_to_checkpoint(model, state, metadata, source=f"checkpoint {path}")  # e.g. channel-removed: smaller layers
    model = load_into(model, state, source=f"checkpoint {path}")
    return model.eval(), dict(metadata or {}, architecture=name)


def load_reference() -> ReferenceResNet:
    """The trained reference ResNet-20 (eval mode), from the weights committed with the package."""
    model, _ = load_checkpoint(reference_weights_path(), architecture="reference_resnet20")
    return model


def resolve_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """``--model`` (and ``--weights``): the model (eval mode) and its architecture name.

    Args:
        spec: ``"reference"``; ``"torchvision:NAME"``, ``"timm:NAME"`` (random weights unless ``weights``) or
            ``"hf:DIRECTORY"`` (its own weights if it has any), see :mod:`ptsparse.models.zoo`; or a checkpoint
            path / output directory written by ptsparse.
        weights: a local state dict (safetensors, or a torch file read with ``weights_only=True``) loaded
            into the model.

    Returns:
        The model and the architecture to record: the canonical spec for torchvision / timm / hf models.

    Raises:
        CheckpointError: no such model or checkpoint, or the weights do not fit it.
        MissingExtraError: the optional package of a spec is not installed (the message names the pip command).
        ModelError: a spec names no known model.
    """
    if str(spec) == "reference":
        model, architecture = load_reference(), "reference_resnet20"
    elif zoo.is_spec(str(spec)):
        architecture = zoo.canonical_spec(str(spec))
        model = zoo.build_model(architecture)
    else:
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(f"model {str(spec)!r} is neither 'reference' nor an existing checkpoint path "
                                  f"(nor a model spec: {', '.join(zoo.SPEC_FORMS)})")
        model, metadata = load_checkpoint(path)
        architecture = metadata["architecture"]
    if weights is not None:
        zoo.load_weights(model, weights)
    return model.eval(), architecture


__all__ = ["ARCHITECTURES", "Architectures", "ReferenceResNet", "load_checkpoint", "load_reference", "reference_metadata",
           "reference_resnet", "reference_weights_path", "resolve_model"]
