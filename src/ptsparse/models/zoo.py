"""Models from torchvision, timm and Hugging Face transformers, named by a spec string, and their preprocessing.

Specs (``--model``, :func:`ptsparse.models.resolve_model`):

``torchvision:NAME[,key=value...]``
    ``torchvision.models.get_model(NAME, weights=None, **kwargs)``: a classification model with random weights
    (``resnet18``, ``mobilenet_v2``, ``regnet_y_400mf``, ...). Needs ``pip install 'ptsparse[vision]'``.
``timm:NAME[,key=value...]``
    ``timm.create_model(NAME, pretrained=False, **kwargs)``. Needs ``pip install 'ptsparse[timm]'``.
``hf:DIRECTORY``
    A local Hugging Face directory holding ``config.json`` (and, if present, its weights), loaded with
    ``local_files_only=True``: an image classifier (ViT, ...), a sequence classifier (BERT, ...) or a causal
    language model (GPT-2, Llama, Qwen2, OPT, ...). ``architectures`` in ``config.json`` says which (a
    ``...ForCausalLM`` / ``...LMHeadModel`` class is a causal LM); a config without it loads as a classifier where
    transformers has a classification head for its model type, else as a causal LM. The model is wrapped in
    :class:`HFLogits` (classifiers) or :class:`HFCausalLM`, so its module names start with ``hf.``
    (``hf.bert.encoder.layer.0``, ``hf.model.layers.0``). Needs ``pip install 'ptsparse[hf]'``.

``key=value`` pairs go to the constructor (``torchvision:resnet50,num_classes=10``,
``timm:vit_tiny_patch16_224,img_size=64,num_classes=10``); values are Python literals, else strings.
Nothing is downloaded: weights come from the ``hf:`` directory or a local file (:func:`load_weights`,
``--weights``). The canonical spec (:func:`canonical_spec`) is what a saved result records as its
architecture, so ``ptsparse.load`` rebuilds the same model (``hf:`` records the directory's absolute path,
whose ``config.json`` must still be there).

Every model returns a plain logits tensor, as the distillation objectives and the metrics expect: ``(batch,
classes)`` for a classifier, ``(batch, seq, vocab)`` for a causal language model.
"""

from __future__ import annotations

import ast
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .._extras import MissingExtraError, require
from ..errors import CheckpointError, ModelError, first_line

PREFIXES = ("torchvision", "timm", "hf")
SPEC_FORMS = ("torchvision:NAME", "timm:NAME", "hf:DIRECTORY")
HF_PREFIX = "hf"  # the attribute of HFLogits holding the Hugging Face model: its submodules are named "hf.*"


@dataclass(frozen=True)
class Spec:
    """A parsed model spec: ``kind`` (torchvision, timm, hf), ``name`` (model name or directory), ``kwargs``."""

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = "".join(f",{key}={value!r}" if isinstance(value, str) else f",{key}={value}"
                        for key, value in sorted(self.kwargs.items()))
        return f"{self.kind}:{self.name}{extra}"


def is_spec(spec: object) -> bool:
    """Whether ``spec`` names a model of torchvision, timm or Hugging Face (``kind:...``)."""
    return isinstance(spec, str) and spec.partition(":")[0] in PREFIXES and bool(spec.partition(":")[2])


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets and quotes (``a,b=(1, 2),c='x,y'`` -> 3 parts)."""
    parts, depth, quote, start = [], 0, None, 0
    for position, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    return parts + [text[start:]]


def parse_spec(spec: str) -> Spec:
    """``"timm:vit_tiny_patch16_224,img_size=64"`` -> ``Spec("timm", "vit_tiny_patch16_224", {"img_size": 64})``.

    Raises:
        ModelError: not a ``torchvision:``, ``timm:`` or ``hf:`` spec, or a malformed ``key=value``.
    """
    kind, _, rest = str(spec).partition(":")
    if kind not in PREFIXES or not rest:
        raise ModelError(f"model {str(spec)!r} is not one of {', '.join(SPEC_FORMS)}")
    if kind == "hf":
        return Spec(kind, str(Path(rest).expanduser().resolve()))
    name, *pairs = _split_top_level(rest)
    kwargs = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip().isidentifier():
            raise ModelError(f"model {str(spec)!r}: {pair!r} is not key=value (e.g. {kind}:{name},num_classes=10)")
        kwargs[key.strip()] = _literal(value.strip())
    return Spec(kind, name.strip(), kwargs)


def canonical_spec(spec: str) -> str:
    """The spec a saved result records as its architecture (sorted kwargs, absolute ``hf:`` path)."""
    return str(parse_spec(spec))


# --- building --------------------------------------------------------------------------------------------

# Models whose training-mode forward returns auxiliary outputs besides the logits unless told not to.
_TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                         "inception_v3": {"aux_logits": False, "init_weights": True}}


def _torchvision(spec: Spec) -> nn.Module:
    require("torchvision", f"model {spec}", extra="vision")
    tv_models = require("torchvision.models", f"model {spec}", extra="vision")
    names = tv_models.list_models(module=tv_models)
    if spec.name not in names:
        raise ModelError(f"unknown torchvision classification model {spec.name!r}; choose one of: {', '.join(names)}")
    kwargs = {**_TORCHVISION_DEFAULTS.get(spec.name, {}), **spec.kwargs}
    try:
        return tv_models.get_model(spec.name, weights=None, **kwargs)
    except (TypeError, ValueError) as error:
        raise ModelError(f"cannot build {spec}: {error}") from None


def _timm(spec: Spec) -> nn.Module:
    timm = require("timm", f"model {spec}", extra="timm")
    if not timm.is_model(spec.name):
        raise ModelError(f"unknown timm model {spec.name!r}; `timm.list_models()` lists them")
    try:
        return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        raise ModelError(f"cannot build {spec}: {error}") from None


class HFLogits(nn.Module):
    """A Hugging Face classifier that takes one tensor and returns its ``.logits``.

    Floating inputs are ``pixel_values`` (images); integer inputs are ``input_ids`` (text), with an attention
    mask that hides the pad token (``config.pad_token_id``) when the config has one.

    Attributes:
        hf: the wrapped model (so its submodules are named ``hf.<name>``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return self.hf(pixel_values=x).logits
        pad = getattr(self.hf.config, "pad_token_id", None)
        mask = (x != pad).long() if pad is not None else None
        return self.hf(input_ids=x, attention_mask=mask).logits


class HFCausalLM(HFLogits):
    """A Hugging Face causal language model: token ids ``(batch, seq)`` (int64) -> next-token logits
    ``(batch, seq, vocab)``.

    No attention mask: its inputs are windows of packed text (:class:`~ptsparse.data.PackedText`), which hold no
    padding (a pad token that is also the end-of-text token must stay visible). No key-value cache is kept.

    Raises:
        ModelError: a sequence is longer than the model's positions (``max_position_embeddings``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = getattr(self.hf.config, "max_position_embeddings", None)
        if positions is not None and x.shape[-1] > positions:
            raise ModelError(f"sequences of {x.shape[-1]} tokens are longer than the model's {positions} positions "
                             f"(max_position_embeddings); use a --seq-len of at most {positions}")
        return self.hf(input_ids=x, use_cache=False).logits


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model built by :func:`build_model` (evaluated by perplexity)."""
    return isinstance(model, HFCausalLM)


class Conv1DLinear(nn.Linear):
    """A Linear standing in for transformers' ``Conv1D`` (GPT-2's layers, a Linear with a transposed weight), so
    that targets, statistics and patterns treat it as every other Linear.

    It computes with an ``(out, in)`` weight, and writes and reads its state dict in ``Conv1D``'s ``(in, out)``
    layout, so ptsparse's checkpoints and ``model.hf.save_pretrained`` stay in the model's own format. (While a
    mask is attached the weight lives under ``parametrizations.weight.original`` and is kept as it is.)
    """

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination:
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if isinstance(state_dict.get(prefix + "weight"), torch.Tensor):
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def replace_conv1d(model: nn.Module) -> nn.Module:
    """``model`` with each transformers ``Conv1D`` replaced by a :class:`Conv1DLinear` of the same values."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = Conv1DLinear(module.nx, module.nf, device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# The heads ptsparse runs: (wrapper, transformers auto task, auto class). Classifiers come first, so a config
# without ``architectures`` whose model type has both heads (BERT, GPT-2, Llama) loads as a classifier, as before
# causal LMs were supported.
_HF_HEADS = ((HFLogits, "IMAGE_CLASSIFICATION", "AutoModelForImageClassification"),
             (HFLogits, "SEQUENCE_CLASSIFICATION", "AutoModelForSequenceClassification"),
             (HFCausalLM, "CAUSAL_LM", "AutoModelForCausalLM"))


def _class_names(names: Any) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _hf_model_class(transformers: ModuleType, config, directory: str) -> tuple[Any, type[HFLogits]]:
    """The transformers class to build and the wrapper it goes in: the first of ``config.architectures`` that is
    a classifier or a causal LM class, else the first head transformers has for the config's model type.

    Raises:
        ModelError: the model is neither a classifier nor a causal language model.
    """
    from transformers.models.auto import modeling_auto

    architectures = list(getattr(config, "architectures", None) or ())
    for name in architectures:
        for wrapper, task, _ in _HF_HEADS:
            known = getattr(modeling_auto, f"MODEL_FOR_{task}_MAPPING_NAMES").values()
            if any(name in _class_names(names) for names in known) and hasattr(transformers, name):
                return getattr(transformers, name), wrapper
    for wrapper, task, auto in _HF_HEADS:
        if type(config) in getattr(modeling_auto, f"MODEL_FOR_{task}_MAPPING"):
            return getattr(transformers, auto), wrapper
    raise ModelError(f"hf:{directory}: model type {config.model_type!r} (architectures {architectures or 'not given'}) "
                     "is neither a classifier nor a causal language model; ptsparse runs image or sequence "
                     "classifiers and causal LMs (e.g. architectures ['LlamaForCausalLM'] in config.json)")


def _hf(spec: Spec, load_weights: bool) -> nn.Module:
    transformers = require("transformers", f"model hf:{spec.name}", extra="hf")
    directory = Path(spec.name)
    if not (directory / "config.json").is_file():
        raise ModelError(f"hf:{directory} is not a directory holding a Hugging Face config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"hf:{directory}: cannot read config.json: {str(error).splitlines()[0]}") from None
    cls, wrapper = _hf_model_class(transformers, config, str(directory))
    try:
        if load_weights and any((directory / name).is_file() for name in _HF_WEIGHTS):
            model = cls.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
        else:  # a config alone (or rebuilding a saved result, whose own weights are loaded next)
            model = (cls.from_config(config) if hasattr(cls, "from_config") else cls(config)).float()
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"hf:{directory}: cannot load the model: {str(error).splitlines()[0]}") from None
    return wrapper(replace_conv1d(model))


def build_model(spec: str, load_weights: bool = True) -> nn.Module:
    """Builds the model a spec names (eval mode). No weights are downloaded.

    Args:
        spec: ``torchvision:NAME[,k=v...]``, ``timm:NAME[,k=v...]`` or ``hf:DIRECTORY``.
        load_weights: for ``hf:``, load the weights found in the directory (else the config's random
            initialisation). torchvision and timm models always start from random weights.

    Raises:
        MissingExtraError: the optional package is not installed (the message names the pip command).
        ModelError: the spec is malformed or names no known model.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "torchvision":
        model = _torchvision(parsed)
    elif parsed.kind == "timm":
        model = _timm(parsed)
    else:
        model = _hf(parsed, load_weights)
    return model.eval()


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded torch file (plain, or under ``state_dict`` / ``model`` / ``module``)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if isinstance(obj, dict):
            nested = [obj[k] for k in ("state_dict", "model_state_dict", "model", "module", "state") if k in obj]
            if nested:
                obj = nested[0]
                continue
        break
    raise CheckpointError(f"weights {path} hold no state dict (a mapping of names to tensors, possibly under "
                          "'state_dict' or 'model')")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a torch file read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, unreadable, would need unpickling arbitrary objects, or holds
            no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            if path.suffix == ".safetensors":
                raise CheckpointError(f"weights {path} are corrupt or not safetensors: {error}") from None
    if not head.startswith((b"PK", b"\x80")):  # a torch file is a zip archive (or, from old releases, a pickle)
        raise CheckpointError(f"weights {path} are neither a safetensors file nor a torch file (torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = first_line(error)
        raise CheckpointError(f"weights {path} cannot be read as safetensors or with torch.load(weights_only=True) "
                              f"(ptsparse never unpickles arbitrary objects): {reason}") from None
    return _state_dict_from(obj, path)


_AUXILIARY = ("aux1.", "aux2.", "AuxLogits.")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a local state dict into ``model`` in place (names and shapes must match), eval mode.

    ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are removed; for a
    Hugging Face model (:class:`HFLogits`) the keys may be given with or without the ``hf.`` prefix.

    Raises:
        CheckpointError: the file cannot be read or does not match the model (the first differences named).
    """
    from ..checkpoint import load_into

    state = _strip(_strip(read_weights(path), "module."), "_orig_mod.")
    own = model.state_dict()
    # torchvision's GoogLeNet / Inception v3 checkpoints hold auxiliary heads that ptsparse builds without
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_AUXILIARY)}
    if isinstance(model, HFLogits) and not any(key.startswith(HF_PREFIX + ".") for key in state):
        state = {f"{HF_PREFIX}.{key}": value for key, value in state.items()}
    return load_into(model, state, source=f"weights {path}").eval()


# --- preprocessing ---------------------------------------------------------------------------------------

class HFImageTransform:
    """A Hugging Face image processor as a transform: PIL image -> ``pixel_values`` tensor ``(C, H, W)``."""

    def __init__(self, processor: Any, overrides: dict | None = None) -> None:
        self.processor, self.overrides = processor, dict(overrides or {})

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt", **self.overrides)["pixel_values"][0]

    def describe(self) -> dict:
        return {"processor": type(self.processor).__name__, **self.overrides}


def _torchvision_transform(spec: Spec, image_size: int | None, resize: int | None):
    from ..data import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

    crop, shorter, mean, std, interpolation = 224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    try:  # the default weights' own evaluation transform: metadata in torchvision, nothing downloaded
        tv_models = importlib.import_module("torchvision.models")
        preset = tv_models.get_model_weights(spec.name).DEFAULT.transforms()
        crop, shorter = int(preset.crop_size[0]), int(preset.resize_size[0])
        mean, std = tuple(preset.mean), tuple(preset.std)
        interpolation = str(preset.interpolation.value)
    except (ImportError, ValueError, AttributeError, KeyError, TypeError):
        pass
    wanted = image_size or spec.kwargs.get("image_size")
    if wanted:  # keep the model's resize / crop ratio
        shorter, crop = max(int(wanted), round(int(wanted) * shorter / crop)), int(wanted)
    return ImageTransform(crop=crop, resize=resize or shorter, channels=3, mean=mean, std=std,
                          interpolation=interpolation)


def _timm_transform(spec: Spec, model: nn.Module | None, image_size: int | None, resize: int | None):
    require("timm", f"preprocessing of {spec}", extra="timm")
    timm_data = require("timm.data", f"preprocessing of {spec}", extra="timm")
    if model is None:
        model = build_model(str(spec))
    config = timm_data.resolve_data_config({}, model=model)
    wanted = image_size or spec.kwargs.get("img_size")
    if wanted is None:  # a model built at another size than its pretrained config says
        patch = getattr(model, "patch_embed", None)
        size = getattr(patch, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and tuple(size) != tuple(config["input_size"][1:]):
            config["input_size"] = (config["input_size"][0], *size)
    else:
        size = tuple(wanted) if isinstance(wanted, (tuple, list)) else (int(wanted), int(wanted))
        config["input_size"] = (config["input_size"][0], *size)
    if resize:
        config["crop_pct"] = min(config["input_size"][1:]) / resize
        config["crop_mode"] = "center"
    return timm_data.create_transform(**config)


def _hf_transform(spec: Spec, model: nn.Module | None, image_size: int | None, resize: int | None):
    from ..data import ImageTransform

    transformers = require("transformers", f"preprocessing of hf:{spec.name}", extra="hf")
    directory = Path(spec.name)
    if (directory / "preprocessor_config.json").is_file():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"hf:{directory}: cannot read preprocessor_config.json: "
                             f"{str(error).splitlines()[0]}") from None
        size = dict(getattr(processor, "size", None) or {})
        cropped = bool(getattr(processor, "do_center_crop", False))
        overrides = {}
        if "shortest_edge" in size:
            if resize or image_size:
                crop = image_size or min((getattr(processor, "crop_size", None) or {}).values() or [224])
                overrides["size"] = {"shortest_edge": resize or (round(image_size * size["shortest_edge"] / crop)
                                                                 if cropped else image_size)}
            if image_size and cropped:
                overrides["crop_size"] = {"height": image_size, "width": image_size}
        elif resize:
            raise ModelError(f"hf:{directory}: its image processor resizes straight to {size}; a separate resize "
                             "before cropping does not apply (use the image size alone)")
        elif image_size:
            overrides["size"] = {"height": image_size, "width": image_size}
        return HFImageTransform(processor, overrides)
    # no processor config: the model's image size, scaled to [-1, 1] as ViT's processor does by default
    config = (model.hf.config if isinstance(model, HFLogits) else
              transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True))
    size = image_size or getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ImageTransform(crop=size, resize=resize or size, channels=getattr(config, "num_channels", 3),
                          mean=(0.5,), std=(0.5,), interpolation="bilinear")


def image_transform(spec: str, model: nn.Module | None = None, image_size: int | None = None,
                    resize: int | None = None) -> Callable:
    """The evaluation transform (PIL image -> tensor) of the model ``spec`` names.

    torchvision: the ``DEFAULT`` weights' transform metadata (e.g. resize 256 or 232, centre crop 224, ImageNet
    mean and std; read from torchvision, not downloaded) as a :class:`~ptsparse.data.ImageTransform`.
    timm: ``create_transform(**resolve_data_config({}, model=model))`` at the size the model was built for.
    ``hf:``: the directory's image processor (``preprocessor_config.json``), else a resize to the config's
    ``image_size`` with mean and std 0.5.

    Args:
        spec: the model spec (a saved result's architecture works too).
        model: the built model (timm reads its config from it); built from ``spec`` when needed.
        image_size: the crop size to use instead of the model's (the resize keeps its ratio to the crop).
        resize: the shorter side before cropping, instead of the model's (for weights trained with another
            recipe than the ``DEFAULT`` one, e.g. 256 for torchvision's V1 weights).

    Raises:
        ModelError: ``resize`` for a Hugging Face processor that resizes straight to a fixed size.
    """
    parsed = parse_spec(spec)
    for name, value in (("image size", image_size), ("resize", resize)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ModelError(f"{name} must be a positive integer, got {value!r}")
    if image_size and resize and resize < image_size:
        raise ModelError(f"resize {resize} is smaller than the crop {image_size}")
    if parsed.kind == "torchvision":
        return _torchvision_transform(parsed, image_size, resize)
    if parsed.kind == "timm":
        return _timm_transform(parsed, model, image_size, resize)
    return _hf_transform(parsed, model, image_size, resize)


def reads_token_ids(spec: str) -> bool:
    """Whether the ``hf:`` model ``spec`` names reads token ids (a causal language model or a text classifier: its
    class's ``main_input_name`` is ``input_ids``); ``False`` for other specs and for a directory that cannot be read."""
    parsed = parse_spec(spec)
    if parsed.kind != "hf":
        return False
    try:
        transformers = require("transformers", f"model hf:{parsed.name}", extra="hf")
        config = transformers.AutoConfig.from_pretrained(parsed.name, local_files_only=True)
        cls, _ = _hf_model_class(transformers, config, parsed.name)
    except (MissingExtraError, ModelError, OSError, ValueError, KeyError):
        return False
    return getattr(cls, "main_input_name", "input_ids") == "input_ids"


def image_input_shape(spec: str) -> tuple[int, ...] | None:
    """One sample's input shape for the image model ``spec`` names (its transform applied to a blank image),
    or ``None`` for a model without an image transform or one that reads token ids (a text model)."""
    from PIL import Image

    if reads_token_ids(spec):
        return None
    try:
        transform = image_transform(spec)
    except ModelError:
        return None
    return tuple(transform(Image.new("RGB", (320, 320))).shape)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer saved in an ``hf:`` directory (``local_files_only=True``).

    Raises:
        ModelError: ``spec`` is not ``hf:``, or its directory holds no tokenizer.
    """
    parsed = parse_spec(spec)
    if parsed.kind != "hf":
        raise ModelError(f"text data needs a Hugging Face model with a tokenizer (--model hf:DIR), not {spec}")
    transformers = require("transformers", f"the tokenizer of hf:{parsed.name}", extra="hf")
    try:
        return transformers.AutoTokenizer.from_pretrained(parsed.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"hf:{parsed.name} holds no usable tokenizer: {str(error).strip().splitlines()[0]}") from None


__all__ = ["Conv1DLinear", "HFCausalLM", "HFImageTransform", "HFLogits", "HF_PREFIX", "MissingExtraError", "PREFIXES",
           "SPEC_FORMS", "Spec", "build_model", "canonical_spec", "image_transform", "is_causal_lm", "is_spec",
           "load_tokenizer", "load_weights", "parse_spec", "read_weights", "reads_token_ids", "replace_conv1d"]
