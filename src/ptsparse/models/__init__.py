"""Models by name: the bundled reference model, torchvision / timm / Hugging Face models, and checkpoints
written by ptsparse.

``--model`` accepts a reference model (:data:`REFERENCE_MODELS`: ``reference``, the committed, trained ResNet-20
for Fashion-MNIST, and ``reference_mobilenet``, the compact MobileNetV2-style one), ``reference_lm`` (the
committed language model, a Llama trained on the Python documentation by :mod:`ptsparse.models.language`: it
stands for ``hf:`` its directory, :func:`reference_lm_dir`), a model spec
``torchvision:NAME``, ``timm:NAME`` or ``hf:DIRECTORY`` (:mod:`ptsparse.models.zoo`, optional extras), the
path of a safetensors checkpoint whose metadata names an architecture (every checkpoint ptsparse writes
does), or a sparsify output directory.

Architectures are the registered names (``reference_resnet20``, ``reference_mobilenet``) and every model spec: a result sparsified
from ``torchvision:resnet18`` records that string, and :func:`load_checkpoint` rebuilds the model from it.

A model built here remembers its architecture, so ``ptsparse.sparsify`` records it without being told
(``architecture=`` is needed only for models built elsewhere): every builder of :data:`ARCHITECTURES`
(:func:`reference_resnet`, and a spec's constructor) tags what it builds with :func:`tag_architecture`, and so
do :func:`load_reference`, :func:`load_checkpoint` (``ptsparse.load``) and :func:`resolve_model`, which build
through them. The tag is a plain attribute, so it survives ``copy.deepcopy``; it also holds the model's
structure when tagged (module names and types, parameter and buffer names and shapes), and
:func:`architecture_of` ignores it once that has changed (a new classifier head, a swapped activation, a
channel-removed checkpoint's smaller layers): the name would no longer rebuild the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial, wraps
from importlib import resources
from pathlib import Path

from torch import nn

from .._registry import Registry
from ..checkpoint import load_into, load_state, shape_to_checkpoint
from ..errors import CheckpointError, ModelError
from . import zoo
from .compact import CompactMobileNet
from .compact import compact_mobilenet as _compact_mobilenet
from .reference import ReferenceResNet
from .reference import reference_resnet as _reference_resnet

_TAG = "_ptsparse_architecture"


def _structure(model: nn.Module) -> tuple:
    """What an architecture name stands for: module names and types, parameter and buffer names and shapes
    (as sets: removing a parametrization re-registers a weight after its bias)."""
    return (frozenset((name, type(module).__qualname__) for name, module in model.named_modules()),
            frozenset((name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()))


def tag_architecture(model: nn.Module, name: str) -> nn.Module:
    """Records on ``model`` (returned) that ``ARCHITECTURES.get(name)()`` rebuilds it, for :func:`architecture_of`."""
    setattr(model, _TAG, (name, _structure(model)))
    return model


def architecture_of(model: nn.Module) -> str | None:
    """The architecture ``model`` was tagged with, or None: never tagged, or changed since (see the module doc)."""
    name, structure = getattr(model, _TAG, (None, None))
    return name if name is not None and structure == _structure(model) else None


def _tagging(builder: Callable[..., nn.Module], name: str) -> Callable[..., nn.Module]:
    """``builder``, tagging what it builds with ``name`` when called without arguments (what the name builds)."""

    @wraps(builder.func if isinstance(builder, partial) else builder)  # its doc, for `ptsparse list --details`
    def build(*args, **kwargs) -> nn.Module:
        model = builder(*args, **kwargs)
        return tag_architecture(model, name) if not args and not kwargs else model

    return build


class Architectures(Registry):
    """The registry of architecture names, which also resolves every ``torchvision:``, ``timm:`` and ``hf:``
    spec to a constructor of that model (random weights; a checkpoint's own are loaded into it).

    Builders are registered wrapped so that the model they build (without arguments) is tagged with its
    name (:func:`tag_architecture`); ``register`` returns the wrapped builder.
    """

    def register(self, name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
        add = super().register(name)
        return lambda builder: add(_tagging(builder, name))

    def get(self, name: str) -> Callable[[], nn.Module]:
        if zoo.is_spec(name) and not super().__contains__(name):
            return _tagging(partial(zoo.build_model, name, load_weights=False), name)
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or zoo.is_spec(name)

    def names(self) -> list[str]:
        return super().names() + list(zoo.SPEC_FORMS)


ARCHITECTURES: Registry[Callable[[], nn.Module]] = Architectures("architecture")
reference_resnet = ARCHITECTURES.register("reference_resnet20")(_reference_resnet)
compact_mobilenet = ARCHITECTURES.register("reference_mobilenet")(_compact_mobilenet)

# ``--model`` names of the trained models committed with the package, and the architecture each one is; the
# weights are ``weights/ARCHITECTURE.safetensors`` with the training metadata beside them in a .json.
REFERENCE_MODELS = {"reference": "reference_resnet20", "reference_resnet20": "reference_resnet20",
                    "reference_mobilenet": "reference_mobilenet"}


# ``--model`` name of the committed language model: a Hugging Face directory beside the weights above, with the
# training metadata in ``ptsparse_reference_lm.json`` (:mod:`ptsparse.models.language`).
REFERENCE_LM = "reference_lm"


def reference_lm_dir() -> Path:
    """The committed reference language model's directory (``config.json``, ``model.safetensors``, tokenizer):
    ``hf:`` this directory is the model ``--model reference_lm`` stands for."""
    return Path(str(resources.files(__package__).joinpath("weights", REFERENCE_LM)))


def reference_lm_metadata() -> dict:
    """Corpus, recipe, training time and perplexities of the committed reference language model."""
    from .language import METADATA

    return json.loads((reference_lm_dir() / METADATA).read_text())


def _reference_architecture(name: str) -> str:
    if name not in REFERENCE_MODELS:
        raise ModelError(f"reference model {name!r} is not one of {', '.join(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]


def reference_weights_path(name: str = "reference") -> Path:
    """Path of a committed reference model's weights inside the installed package."""
    filename = f"{_reference_architecture(name)}.safetensors"
    return Path(str(resources.files(__package__).joinpath("weights", filename)))


def reference_metadata(name: str = "reference") -> dict:
    """Accuracy, recipe and seed of a committed reference model."""
    return json.loads(reference_weights_path(name).with_suffix(".json").read_text())


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
    model = ARCHITECTURES.get(name)()  # tagged with its name, unless shaped below to smaller layers
    shape_to_checkpoint(model, state, metadata, source=f"checkpoint {path}")  # e.g. channel-removed: smaller layers
    model = load_into(model, state, source=f"checkpoint {path}")
    return model.eval(), dict(metadata or {}, architecture=name)


def load_reference(name: str = "reference") -> nn.Module:
    """A trained reference model (eval mode) from the weights committed with the package: ``reference`` (the
    ResNet-20) or ``reference_mobilenet`` (:data:`REFERENCE_MODELS`)."""
    model, _ = load_checkpoint(reference_weights_path(name), architecture=_reference_architecture(name))
    return model


def resolve_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """``--model`` (and ``--weights``): the model (eval mode) and its architecture name.

    Args:
        spec: a reference model (:data:`REFERENCE_MODELS`, or :data:`REFERENCE_LM` for ``hf:`` the committed
            language model's directory); ``"torchvision:NAME"``, ``"timm:NAME"`` (random weights unless ``weights``) or
            ``"hf:DIRECTORY"`` (its own weights if it has any), see :mod:`ptsparse.models.zoo`; or a checkpoint
            path / output directory written by ptsparse.
        weights: a local state dict (safetensors, or a torch file read with ``weights_only=True``) loaded
            into the model.

    Returns:
        The model and the architecture to record: the canonical spec for torchvision / timm / hf models. The
        model is tagged with it (:func:`architecture_of`) unless it is a channel-removed checkpoint's smaller model.

    Raises:
        CheckpointError: no such model or checkpoint, or the weights do not fit it.
        MissingExtraError: the optional package of a spec is not installed (the message names the pip command).
        ModelError: a spec names no known model.
    """
    if str(spec) == REFERENCE_LM:
        spec = f"{zoo.HF_PREFIX}:{reference_lm_dir()}"
    if str(spec) in REFERENCE_MODELS:
        model, architecture = load_reference(str(spec)), REFERENCE_MODELS[str(spec)]
    elif zoo.is_spec(str(spec)):
        architecture = zoo.canonical_spec(str(spec))
        model = tag_architecture(zoo.build_model(architecture), architecture)
    else:
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(f"model {str(spec)!r} is neither a reference model "
                                  f"({', '.join([*REFERENCE_MODELS, REFERENCE_LM])}) "
                                  f"nor an existing checkpoint path "
                                  f"(nor a model spec: {', '.join(zoo.SPEC_FORMS)})")
        model, metadata = load_checkpoint(path)
        architecture = metadata["architecture"]
    if weights is not None:
        zoo.load_weights(model, weights)
    return model.eval(), architecture


__all__ = ["ARCHITECTURES", "Architectures", "CompactMobileNet", "REFERENCE_LM", "REFERENCE_MODELS", "ReferenceResNet",
           "architecture_of", "compact_mobilenet", "load_checkpoint", "load_reference", "reference_lm_dir",
           "reference_lm_metadata", "reference_metadata", "reference_resnet", "reference_weights_path", "resolve_model",
           "tag_architecture"]
