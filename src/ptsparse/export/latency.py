"""Benchmarks of whole models: parameters, MACs, sparsity and latency per batch size (PyTorch or onnxruntime),
and the ``bench-latency`` table.

The measurements are the cost model's (:mod:`ptsparse.graph.cost`); ONNX files are timed the same way, with
onnxruntime on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._extras import require
from ..errors import ConfigError
from ..graph.cost import CONV_TYPES, count_macs, count_params, measure_latency, time_runs


def profile(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 64),
            device: str | torch.device = "cpu", warmup: int = 10, repeats: int = 50) -> dict[str, Any]:
    """Parameters, MACs (dense and non-zero), weight sparsity and latency per batch size of one model."""
    example = torch.zeros(1, *input_shape)
    macs = count_macs(model.cpu(), example)
    weights = [m.weight for m in model.modules() if isinstance(m, (*CONV_TYPES, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "params": count_params(model),
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
        "weight_sparsity": zeros / total if total else 0.0,
        **macs,
        "latency": {str(b): measure_latency(model, input_shape, b, device, warmup, repeats) for b in batch_sizes},
    }


def measure_onnx_latency(path, input_shape: tuple[int, ...], batch_size: int, warmup: int = 10,
                         repeats: int = 50, threads: int | None = None) -> dict[str, float]:
    """Like :func:`measure_latency`, for an ONNX file run by onnxruntime on CPU."""
    ort = require("onnxruntime", "timing ONNX models")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()
    return time_runs(lambda: session.run(None, {name: x}), batch_size, warmup, repeats)


def onnx_params(path) -> int:
    """Elements of an ONNX file's initializers (its stored weights)."""
    onnx = require("onnx", "reading ONNX models")
    graph = onnx.load(str(path)).graph
    return sum(int(torch.tensor(list(t.dims)).prod()) if t.dims else 1 for t in graph.initializer)


def check_timing(batch_sizes, warmup: int, repeats: int) -> None:
    """Validates timing settings.

    Raises:
        ConfigError: a batch size below 1, a negative warm-up, or fewer than 1 timed repeat.
    """
    for batch in batch_sizes:
        if batch < 1:
            raise ConfigError(f"batch size {batch} is not allowed; batch sizes must be >= 1")
    if warmup < 0:
        raise ConfigError(f"warmup {warmup} is not allowed; it must be >= 0")
    if repeats < 1:
        raise ConfigError(f"repeats {repeats} is not allowed; it must be >= 1")


def format_latency_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``bench-latency`` result; speedups are against the first model."""
    batches = [str(b) for b in result["batch_sizes"]]
    header = ["model", "params", "MACs (M)", "non-zero MACs (M)"]
    header += [f"b{b} ms" for b in batches] + [f"b{batches[-1]} samples/s", f"b{batches[-1]} speedup"]
    lines = [f"device {result['device']}, torch {result['torch']}, {result['threads']} threads, median of "
             f"{result['repeats']} runs after {result['warmup']} warm-up runs", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = result["models"][0]["latency"][batches[-1]]["median_ms"] if result["models"] else None

    def millions(value) -> str:
        return f"{value / 1e6:.2f}" if value is not None else "n/a"

    for row in result["models"]:
        latency = row["latency"]
        cells = [row["model"], f"{row['params']:,}", millions(row.get("macs")), millions(row.get("nonzero_macs"))]
        cells += [f"{latency[b]['median_ms']:.2f}" for b in batches]
        cells += [f"{latency[batches[-1]]['throughput']:.0f}", f"{base / latency[batches[-1]]['median_ms']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
