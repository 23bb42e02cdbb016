"""Compressed checkpoints: each sparse tensor stored as a bitmask of its non-zeros plus their values.

A tensor of ``n`` elements with ``k`` non-zeros takes ``ceil(n / 8)`` bytes of bitmask and ``k`` values
instead of ``n`` values; a tensor is stored this way only when that is smaller, otherwise densely. At
90% sparsity with 4-byte values that is ``n/8 + 0.4 n`` bytes against ``4 n``: at most 7.6x smaller
(12.3x with 2-byte values).

File layout (safetensors, so nothing is unpickled on load), a handful of tensors whatever the model:

* ``bitmask``: uint8, the packed bitmasks of the bitmask-encoded tensors one after the other (each
  little-endian in row-major order, starting on a byte boundary);
* ``values.<dtype>``: their non-zero values, in the same order, one tensor per stored dtype;
* ``dense.<dtype>``: the flattened tensors stored densely (where a bitmask would not be smaller);
* ``layout``: uint8, zlib-compressed JSON list of ``[name, encoding, dtype, stored dtype, shape]`` in order,
  from which :func:`decode_state` finds each tensor's slice (a mask's value count is its popcount).

One tensor per kind instead of two per weight keeps the safetensors header, which names every tensor,
from eating the gain on small models (at 90% the payload of the reference model is within 7% of the
bitmask limit, so a 20 KB header would matter). The header's ``ptsparse`` metadata says
``format: "compressed"``. With the default ``value_dtype=None`` values keep their dtype and the round
trip is bit-exact (zeros read back as +0.0: a masked weight may hold -0.0, which equals +0.0 in every
computation); ``float16`` / ``bfloat16`` store floating-point values at half the size, and loading
casts them back to the original dtype.

``ptsparse.load`` reads the file back through :func:`decode_state`, this format's checkpoint reader.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import Reader, save_state
from ..errors import CheckpointError, ConfigError
from .base import ExportFormat, no_speedup_warnings, register_format

FORMAT = "compressed"
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_value_dtype(name: str | None) -> torch.dtype | None:
    """``None`` or ``"keep"`` (values keep their dtype), ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        ConfigError: any other name.
    """
    if name is None or name == "keep":
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    dtype = VALUE_DTYPES.get(aliases.get(name, name))
    if dtype is None:
        raise ConfigError(f"value dtype {name!r} is not allowed; choose keep, float32, float16 or bfloat16")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_bits(nonzero: torch.Tensor) -> torch.Tensor:
    """Packs a boolean tensor into uint8, eight elements per byte, little-endian, row-major."""
    packed = np.packbits(nonzero.flatten().cpu().numpy(), bitorder="little")
    return torch.from_numpy(packed)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat boolean tensor."""
    bits = np.unpackbits(packed.cpu().numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def encode_state(state: dict[str, torch.Tensor],
                 value_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Encodes a state dict for a compressed checkpoint.

    Args:
        state: tensor name -> tensor.
        value_dtype: storage dtype of floating-point values, or ``None`` to keep each tensor's dtype.

    Returns:
        The tensors to write (see the module docstring), and counts: ``tensors`` and ``bitmask_tensors``.
    """
    masks: list[torch.Tensor] = []
    values: dict[torch.dtype, list[torch.Tensor]] = {}
    dense: dict[torch.dtype, list[torch.Tensor]] = {}
    layout = []
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        stored = tensor.to(value_dtype) if value_dtype is not None and tensor.is_floating_point() else tensor
        flat = stored.flatten()
        nonzero = flat != 0
        bitmask_bytes = math.ceil(flat.numel() / 8) + int(nonzero.sum()) * stored.element_size()
        encoding = "bitmask" if 0 < bitmask_bytes < flat.numel() * stored.element_size() else "dense"
        if encoding == "bitmask":
            masks.append(pack_bits(nonzero))
            values.setdefault(stored.dtype, []).append(flat[nonzero])
        else:
            dense.setdefault(stored.dtype, []).append(flat)
        layout.append([name, encoding, _dtype_name(tensor.dtype), _dtype_name(stored.dtype), list(tensor.shape)])
    tensors = {"layout": torch.frombuffer(bytearray(zlib.compress(json.dumps(layout).encode(), 9)),
                                          dtype=torch.uint8)}
    if masks:
        tensors["bitmask"] = torch.cat(masks)
    for dtype, parts in values.items():
        tensors[f"values.{_dtype_name(dtype)}"] = torch.cat(parts)
    for dtype, parts in dense.items():
        tensors[f"dense.{_dtype_name(dtype)}"] = torch.cat(parts)
    return tensors, {"tensors": len(layout), "bitmask_tensors": len(masks)}


def decode_state(tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Restores the state dict that :func:`encode_state` encoded.

    Raises:
        CheckpointError: the layout is unreadable, or a tensor it names is missing or too short.
    """
    try:
        layout = json.loads(zlib.decompress(tensors["layout"].numpy().tobytes()))
    except (KeyError, zlib.error, ValueError) as error:
        raise CheckpointError(f"{source} is corrupt: unreadable compressed layout ({error})") from None
    offsets: dict[str, int] = {}

    def take(key: str, count: int) -> torch.Tensor:
        start = offsets.get(key, 0)
        if key not in tensors or start + count > tensors[key].numel():
            raise CheckpointError(f"{source} is corrupt: compressed tensor {key!r} is missing or too short")
        offsets[key] = start + count
        return tensors[key][start:start + count]

    state = {}
    for name, encoding, dtype_name, stored_name, shape in layout:
        dtype, shape = getattr(torch, dtype_name), torch.Size(shape)
        if encoding == "bitmask":
            nonzero = unpack_bits(take("bitmask", math.ceil(shape.numel() / 8)), shape.numel())
            flat = torch.zeros(shape.numel(), dtype=dtype)
            flat[nonzero] = take(f"values.{stored_name}", int(nonzero.sum())).to(dtype)
        else:
            flat = take(f"dense.{stored_name}", shape.numel()).to(dtype)
        state[name] = flat.view(shape).clone()
    return state


def save_compressed(state: dict[str, torch.Tensor], path, metadata: dict | None = None,
                    value_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Writes a compressed checkpoint atomically.

    Args:
        state: the model's state dict.
        path: destination ``.safetensors`` file.
        metadata: extra header metadata (``architecture``, ``config``, ...).
        value_dtype: storage dtype of floating-point values; ``None`` keeps them (bit-exact).

    Returns:
        ``{"tensors": n, "bitmask_tensors": m, "value_dtype": ...}``.
    """
    tensors, counts = encode_state(state, value_dtype)
    header = dict(metadata or {}, format=FORMAT, version=1,
                  value_dtype=_dtype_name(value_dtype) if value_dtype is not None else "keep")
    save_state(tensors, path, header)
    return {**counts, "value_dtype": header["value_dtype"]}


def _write(model: nn.Module, path, metadata: dict, *, example: torch.Tensor | None,
           value_dtype: str | None) -> dict[str, Any]:
    """The format's writer: the model's state dict, compressed."""
    return {"format": FORMAT, **save_compressed(model.state_dict(), path, metadata, parse_value_dtype(value_dtype))}


def _warnings(model: nn.Module, metadata: dict[str, Any]) -> list[str]:
    """The model's no-speedup warnings, and that the file is smaller but the model no faster."""
    return no_speedup_warnings(model, metadata) + [
        "a compressed checkpoint is smaller on disk; loaded, it is the same dense model and runs no faster"]


register_format(FORMAT, ExportFormat(description="bitmask + non-zero values in safetensors: a smaller file, the same model",
                                     write=_write,
                                     reader=Reader(decode=decode_state), value_dtype=True, warnings=_warnings))
