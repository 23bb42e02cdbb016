"""Export benchmark on the reference model: file sizes of compressed checkpoints, and the CPU latency and
accuracy of channel-removed models at a given MAC (FLOPs) reduction.

* ``size``: magnitude pruning (ERK, the default method) at 0.5 / 0.9 / 0.95 unstructured; each model is
  written as the dense safetensors checkpoint and as compressed checkpoints with fp32 and fp16 values, and
  the compressed fp32 file must load back bit-exactly.
* ``channels``: Taylor channel pruning (the ``taylor`` preset: coupled channels, BatchNorm re-calibration,
  no fine-tuning) at each MAC reduction target, by the uniform allocation (bisection on the channel
  sparsity) or the knapsack under the MAC (or a measured latency) budget; MACs counted after removal,
  Conv and Linear layers. Then the channels are removed and the
  dense and the smaller model are timed on this CPU (median of repeated runs after warm-up, batch 1 and
  64) and evaluated on the test split.
* ``zoo``: the same channel pruning and removal on torchvision ImageNet models (``--zoo-models``, default
  ResNet-50 and MobileNetV2, random weights seeded by ``--seed``) at ``--image-size`` (224), calibrated on
  random images (no data set: with random weights accuracy means nothing and is not evaluated); uniform,
  knapsack on MACs and knapsack on latency (a table measured on ``--device`` at the largest ``--zoo-batches``
  and the image size: ``knapsack_latency_batch``) at 50% by default. Dense and removed models are timed on
  ``--device`` in PyTorch and, exported to ONNX, by onnxruntime on CPU, at batch 1 and 32, and their PyTorch
  forward pass is split by kind of layer (:func:`time_by_kind`: milliseconds and MACs of pointwise, spatial and
  grouped convolutions, normalisation, ...). The latency allocation's measured latency reduction is checked
  against its budget (within 5%). ``--compile`` also times both models under ``torch.compile`` at the largest
  batch. Not in the default parts
  (about 25 minutes on 2 cores): ``--parts zoo``.

Each measurement is one JSON file in ``benchmarks/results/export/`` (``--out`` to write elsewhere);
:func:`export_section` builds the markdown tables for ``RESULTS.md`` from them::

    python benchmarks/export_bench.py                      # both parts, full settings (run on a quiet CPU)
    python benchmarks/export_bench.py --parts size
    python benchmarks/export_bench.py --parts zoo          # torchvision ResNet-50 / MobileNetV2 at 224 x 224
    python benchmarks/export_bench.py --parts zoo --zoo-models torchvision:resnet50 --zoo-allocations knapsack \\
        --compile --out benchmarks/results/export/zoo-repeats/run1   # a row timed again: the timing-noise table
    python benchmarks/export_bench.py --table              # print the markdown section
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import ptsparse
from ptsparse.checkpoint import write_json
from ptsparse.data import FashionMNIST, sample_calibration
from ptsparse.evaluate import accuracy
from ptsparse.export import dense_checkpoint_bytes, export_model
from ptsparse.export.channels import remove_channels
from ptsparse.export.latency import onnx_runner
from ptsparse.export.onnx import export_onnx
from ptsparse.graph.cost import CONV_TYPES, count_params, latency_stats, synchronize, weight_applications
from ptsparse.models import load_reference, resolve_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "export"
ARCH = {"architecture": "reference_resnet20"}
INPUT_SHAPE = (1, 28, 28)
SIZE_SPARSITIES = (0.5, 0.9, 0.95)
MAC_REDUCTIONS = (0.3, 0.5)
BATCH_SIZES = (1, 64)
WARMUP, REPEATS = 20, 100
# The zoo part: torchvision models at ImageNet resolution. One ResNet-50 forward pass at batch 32 takes seconds
# on 2 cores, so it times fewer runs; its Taylor scores come from one batch of random images (one backward pass),
# as the uniform allocation's bisection runs sparsify about 8 times.
ZOO_MODELS = ("torchvision:resnet50", "torchvision:mobilenet_v2")
ZOO_IMAGE_SIZE = 224
ZOO_BATCH_SIZES = (1, 32)
ZOO_ALLOCATIONS = ("uniform", "knapsack", "knapsack-latency")
# Channel allocations by name; ``-x8``: channels pruned 8 at a time (``channel_multiple=8``), widths multiples of 8.
ALLOCATIONS = ("uniform", "uniform-x8", "knapsack", "knapsack-x8", "knapsack-latency", "knapsack-latency-x8")
ZOO_REDUCTIONS = (0.5,)
ZOO_WARMUP, ZOO_REPEATS = 3, 15
ZOO_CALIB_SIZE = 16
REPEATS_DIR = "zoo-repeats"  # zoo rows timed again: REPEATS_DIR/run1/zoo-*.json, ... (the timing noise table)
BY_KIND_RUNS = 3  # forward passes per model split by layer kind (time_by_kind), at the largest batch
# The latency allocation meets its budget when the measured latency is at most this much above it.
BUDGET_TOLERANCE = 0.05


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(threads: int) -> dict:
    # timing "alternating": dense and pruned timed in turns (time_alternately); rows without it: one, then the other
    return {"cpu": _cpu_name(), "threads": threads, "torch": torch.__version__, "timing": "alternating"}


def _timing(row: dict) -> str:
    """How a row's dense and pruned models were timed, for the tables' paragraphs."""
    return ("dense and pruned taking turns run by run" if row.get("timing") == "alternating"
            else "the dense model's runs, then the pruned model's")


def size_run(sparsity: float, calib, out: Path) -> dict:
    """Compressed checkpoint sizes of the reference model pruned to ``sparsity`` (unstructured)."""
    result = ptsparse.sparsify(load_reference(), calib, sparsity=sparsity, progress=False,
                               architecture="reference_resnet20", calib_size=len(calib))
    row = {"part": "size", "sparsity": sparsity, "achieved_sparsity": result.report["achieved_sparsity"],
           "method": result.config.method, "allocation": result.config.allocation,
           "dense_bytes": dense_checkpoint_bytes(result.model)}
    with tempfile.TemporaryDirectory() as directory:
        for dtype in ("keep", "float16"):
            path = Path(directory) / f"{dtype}.safetensors"
            report = export_model(result.model, "compressed", path, metadata=ARCH, value_dtype=dtype)
            key = "fp32" if dtype == "keep" else "fp16"
            row[f"compressed_{key}_bytes"] = report["bytes"]
            row[f"ratio_{key}"] = report["size_ratio"]
            if dtype == "keep":
                loaded = ptsparse.load(path).state_dict()
                row["round_trip_exact"] = all(
                    torch.equal(t.flatten().view(torch.uint8), loaded[k].flatten().view(torch.uint8))
                    if t.is_floating_point() else torch.equal(t, loaded[k])
                    for k, t in result.model.state_dict().items())
    # 1 bit per counted weight plus 4 bytes per non-zero, against 4 bytes per weight
    row["bitmask_limit_fp32"] = 4 / (1 / 8 + 4 * (1 - sparsity))
    write_json(out / f"size-{sparsity:g}.json", row)
    return row


def _mac_reduction(sparsity: float, calib, example, picks: dict,
                   build: Callable[[], nn.Module] | None = None) -> tuple[float, ptsparse.SparsifyResult]:
    model, named = (load_reference(), {"architecture": "reference_resnet20"}) if build is None else (build(), {})
    result = ptsparse.sparsify(model, calib, method="taylor", sparsity=sparsity, progress=False,
                               calib_size=len(calib), **named, **picks)
    _, report = remove_channels(result.model, example)
    return report["mac_reduction"], result


def channel_sparsity_for(target: float, calib, example, picks: dict, tolerance: float = 0.0025,
                         build: Callable[[], nn.Module] | None = None) -> float:
    """The smallest channel sparsity (to ``tolerance``) whose channel-removed model saves ``target`` of the MACs
    (``picks``: further sparsify options; ``build``: the dense model, the reference model by default)."""
    low, high = 0.0, 0.6  # 60% of the channels removes well over half the MACs
    while high - low > tolerance:
        middle = (low + high) / 2
        reduction, _ = _mac_reduction(middle, calib, example, picks, build)
        low, high = (middle, high) if reduction < target else (low, middle)
        print(f"  channel sparsity {middle:.4f}: MAC reduction {reduction:.4f}", file=sys.stderr)
    return round(high, 4)


def time_alternately(runs: dict[str, Callable[[], object]], batch: int, warmup: int, repeats: int) -> dict[str, dict]:
    """:func:`~ptsparse.graph.cost.latency_stats` of each run: ``warmup`` untimed calls of each, then ``repeats``
    timed rounds in which every run takes its turn, so a change in the machine's speed while they are measured
    (load, clock, the allocator's state) reaches them all alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: latency_stats(values, batch) for name, values in times.items()}


@torch.inference_mode()
def time_both(dense: nn.Module, smaller: nn.Module, example: torch.Tensor, input_shape: tuple[int, ...],
              batch_sizes, device: str, warmup: int, repeats: int, threads: int) -> tuple[dict, dict]:
    """Latency of the dense and the channel-removed model at each batch (:func:`time_alternately`): in PyTorch on
    ``device``, then exported to ONNX and run by onnxruntime on the CPU with ``threads``;
    ``{"dense"|"pruned": {batch: stats}}`` each."""
    models = {"dense": dense.to(device).eval(), "pruned": smaller.to(device).eval()}
    latency, onnx_latency = {"dense": {}, "pruned": {}}, {"dense": {}, "pruned": {}}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)

        def forward(model: nn.Module) -> Callable[[], None]:
            return lambda: (model(x), synchronize(device))

        for name, stats in time_alternately({n: forward(m) for n, m in models.items()}, batch, warmup,
                                            repeats).items():
            latency[name][str(batch)] = stats
    with tempfile.TemporaryDirectory() as directory:
        paths = {name: Path(directory) / f"{name}.onnx" for name in models}
        for name, model in models.items():
            export_onnx(model.cpu(), example.cpu(), paths[name])
        for batch in batch_sizes:
            runs = {name: onnx_runner(path, input_shape, batch, threads) for name, path in paths.items()}
            for name, stats in time_alternately(runs, batch, warmup, repeats).items():
                onnx_latency[name][str(batch)] = stats
    return latency, onnx_latency


def time_compiled(dense: nn.Module, smaller: nn.Module, input_shape: tuple[int, ...], batch: int, device: str,
                  warmup: int, repeats: int) -> tuple[dict, dict[str, float]]:
    """Latency of the dense and the channel-removed model compiled by ``torch.compile`` (default mode: Inductor,
    which on the CPU needs a C++ compiler) at ``batch``, as :func:`time_alternately`; and each model's first call
    (``compile_s``: compiling, or less where Inductor's on-disk cache already holds the model's kernels). Shows whether a speedup measured in eager PyTorch holds once BatchNorm is folded into the
    convolutions and the elementwise layers are fused."""
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    runs, compile_s = {}, {}
    with torch.inference_mode():
        for name, model in (("dense", dense), ("pruned", smaller)):
            compiled = torch.compile(model.to(device).eval())
            start = time.perf_counter()
            compiled(x)
            synchronize(device)
            compile_s[name] = time.perf_counter() - start
            runs[name] = (lambda compiled=compiled: (compiled(x), synchronize(device)))
        return time_alternately(runs, batch, warmup, repeats), compile_s


# Kinds of layer whose time and MACs the zoo rows split (``time_by_kind``), in table order: "grouped conv" holds
# the depthwise ones; "between" is the forward time outside every module (additions, freeing memory, Python).
KINDS = ("pointwise conv", "spatial conv", "grouped conv", "linear", "normalisation", "activation and pooling",
         "between")


def layer_kind(module: nn.Module) -> str | None:
    """The :data:`KINDS` entry of a leaf module, ``None`` for a container or a module timed in another's."""
    if isinstance(module, CONV_TYPES):
        if module.groups > 1:
            return "grouped conv"
        return "pointwise conv" if all(size == 1 for size in module.kernel_size) else "spatial conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return "normalisation"
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
                           nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten)):
        return "activation and pooling"
    return None


@torch.inference_mode()
def time_by_kind(model: nn.Module, x: torch.Tensor, device: str, runs: int = 3) -> dict[str, dict[str, float]]:
    """Where one forward pass of ``x`` spends its time: milliseconds (mean of ``runs`` after one warm-up) and
    MACs per sample (:func:`~ptsparse.graph.cost.weight_applications`) of each :data:`KINDS` entry, timed by hooks
    around every leaf module (the device synchronised at each); "between" is the pass's wall time less the
    modules'."""
    macs = dict.fromkeys(KINDS, 0)
    for application in weight_applications(model, x):
        macs[layer_kind(application.layer)] += application.positions * application.weight.numel()
    seconds = dict.fromkeys(KINDS, 0.0)
    started: dict[nn.Module, float] = {}

    def before(module: nn.Module, inputs) -> None:
        synchronize(device)
        started[module] = time.perf_counter()

    def after(module: nn.Module, inputs, output) -> None:
        synchronize(device)
        seconds[layer_kind(module)] += time.perf_counter() - started[module]

    model(x)  # warm-up
    hooks = [hook for module in model.modules() if layer_kind(module)
             for hook in (module.register_forward_pre_hook(before), module.register_forward_hook(after))]
    try:
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    seconds["between"] = total - sum(seconds.values())
    return {kind: {"ms": 1000 * seconds[kind] / runs, "macs": macs[kind]} for kind in KINDS}


def allocation_picks(allocation: str) -> tuple[str, dict]:
    """An allocation name (:data:`ALLOCATIONS`): its kind (``uniform``, ``knapsack``, ``knapsack-latency``) and
    its ``sparsify`` options but the latency batch."""
    kind = allocation.removesuffix("-x8")
    picks = {"channel_multiple": 8} if allocation.endswith("-x8") else {}
    if kind != "uniform":
        picks |= {"allocation": "knapsack", "knapsack_cost": "latency" if kind == "knapsack-latency" else "macs"}
    return kind, picks


def channel_run(target: float, calib, test, out: Path, warmup: int, repeats: int, threads: int,
                allocation: str = "uniform") -> dict:
    """Latency and accuracy of the reference model after Taylor channel pruning to ``target`` MAC reduction.

    ``allocation``: ``uniform`` (the same fraction of channels in every layer, bisected to the target),
    ``knapsack`` (channels chosen under the MAC budget) or ``knapsack-latency`` (under a latency table measured
    on this CPU at batch 64; ``target`` is then the latency fraction removed); each with ``-x8``: channels
    pruned 8 at a time (``channel_multiple=8``).
    """
    example = torch.randn(8, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    kind, picks = allocation_picks(allocation)
    sparsity = channel_sparsity_for(target, calib, example, picks) if kind == "uniform" else target
    result = ptsparse.sparsify(load_reference(), calib, method="taylor", sparsity=sparsity, eval_data=test,
                               progress=False, architecture="reference_resnet20", calib_size=len(calib), **picks)
    smaller, report = remove_channels(result.model, example)
    dense = load_reference()
    latency, onnx_latency = time_both(dense, smaller, example, INPUT_SHAPE, BATCH_SIZES, "cpu", warmup, repeats,
                                      threads)
    row = {
        "part": "channels", "allocation": allocation, "target_mac_reduction": target,
        "channel_sparsity": result.report["achieved_sparsity"],
        "achieved_sparsity": result.report["achieved_sparsity"], "mac_reduction": report["mac_reduction"],
        "macs": report["macs"], "macs_after": report["macs_after"],
        "params": count_params(dense), "params_after": count_params(smaller),
        "channels_removed": report["channels_removed"], "zeroed_channels_kept": report["zeroed_channels_kept"],
        "dense_accuracy": result.report["dense_accuracy"], "masked_accuracy": result.report["sparse_accuracy"],
        "pruned_accuracy": accuracy(smaller, test), "latency": latency,
        "speedup": {b: latency["dense"][b]["median_ms"] / latency["pruned"][b]["median_ms"] for b in latency["dense"]},
        "onnxruntime_latency": onnx_latency,
        "onnxruntime_speedup": {b: onnx_latency["dense"][b]["median_ms"] / onnx_latency["pruned"][b]["median_ms"]
                                for b in onnx_latency["dense"]},
        "warmup": warmup, "repeats": repeats, **_machine(threads),
    }
    write_json(out / ("channels-" + ("" if allocation == "uniform" else f"{allocation}-") + f"{target:g}.json"), row)
    return row


def _zoo_model(spec: str, seed: int) -> nn.Module:
    """The model ``spec`` names with random weights drawn from ``seed`` (the same on every call)."""
    torch.manual_seed(seed)
    model, _ = resolve_model(spec)
    return model


def _zoo_name(spec: str) -> str:
    return spec.split(":", 1)[-1].replace(",", "-").replace("=", "")


def zoo_run(spec: str, target: float, allocation: str, out: Path, *, image_size: int = ZOO_IMAGE_SIZE,
            batch_sizes: tuple[int, ...] = ZOO_BATCH_SIZES, calib_size: int = ZOO_CALIB_SIZE,
            warmup: int = ZOO_WARMUP, repeats: int = ZOO_REPEATS, threads: int = 1, device: str = "cpu",
            seed: int = 0, compiled: bool = False) -> dict:
    """Latency of a torchvision model (random weights) before and after Taylor channel pruning and removal.

    Calibration is ``calib_size`` random images (one batch: one backward pass for the Taylor scores); no BatchNorm
    re-calibration while the uniform allocation bisects (MACs do not depend on it), the ``taylor`` preset's
    re-calibration for the timed model. ``allocation``: as :func:`channel_run`; ``knapsack-latency`` times its
    table on ``device`` at the largest of ``batch_sizes`` and ``image_size`` (``knapsack_latency_batch``), and
    ``target`` is then the fraction of that latency removed: the row records the measured reduction at that
    batch against the budget. ``compiled``: also time both models under ``torch.compile`` at that batch
    (:func:`time_compiled`).
    """
    input_shape = (3, image_size, image_size)
    generator = torch.Generator().manual_seed(seed)
    calib = torch.randn(calib_size, *input_shape, generator=generator)
    example = torch.randn(2, *input_shape, generator=generator)
    table_batch = max(batch_sizes)
    built = []

    def build() -> nn.Module:
        built.append(spec)
        return _zoo_model(spec, seed)

    common = {"batch_size": calib_size, "device": device}
    bisection_s = 0.0
    kind, picks = allocation_picks(allocation)
    if kind == "uniform":
        start = time.perf_counter()
        sparsity = channel_sparsity_for(target, calib, example, {**common, **picks, "bn_recalibration": False},
                                        build=build)
        bisection_s = time.perf_counter() - start
    else:
        sparsity = target
        if kind == "knapsack-latency":
            picks["knapsack_latency_batch"] = table_batch
    start = time.perf_counter()
    result = ptsparse.sparsify(build(), calib, method="taylor", sparsity=sparsity, progress=False,
                               calib_size=calib_size, **common, **picks)
    sparsify_s = time.perf_counter() - start
    calls = len(built)
    smaller, report = remove_channels(result.model, example)
    dense = build()
    latency, onnx_latency = time_both(dense, smaller, example, input_shape, batch_sizes, device, warmup, repeats,
                                      threads)
    speedup = {b: latency["dense"][b]["median_ms"] / latency["pruned"][b]["median_ms"] for b in latency["dense"]}
    x = torch.randn(table_batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    by_kind = {"batch": table_batch, "runs": BY_KIND_RUNS,
               **{name: time_by_kind(model.to(device), x, device, BY_KIND_RUNS)
                  for name, model in (("dense", dense), ("pruned", smaller))}}
    row = {
        "part": "zoo", "model": spec, "weights": f"random (seed {seed})", "image_size": image_size,
        "allocation": allocation, "target_reduction": target, "criterion": "taylor",
        "calibration": f"{calib_size} random N(0, 1) images, one batch", "sparsify_calls": calls,
        "bisection_s": bisection_s, "sparsify_s": sparsify_s,
        "channel_sparsity": result.report["achieved_sparsity"],
        "mac_reduction": report["mac_reduction"], "macs": report["macs"], "macs_after": report["macs_after"],
        "params": count_params(dense), "params_after": count_params(smaller),
        "channels_removed": report["channels_removed"], "zeroed_channels_kept": report["zeroed_channels_kept"],
        "device": device, "batch_sizes": list(batch_sizes), "latency": latency, "speedup": speedup,
        "onnxruntime_latency": onnx_latency,
        "onnxruntime_speedup": {b: onnx_latency["dense"][b]["median_ms"] / onnx_latency["pruned"][b]["median_ms"]
                                for b in onnx_latency["dense"]},
        "onnxruntime_provider": "CPUExecutionProvider", "time_by_kind": by_kind,
        "warmup": warmup, "repeats": repeats, **_machine(threads),
    }
    if compiled:
        stats, compile_s = time_compiled(dense, smaller, input_shape, table_batch, device, warmup, repeats)
        row["compiled"] = {"batch": table_batch, "latency": stats, "compile_s": compile_s,
                           "speedup": stats["dense"]["median_ms"] / stats["pruned"]["median_ms"]}
    if torch.device(device).type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if kind == "knapsack-latency":
        search = result.report["allocation_search"]
        dense_ms = latency["dense"][str(table_batch)]["median_ms"]
        pruned_ms = latency["pruned"][str(table_batch)]["median_ms"]
        budget_ms = (1 - target) * dense_ms
        row["latency_budget"] = {
            "batch": search["latency_batch"], "table_dense_ms": search["dense_cost"],
            "table_after_ms": search["cost_after"], "table_reduction": search["reduction"],
            "budget_ms": budget_ms, "measured_reduction": 1 - pruned_ms / dense_ms,
            "over_budget": pruned_ms / budget_ms - 1, "tolerance": BUDGET_TOLERANCE,
            "within_tolerance": pruned_ms <= (1 + BUDGET_TOLERANCE) * budget_ms,
            # the allocation's own end-to-end timings of its plans (knapsack_latency_rounds; None: table only)
            "allocation_measured": search.get("measured")}
    suffix = f"-{image_size}px" if image_size != ZOO_IMAGE_SIZE else ""
    suffix += f"-{torch.device(device).type}" if torch.device(device).type != "cpu" else ""
    write_json(out / f"zoo-{_zoo_name(spec)}{suffix}-{allocation}-{target:g}.json", row)
    return row


def _load(directory: Path, part: str) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob(f"{part}-*.json"))]
    return sorted(rows, key=lambda r: (r.get("allocation", "uniform") != "uniform", r.get("allocation", ""),
                                       r.get("sparsity", r.get("target_mac_reduction", 0))))


def export_section(directory: str | Path = RESULTS) -> str:
    """Markdown for ``RESULTS.md``: compressed file sizes and channel-pruned latency, from the JSON results."""
    directory = Path(directory)
    sizes, channels, zoo = _load(directory, "size"), _load(directory, "channels"), _load_zoo(directory)
    lines = ["## Exports: file size and CPU latency", "",
             "Produced by `python benchmarks/export_bench.py` (JSON in `benchmarks/results/export/`)."]
    if sizes:
        lines += ["", "Compressed checkpoints (`ptsparse export --format compressed`): magnitude pruning "
                  f"({sizes[0]['allocation']} allocation), the reference model; ratio = dense fp32 safetensors "
                  "size / compressed size. The bitmask limit is the ratio of a file holding only 1 bit per weight plus "
                  "the fp32 non-zeros at that sparsity in every layer; ERK leaves small layers denser, a layer "
                  "where the bitmask does not pay off is stored densely, and BatchNorm parameters stay dense.",
                  "", "| sparsity | dense file (bytes) | compressed fp32 (bytes) | ratio fp32 | bitmask limit fp32 | "
                  "compressed fp16 (bytes) | ratio fp16 | fp32 round trip bit-exact |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sizes:
            lines.append(f"| {r['sparsity']:g} | {r['dense_bytes']:,} | {r['compressed_fp32_bytes']:,} | "
                         f"{r['ratio_fp32']:.2f}x | {r['bitmask_limit_fp32']:.2f}x | {r['compressed_fp16_bytes']:,} | "
                         f"{r['ratio_fp16']:.2f}x | {'yes' if r['round_trip_exact'] else 'NO'} |")
    if channels:
        first = channels[0]
        lines += ["", "Channel pruning with removal (`--method taylor`, then `ptsparse export --format channels`): "
                  "coupled channels (residual streams pruned as one), BatchNorm re-calibration, no fine-tuning. "
                  "Allocation `uniform`: the same fraction of channels in every layer, the smallest that reaches the "
                  "MAC reduction target; `knapsack`: channels kept by the knapsack under the MAC budget "
                  "(`--allocation knapsack`); `knapsack-latency`: under a per-layer latency table measured on this CPU "
                  "at batch 64 (`--knapsack-cost latency`), the target then being the latency removed; `-x8`: channels "
                  "pruned 8 at a time, so every kept width is a multiple of 8 (`--channel-multiple 8`). MACs of Conv "
                  "and Linear layers, counted after removal; the weight sparsity is over the counted layers. Accuracy "
                  "on the 10,000 test images; the removed model's accuracy equals the masked model's. Latency: median "
                  f"of {first['repeats']} runs after {first['warmup']} warm-up runs ({_timing(first)}), "
                  f"{first['cpu']}, {first['threads']} threads, torch {first['torch']}.",
                  "The onnxruntime columns time the same two models exported to ONNX (`--format onnx`), run by "
                  "onnxruntime's CPU provider with the same threads, batch 64.",
                  "", "| allocation | target | weight sparsity | MAC reduction | params | accuracy (dense -> pruned) "
                  "| b1 ms (dense / pruned) | b64 ms (dense / pruned) | speedup b1 | speedup b64 "
                  "| onnxruntime b64 ms (dense / pruned) | onnxruntime speedup b64 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in channels:
            d, p = r["latency"]["dense"], r["latency"]["pruned"]
            ort = r.get("onnxruntime_latency")
            ort_cells = (f"{ort['dense']['64']['median_ms']:.1f} / {ort['pruned']['64']['median_ms']:.1f} | "
                         f"{r['onnxruntime_speedup']['64']:.2f}x") if ort else "- | -"
            lines.append(
                f"| {r.get('allocation', 'uniform')} | {r['target_mac_reduction']:.0%} | {r['channel_sparsity']:.4f} | "
                f"{r['mac_reduction']:.1%} | "
                f"{r['params']:,} -> {r['params_after']:,} | {100 * r['dense_accuracy']:.2f}% -> "
                f"{100 * r['pruned_accuracy']:.2f}% | {d['1']['median_ms']:.2f} / {p['1']['median_ms']:.2f} | "
                f"{d['64']['median_ms']:.1f} / {p['64']['median_ms']:.1f} | {r['speedup']['1']:.2f}x | "
                f"{r['speedup']['64']:.2f}x | {ort_cells} |")
    if zoo:
        lines += _zoo_table(zoo) + _repeats_table(zoo, directory / REPEATS_DIR)
    return "\n".join(lines) + "\n"


def _load_zoo(directory: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob("zoo-*.json"))]
    order = {name: i for i, name in enumerate(ALLOCATIONS)}
    return sorted(rows, key=lambda r: (-r["macs"], r["image_size"], r["device"], order.get(r["allocation"], 9),
                                       r["target_reduction"]))


def _ms(stats: dict) -> str:
    """A median in milliseconds to about three significant digits."""
    ms = stats["median_ms"]
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _zoo_table(rows: list[dict]) -> list[str]:
    """The zoo part's paragraph and table (batch columns from the first row's batch sizes)."""
    first = rows[0]
    small, big = (str(b) for b in (min(first["batch_sizes"]), max(first["batch_sizes"])))
    devices = sorted({r.get("gpu", r["device"]) for r in rows if r["device"] != "cpu"})
    where = f"{first['cpu']}, {first['threads']} threads" + (f"; PyTorch rows marked cuda on {', '.join(devices)}"
                                                             if devices else "")
    models = ", ".join(dict.fromkeys(f"`{r['model']}`" for r in rows))
    sizes = " / ".join(dict.fromkeys(f"{r['image_size']} x {r['image_size']}" for r in rows))
    lines = ["", f"Channel pruning of torchvision ImageNet models (`--parts zoo`): {models} with random weights "
             f"(seeded; no data set), {sizes} inputs. With random weights accuracy means nothing and is not "
             "evaluated: the speed depends only on the widths kept. Taylor channel pruning (`--method taylor`: "
             "coupled channels, BatchNorm re-calibration), then removal, the allocations and MAC count as for the "
             f"reference model; the Taylor scores come from {first['calibration']} (one backward pass: the uniform "
             "allocation's bisection runs sparsify about 8 times); the knapsack-latency table is measured on the "
             f"timing device at batch {big} and this input size (`--knapsack-latency-batch {big}`), the target then "
             f"being the fraction of the latency removed; the allocation times its plan end to end and corrects the "
             "budget (`knapsack_latency_rounds`: at most 5 timed plans by default, 3 in rows that list 3); its last "
             "column "
             f"is the latency removed as measured at batch {big} in PyTorch (in brackets the table's estimate and "
             "the allocation's own timing of the plan it kept) and whether the removed model meets "
             f"the budget within {BUDGET_TOLERANCE:.0%} (latency at most {1 + BUDGET_TOLERANCE:g} x the budget). "
             f"Latency: median of {first['repeats']} runs after {first['warmup']} warm-up runs ({_timing(first)}), "
             f"{where}, torch "
             f"{first['torch']}; torch.compile (`--compile`; \"-\": not run): both models compiled by "
             "`torch.compile` (Inductor, default mode: BatchNorm folded into the convolutions, elementwise layers "
             "fused), timed the same way at the largest batch after the compiling call; onnxruntime: the same "
             "models exported to ONNX, CPU provider, the same threads.",
             "", f"| model | allocation | target | MAC reduction | params | b{small} ms (dense / pruned) | "
             f"b{big} ms (dense / pruned) | speedup b{small} | speedup b{big} | torch.compile b{big} ms "
             f"(dense / pruned), speedup | onnxruntime b{big} ms "
             f"(dense / pruned) | onnxruntime speedup b{small} | onnxruntime speedup b{big} | latency removed "
             f"b{big} (estimates), budget met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, p = r["latency"]["dense"], r["latency"]["pruned"]
        od, op = r["onnxruntime_latency"]["dense"], r["onnxruntime_latency"]["pruned"]
        model = _zoo_name(r["model"]) + (f" ({r['device']})" if r["device"] != "cpu" else "")
        budget = r.get("latency_budget")
        rounds = (budget or {}).get("allocation_measured")
        estimate = f"{budget['table_reduction']:.1%}" if budget else ""
        if rounds:
            estimate += f"; {len(rounds['rounds_ms'])} timed plans: {rounds['reduction']:.1%}"
        budget_cell = (f"{budget['measured_reduction']:.1%} ({estimate}), "
                       f"{'yes' if budget['within_tolerance'] else 'NO'} ({budget['over_budget']:+.1%})"
                       if budget else "-")
        compiled = r.get("compiled")
        compiled_cell = (f"{_ms(compiled['latency']['dense'])} / {_ms(compiled['latency']['pruned'])}, "
                         f"{compiled['speedup']:.2f}x" if compiled else "-")
        lines.append(
            f"| {model} | {r['allocation']} | {r['target_reduction']:.0%} | {r['mac_reduction']:.1%} | "
            f"{r['params'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M | "
            f"{_ms(d[small])} / {_ms(p[small])} | {_ms(d[big])} / {_ms(p[big])} | {r['speedup'][small]:.2f}x | "
            f"{r['speedup'][big]:.2f}x | {compiled_cell} | {_ms(od[big])} / {_ms(op[big])} | "
            f"{r['onnxruntime_speedup'][small]:.2f}x | {r['onnxruntime_speedup'][big]:.2f}x | {budget_cell} |")
    return lines + _by_kind_table([r for r in rows if "time_by_kind" in r])


def _repeats_table(rows: list[dict], directory: Path) -> list[str]:
    """The largest batch's speedups of each zoo row that was run again (``--out REPEATS_DIR/runN``), every run
    and their mean and standard deviation, so a target is read against the timing noise."""
    again = [json.loads(p.read_text()) for p in sorted(directory.glob("*/zoo-*.json"))]
    if not again:
        return []
    big = str(max(rows[0]["batch_sizes"]))
    lines = ["", f"Timing noise: rows of the table above timed again in separate runs of the same command (the same "
             f"plan, {REPEATS_DIR}/run*/), batch {big}, speedup of each run, then mean ± standard deviation.",
             "", "| model | allocation | runs | PyTorch | torch.compile | onnxruntime |", "|---|---|---|---|---|---|"]
    def plan(row: dict) -> tuple:
        return row["model"], row["allocation"], row["target_reduction"], row["image_size"], row["device"]

    for row in rows:
        runs = [row] + [r for r in again if plan(r) == plan(row)]
        if len(runs) < 2:
            continue
        columns = [[r["speedup"][big] for r in runs], [r["compiled"]["speedup"] for r in runs if "compiled" in r],
                   [r["onnxruntime_speedup"][big] for r in runs]]
        cells = [", ".join(f"{v:.2f}x" for v in values) + f" ({statistics.mean(values):.2f} ± "
                 f"{statistics.stdev(values):.2f})" if len(values) > 1 else "-" for values in columns]
        lines.append(f"| {_zoo_name(row['model'])} | {row['allocation']} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def _by_kind_table(rows: list[dict]) -> list[str]:
    """Where each zoo row's forward pass spends its time, dense and pruned, by layer kind (:func:`time_by_kind`)."""
    if not rows:
        return []
    kinds = [k for k in KINDS if any(r["time_by_kind"][m][k]["ms"] > 0 for r in rows for m in ("dense", "pruned"))]
    first = rows[0]["time_by_kind"]
    lines = ["", f"Where the time goes (`time_by_kind`): the same models at batch {first['batch']} in PyTorch, mean of "
             f"{first['runs']} passes, each leaf module timed by hooks (which slow the pass a little); per kind of "
             "layer, milliseconds dense -> pruned, then how its time and its MACs changed. \"between\" is the "
             "pass's time outside every module (the residual additions, freeing memory, Python). These passes ran "
             "after the table above, so their totals differ from its medians.",
             "", "| model | allocation | " + " | ".join(kinds) + " | total |", "|---|---|" + "---|" * (len(kinds) + 1)]
    for r in rows:
        dense, pruned = r["time_by_kind"]["dense"], r["time_by_kind"]["pruned"]
        cells = [_change_cell(dense[k]["ms"], pruned[k]["ms"], dense[k]["macs"], pruned[k]["macs"]) for k in kinds]
        total = _change_cell(*(sum(side[k][field] for k in KINDS) for field in ("ms", "macs")
                               for side in (dense, pruned)))
        lines.append(f"| {_zoo_name(r['model'])} | {r['allocation']} | " + " | ".join(cells) + f" | {total} |")
    return lines


def _change_cell(before_ms: float, after_ms: float, before_macs: int = 0, after_macs: int = 0) -> str:
    """Milliseconds dense -> pruned and how the time and the MACs changed ("-" for a kind the dense model lacks)."""
    if before_ms <= 0:
        return "-"
    text = f"{before_ms:.0f} -> {after_ms:.0f} ms (time {after_ms / before_ms - 1:+.0%}"
    return text + (f", MACs {after_macs / before_macs - 1:+.0%})" if before_macs else ")")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["size", "channels"], choices=["size", "channels", "zoo"],
                        help="parts to run (default: size channels; zoo takes about 25 minutes on 2 cores)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SIZE_SPARSITIES))
    parser.add_argument("--mac-reductions", nargs="+", type=float, default=None,
                        help=f"reduction targets (default: {' '.join(map(str, MAC_REDUCTIONS))} for channels, "
                             f"{' '.join(map(str, ZOO_REDUCTIONS))} for zoo)")
    parser.add_argument("--allocations", nargs="+", default=["uniform", "knapsack"], choices=ALLOCATIONS,
                        help="channel allocations to measure (channels part)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed runs before timing (default: {WARMUP}; zoo: {ZOO_WARMUP})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs; the median is reported (default: {REPEATS}; zoo: {ZOO_REPEATS})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    zoo = parser.add_argument_group("zoo part")
    zoo.add_argument("--zoo-models", nargs="+", default=list(ZOO_MODELS), help="model specs (random weights)")
    zoo.add_argument("--image-size", type=int, default=ZOO_IMAGE_SIZE, help="square input size")
    zoo.add_argument("--zoo-batches", nargs="+", type=int, default=list(ZOO_BATCH_SIZES),
                     help="batch sizes timed; the largest is the latency table's")
    zoo.add_argument("--zoo-allocations", nargs="+", default=list(ZOO_ALLOCATIONS), choices=ALLOCATIONS)
    zoo.add_argument("--zoo-calib-size", type=int, default=ZOO_CALIB_SIZE,
                     help="random calibration images (one batch)")
    zoo.add_argument("--compile", action="store_true",
                     help="also time both models under torch.compile at the largest batch (needs a C++ compiler "
                          "on the CPU)")
    zoo.add_argument("--device", default="cpu", help="where PyTorch runs and the latency table is measured "
                                                     "(onnxruntime: always CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--table", action="store_true", help="only print the markdown section from --out")
    args = parser.parse_args(argv)
    if args.table:
        print(export_section(args.out))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.zoo_batches) < 1 or args.image_size < 1 or args.zoo_calib_size < 1:
        parser.error("--zoo-batches, --image-size and --zoo-calib-size must be positive")
    if {"size", "channels"} & set(args.parts):
        calib = sample_calibration(FashionMNIST("train"), args.calib_size, seed=args.seed)
    if "size" in args.parts:
        for sparsity in args.sparsities:
            row = size_run(sparsity, calib, args.out)
            print(f"size @ {sparsity:g}: fp32 {row['ratio_fp32']:.2f}x, fp16 {row['ratio_fp16']:.2f}x", file=sys.stderr)
    if "channels" in args.parts:
        test = FashionMNIST("test")
        for allocation in args.allocations:
            for target in args.mac_reductions or MAC_REDUCTIONS:
                row = channel_run(target, calib, test, args.out, _given(args.warmup, WARMUP),
                                  _given(args.repeats, REPEATS), torch.get_num_threads(), allocation)
                print(f"channels ({allocation}) @ {target:.0%}: MAC reduction {row['mac_reduction']:.3f}, accuracy "
                      f"{100 * row['pruned_accuracy']:.2f}%, speedup b64 {row['speedup']['64']:.2f}x", file=sys.stderr)
    if "zoo" in args.parts:
        _zoo_part(args)
    print(export_section(args.out))
    return 0


def _zoo_part(args: argparse.Namespace) -> None:
    batches = tuple(sorted(set(args.zoo_batches)))
    big = str(batches[-1])
    for spec in args.zoo_models:
        for allocation in args.zoo_allocations:
            for target in args.mac_reductions or ZOO_REDUCTIONS:
                start = time.perf_counter()
                row = zoo_run(spec, target, allocation, args.out, image_size=args.image_size, batch_sizes=batches,
                              calib_size=args.zoo_calib_size, warmup=_given(args.warmup, ZOO_WARMUP),
                              repeats=_given(args.repeats, ZOO_REPEATS), threads=torch.get_num_threads(),
                              device=args.device, seed=args.seed, compiled=args.compile)
                budget = row.get("latency_budget")
                measured = (f", latency removed {budget['measured_reduction']:.3f} (table "
                            f"{budget['table_reduction']:.3f})" if budget else "")
                compiled = f", torch.compile {row['compiled']['speedup']:.2f}x" if "compiled" in row else ""
                print(f"zoo {spec} ({allocation}) @ {target:.0%}: MAC reduction {row['mac_reduction']:.3f}, speedup "
                      f"b{big} {row['speedup'][big]:.2f}x{compiled}, onnxruntime {row['onnxruntime_speedup'][big]:.2f}x"
                      f"{measured} [{time.perf_counter() - start:.0f} s]", file=sys.stderr)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


if __name__ == "__main__":
    sys.exit(main())
