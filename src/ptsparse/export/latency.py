"""Benchmarks of whole models: parameters, MACs, sparsity and latency per batch size (PyTorch or onnxruntime),
and the ``bench-latency`` table.

The measurements are the cost model's (:mod:`ptsparse.graph.cost`); ONNX files are timed the same way, with
onnxruntime on CPU. Each timing keeps the spread of its runs (quartiles, min and max), and a model is called
faster or slower than the baseline only when the difference is larger than that spread: see
:func:`within_spread`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._extras import require
from ..errors import ConfigError, ExportError, first_line
from ..graph.cost import CONV_TYPES, NOISY_IQR, count_macs, count_params, is_noisy, measure_latency, time_runs


def profile(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 64),
            device: str | torch.device = "cpu", warmup: int = 10, repeats: int = 50,
            compiled: bool = False) -> dict[str, Any]:
    """Parameters, MACs (dense and non-zero), weight sparsity and latency per batch size of one model.

    Args:
        compiled: time the model compiled by ``torch.compile`` (default mode: Inductor, which folds BatchNorm into
            convolutions and fuses elementwise layers, and on the CPU needs a C++ compiler); the first warm-up
            run of each batch size compiles (:func:`check_timing` asks for one).

    Raises:
        ExportError: ``torch.compile`` could not compile the model (the first line of its error).
    """
    example = torch.zeros(1, *input_shape)
    macs = count_macs(model.cpu(), example)
    weights = [m.weight for m in model.modules() if isinstance(m, (*CONV_TYPES, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    timed = torch.compile(model) if compiled else model
    try:
        latency = {str(b): measure_latency(timed, input_shape, b, device, warmup, repeats) for b in batch_sizes}
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise ExportError(f"torch.compile could not compile the model: {first_line(error)} (on the CPU it needs a "
                          "C++ compiler such as g++); time it without --compile") from error
    return {
        "params": count_params(model),
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
        "weight_sparsity": zeros / total if total else 0.0,
        **macs,
        "latency": latency,
    }


def onnx_runner(path, input_shape: tuple[int, ...], batch_size: int,
                threads: int | None = None) -> Callable[[], object]:
    """One forward pass of an ONNX file under onnxruntime's CPU provider on a fixed random batch, ready to time
    (the session and its input are built here, not in the call)."""
    ort = require("onnxruntime", "timing ONNX models")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name:
            torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()}
    return lambda: session.run(None, feed)


def measure_onnx_latency(path, input_shape: tuple[int, ...], batch_size: int, warmup: int = 10,
                         repeats: int = 50, threads: int | None = None) -> dict[str, float]:
    """Like :func:`measure_latency`, for an ONNX file run by onnxruntime on CPU."""
    return time_runs(onnx_runner(path, input_shape, batch_size, threads), batch_size, warmup, repeats)


def onnx_params(path) -> int:
    """Elements of an ONNX file's initializers (its stored weights)."""
    onnx = require("onnx", "reading ONNX models")
    graph = onnx.load(str(path)).graph
    return sum(int(torch.tensor(list(t.dims)).prod()) if t.dims else 1 for t in graph.initializer)


def check_timing(batch_sizes, warmup: int, repeats: int, compiled: bool = False) -> None:
    """Validates timing settings.

    Raises:
        ConfigError: a batch size below 1, a negative warm-up (none with ``compiled``: the first run compiles),
            or fewer than 1 timed repeat.
    """
    for batch in batch_sizes:
        if batch < 1:
            raise ConfigError(f"batch size {batch} is not allowed; batch sizes must be >= 1")
    if warmup < 0:
        raise ConfigError(f"warmup {warmup} is not allowed; it must be >= 0")
    if compiled and warmup < 1:
        raise ConfigError(f"warmup {warmup} is not allowed with --compile; it must be >= 1 (the first run compiles)")
    if repeats < 1:
        raise ConfigError(f"repeats {repeats} is not allowed; it must be >= 1")


def within_spread(stats: dict[str, float], base: dict[str, float]) -> bool:
    """Whether two timings are too close to tell apart: their interquartile ranges [q1, q3] overlap.

    Timings without quartiles (older results) are never within the spread.
    """
    if not all(key in t for t in (stats, base) for key in ("q1_ms", "q3_ms")):
        return False
    return stats["q1_ms"] <= base["q3_ms"] and base["q1_ms"] <= stats["q3_ms"]


def speedups(result: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
    """Each model's speedup over the first model, per batch size.

    Returns:
        Per model, ``{batch: {"ratio": baseline median / median, "within_spread": bool}}``; the baseline row
        has ratio 1 and ``within_spread`` false.
    """
    if not result["models"]:
        return []
    base = result["models"][0]["latency"]
    rows = [{b: {"ratio": 1.0, "within_spread": False} for b in base}]
    for row in result["models"][1:]:
        rows.append({b: {"ratio": base[b]["median_ms"] / stats["median_ms"],
                         "within_spread": within_spread(stats, base[b])}
                     for b, stats in row["latency"].items() if b in base})
    return rows


def speedup_cell(speedup: dict[str, Any]) -> str:
    """``1.23x``, or ``~1x (within spread)`` when the difference from the baseline is inside the spread."""
    return "~1x (within spread)" if speedup["within_spread"] else f"{speedup['ratio']:.2f}x"


def spread_warning(result: dict[str, Any]) -> str | None:
    """One line naming the timings whose runs are noisy (IQR > NOISY_IQR of the median), or None."""
    noisy = [f"{row['model']} at batch {b} ({stats['relative_iqr']:.0%})"
             for row in result["models"] for b, stats in row["latency"].items() if is_noisy(stats)]
    if not noisy:
        return None
    return (f"timed runs vary a lot: the interquartile range is more than {NOISY_IQR:.0%} of the median for "
            f"{', '.join(noisy)}; the machine may be busy, so medians and speedups are unreliable: rerun on an "
            f"idle machine with more --repeats or fewer --threads")


def format_latency_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``bench-latency`` result; speedups are against the first model.

    Latencies are ``median [q1-q3]`` in ms. A speedup within the spread (the model's and the baseline's
    interquartile ranges overlap, :func:`within_spread`) reads ``~1x (within spread)`` instead of a ratio.
    """
    batches = [str(b) for b in result["batch_sizes"]]
    header = ["model", "params", "MACs (M)", "non-zero MACs (M)"]
    header += [f"b{b} ms" for b in batches] + [f"b{batches[-1]} samples/s", f"b{batches[-1]} speedup"]
    compiled = ", PyTorch models compiled by torch.compile" if result.get("compiled") else ""
    lines = [f"device {result['device']}, torch {result['torch']}, {result['threads']} threads{compiled}, median "
             f"[interquartile range] of {result['repeats']} runs after {result['warmup']} warm-up runs", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def millions(value) -> str:
        return f"{value / 1e6:.2f}" if value is not None else "n/a"

    def timing(stats) -> str:
        if "q1_ms" not in stats:
            return f"{stats['median_ms']:.2f}"
        return f"{stats['median_ms']:.2f} [{stats['q1_ms']:.2f}-{stats['q3_ms']:.2f}]"

    compared = speedups(result)
    for index, (row, speedup) in enumerate(zip(result["models"], compared)):
        latency = row["latency"]
        cells = [row["model"], f"{row['params']:,}", millions(row.get("macs")), millions(row.get("nonzero_macs"))]
        cells += [timing(latency[b]) for b in batches]
        cells += [f"{latency[batches[-1]]['throughput']:.0f}",
                  "1.00x (baseline)" if index == 0 else speedup_cell(speedup[batches[-1]])]
        lines.append("| " + " | ".join(cells) + " |")
    if any(s[batches[-1]]["within_spread"] for s in compared[1:]):
        lines += ["", "~1x (within spread): the model's and the baseline's interquartile ranges overlap, so the "
                      "difference is not told apart from run-to-run noise"]
    return "\n".join(lines)
