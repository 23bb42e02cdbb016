"""Safe checkpoint files: safetensors only (nothing is unpickled), written atomically.

Every write goes to a temporary file (or directory) beside its destination and is renamed into place, so an
interrupted write never leaves a partial file under the final name.

A checkpoint whose metadata names a ``format`` is read through that format's :class:`Reader` in
:data:`READERS`: :func:`load_state` decodes its tensors into the state dict, and :func:`shape_to_checkpoint`
shapes a freshly built model to fit it. The export formats register theirs (:mod:`ptsparse.export`, which
``import ptsparse`` imports): compressed checkpoints are decoded, channel-removed ones resize the layers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._registry import Registry
from .errors import CheckpointError, ConfigError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp creates 0600, and writers such as safetensors may recreate the file: give it the usual mode
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


# The files of a result directory (``ptsparse.save``, ``ptsparse sparsify --out``); an interrupted run keeps
# its recovery checkpoint in ``RESUME_DIR`` beside them.
RESULT_FILES = ("model.safetensors", "config.yaml", "report.json")
RESUME_DIR = ".resume"


def is_result_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that ptsparse wrote a result into."""
    return all((Path(path) / name).is_file() for name in ("model.safetensors", "report.json"))


def _holds_other_files(path: Path) -> bool:
    """Whether the directory ``path`` holds anything but a ptsparse result or an interrupted run's checkpoint."""
    return path.is_dir() and not is_result_directory(path) and any(i.name != RESUME_DIR for i in path.iterdir())


def check_output_directory(path: str | os.PathLike, force: bool = False) -> None:
    """Checks, before any work, that a result can be written to the directory ``path``.

    A new or empty directory, an earlier result (replaced whole) and an interrupted run's directory are fine;
    a directory holding other files only with ``force`` (the result's files are then written among them).

    Raises:
        ConfigError: ``path`` is an existing file, or a non-empty directory that is not a result (without
            ``force``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {str(path)!r} is an existing file; give a directory for "
                          f"{', '.join(RESULT_FILES)}")
    if not force and _holds_other_files(path):
        raise ConfigError(f"output directory {str(path)!r} holds files that are not a ptsparse result; give a new "
                          f"or empty directory, or force writing among them (--force)")


@contextmanager
def result_directory(path: str | os.PathLike, force: bool = False):
    """Yields an empty staging directory beside ``path``; when the block succeeds, its files become ``path``.

    An earlier result at ``path`` is replaced whole (no stale file of it stays); with ``force``, into a
    directory of other files, the staged files are moved in among them. A failed block leaves ``path`` as it was.

    Raises:
        ConfigError: see :func:`check_output_directory`.
    """
    path = Path(path)
    check_output_directory(path, force)
    old = None
    with _staging_directory(path) as staging:
        try:
            yield staging
            if _holds_other_files(path):
                for item in staging.iterdir():
                    os.replace(item, path / item.name)
            else:
                if path.exists():
                    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                    os.replace(path, old / path.name)
                try:
                    os.replace(staging, path)
                except OSError:
                    if old is not None:
                        os.replace(old / path.name, path)
                    raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _staging_directory(path: Path):
    """Yields a new empty directory beside ``path``, removed after the block unless it was renamed away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; what it becomes gets the usual permissions
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_new_directory(path: str | os.PathLike) -> None:
    """Checks that ``path`` does not exist or is an empty directory (what :func:`atomic_directory` writes to).

    Raises:
        ConfigError: ``path`` is a file, or a directory holding files.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {str(path)!r} is an existing file; give a new or empty directory")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"output directory {str(path)!r} already holds files; give a new or empty directory")


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yields an empty staging directory beside ``path``; renames it onto ``path`` only if the block succeeds, so
    an interrupted write leaves nothing under the final name.

    Raises:
        ConfigError: ``path`` is a file or a directory holding files (:func:`check_new_directory`), before the block.
    """
    path = Path(path)
    check_new_directory(path)
    with _staging_directory(path) as staging:
        yield staging
        try:
            os.replace(staging, path)  # onto an empty directory too
        except OSError as error:  # files appeared there meanwhile
            raise ConfigError(f"cannot write the directory {str(path)!r}: {error.strerror}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, data: object) -> None:
    """Writes ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Saves a state dict as safetensors; ``metadata`` (JSON-serialisable) goes into the file header.

    Tensors that share memory (a language model's output layer tied to its input embedding) are written as
    copies under each name: safetensors refuses shared memory.
    """
    from safetensors.torch import save_file

    tensors, stored = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in stored:
            tensor = tensor.clone()
        stored.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    header = {"ptsparse": json.dumps(metadata)} if metadata is not None else None
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)


def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Saves ``model.state_dict()`` as safetensors (shared tensors are stored once per name)."""
    save_state(model.state_dict(), path, metadata)  # save_state copies only the tensors that share memory


@dataclass(frozen=True)
class Reader:
    """How a checkpoint format is read back.

    Attributes:
        decode: ``decode(tensors, source)``: the stored tensors -> the state dict (``None``: they are the
            state dict). ``source`` names the file in error messages.
        fit: ``fit(model, state, metadata, source)``: shapes a freshly built model to the state dict, in
            place, before it is loaded (``None``: the model fits as built).
    """

    decode: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]] | None = None
    fit: Callable[[nn.Module, dict[str, torch.Tensor], dict, str], object] | None = None


# The ``format`` of a checkpoint's metadata -> its reader; a checkpoint without a format is a plain state dict.
READERS: Registry[Reader] = Registry("checkpoint format")


def _reader(metadata: dict | None, source: str) -> Reader | None:
    """The reader of a checkpoint's format; ``None`` for a plain state dict.

    Raises:
        CheckpointError: the format has no reader.
    """
    name = (metadata or {}).get("format")
    if name is None:
        return None
    if name not in READERS:
        raise CheckpointError(f"{source} is in format {name!r}, which ptsparse cannot read "
                              f"(known: {', '.join(READERS.names())})")
    return READERS.get(name)


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
    reader = _reader(metadata, f"checkpoint {path}")
    if reader is not None and reader.decode is not None:
        state = reader.decode(state, f"checkpoint {path}")
    return state, metadata


def shape_to_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict | None,
                        source: str = "checkpoint") -> nn.Module:
    """Shapes a freshly built model to a checkpoint's state dict, in place, as its format's reader says
    (a channel-removed checkpoint's layers are smaller than built).

    Raises:
        CheckpointError: the format has no reader, or the model cannot take the checkpoint's shapes.
    """
    reader = _reader(metadata, source)
    if reader is not None and reader.fit is not None:
        reader.fit(model, state, metadata, source)
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
    # safetensors keeps tensors only; modules that read their version while loading (torchvision's MNASNet) get
    # the versions of the model they are loaded into, which is what wrote the tensors.
    versioned = OrderedDict(state)
    versioned._metadata = getattr(own, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    model.load_state_dict(versioned)
    return model


def load_model(build: Callable[[], nn.Module], path: str | os.PathLike) -> nn.Module:
    """Builds a model and loads the safetensors checkpoint at ``path`` into it (eval mode)."""
    state, _ = load_state(path)
    return load_into(build(), state, source=f"checkpoint {path}").eval()
