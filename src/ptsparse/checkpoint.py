"""Safe checkpoint files: safetensors only (nothing is unpickled), written atomically.

Every write goes to a temporary file in the destination directory and is renamed into place, so an
interrupted write never leaves a partial file under the final name.

Besides plain state dicts, :func:`load_state` reads the two exported kinds (:mod:`ptsparse.export`):
compressed checkpoints (bitmask + non-zero values, decoded back to the dense state dict) and
channel-removed checkpoints, whose metadata lists the new sizes of the resized layers so that
:func:`resize_modules` can shape a freshly built model to fit them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, data: object) -> None:
    """Writes ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Saves a state dict as safetensors; ``metadata`` (JSON-serialisable) goes into the file header."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    header = {"ptsparse": json.dumps(metadata)} if metadata is not None else None
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)


def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Saves ``model.state_dict()`` as safetensors (shared tensors are stored once per name)."""
    save_state({name: tensor.clone() for name, tensor in model.state_dict().items()}, path, metadata)


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Loads a safetensors state dict and the metadata written by :func:`save_state`.

    Raises:
        CheckpointError: the file is missing or is not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header["ptsparse"]) if "ptsparse" in header else None
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from None
    if metadata and metadata.get("format") == "compressed":
        from .export.compressed import decode_state

        state = decode_state(state, source=f"checkpoint {path}")
    return state, metadata


# Size attributes of the layers channel removal resizes, and which of them a weight's shape determines.
_SIZE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                    "normalized_shape", "num_channels", "num_groups", "embedding_dim",
                    "num_heads", "attn_dim", "num_attention_heads", "all_head_size")  # heads: ptsparse.attention


def module_sizes(model: nn.Module) -> dict[str, dict[str, object]]:
    """The size attributes (``in_channels``, ``out_features``, ``num_features``, ...) of every module."""
    sizes = {}
    for name, module in model.named_modules():
        found = {a: getattr(module, a) for a in _SIZE_ATTRIBUTES if isinstance(getattr(module, a, None), (int, tuple))}
        if found:
            sizes[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in found.items()}
    return sizes


def resize_modules(model: nn.Module, sizes: dict[str, dict[str, object]], state: dict[str, torch.Tensor],
                   source: str = "checkpoint") -> nn.Module:
    """Shapes a freshly built model to a channel-removed checkpoint, in place.

    Sets each listed module's size attributes and replaces its parameters and buffers by empty tensors
    of the checkpoint's shapes (``load_into`` then fills them).

    Raises:
        CheckpointError: a listed module does not exist in the model.
    """
    modules = dict(model.named_modules())
    for name, attributes in sizes.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{source} resizes module {name!r}, which the model does not have")
        for attribute, value in attributes.items():
            setattr(module, attribute, tuple(value) if isinstance(value, list) else value)
        prefix = f"{name}." if name else ""
        for key, tensor in list(module.named_parameters(recurse=False)):
            new = state.get(prefix + key)
            if new is not None and new.shape != tensor.shape:
                setattr(module, key, nn.Parameter(torch.empty_like(new, dtype=tensor.dtype),
                                                  requires_grad=tensor.requires_grad))
        for key, tensor in list(module.named_buffers(recurse=False)):
            new = state.get(prefix + key)
            if tensor is not None and new is not None and new.shape != tensor.shape:
                setattr(module, key, torch.empty_like(new, dtype=tensor.dtype))
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Copies ``state`` into ``model``, requiring the same names and shapes.

    Raises:
        CheckpointError: names or shapes differ; the message lists the first differences.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            parts.append("shape of " + ", ".join(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                                                 for k in wrong[:3]))
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)
    return model


def load_model(build: Callable[[], nn.Module], path: str | os.PathLike) -> nn.Module:
    """Builds a model and loads the safetensors checkpoint at ``path`` into it (eval mode)."""
    state, _ = load_state(path)
    return load_into(build(), state, source=f"checkpoint {path}").eval()
