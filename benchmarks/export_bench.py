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

Each measurement is one JSON file in ``benchmarks/results/export/`` (``--out`` to write elsewhere);
:func:`export_section` builds the markdown tables for ``RESULTS.md`` from them::

    python benchmarks/export_bench.py                      # both parts, full settings (run on a quiet CPU)
    python benchmarks/export_bench.py --parts size
    python benchmarks/export_bench.py --table              # print the markdown section
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import ptsparse
from ptsparse.checkpoint import write_json
from ptsparse.data import FashionMNIST, sample_calibration
from ptsparse.evaluate import accuracy
from ptsparse.export import dense_checkpoint_bytes, export_model
from ptsparse.export.channels import remove_channels
from ptsparse.export.latency import measure_onnx_latency
from ptsparse.export.onnx import export_onnx
from ptsparse.graph.cost import count_params, measure_latency
from ptsparse.models import load_reference

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "export"
ARCH = {"architecture": "reference_resnet20"}
INPUT_SHAPE = (1, 28, 28)
SIZE_SPARSITIES = (0.5, 0.9, 0.95)
MAC_REDUCTIONS = (0.3, 0.5)
BATCH_SIZES = (1, 64)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(threads: int) -> dict:
    return {"cpu": _cpu_name(), "threads": threads, "torch": torch.__version__}


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


def _mac_reduction(sparsity: float, calib, example, picks: dict) -> tuple[float, ptsparse.SparsifyResult]:
    result = ptsparse.sparsify(load_reference(), calib, method="taylor", sparsity=sparsity, progress=False,
                               architecture="reference_resnet20", calib_size=len(calib), **picks)
    _, report = remove_channels(result.model, example)
    return report["mac_reduction"], result


def channel_sparsity_for(target: float, calib, example, picks: dict, tolerance: float = 0.0025) -> float:
    """The smallest channel sparsity (to ``tolerance``) whose channel-removed model saves ``target`` of the MACs
    (``picks``: further sparsify options)."""
    low, high = 0.0, 0.6  # 60% of the channels removes well over half the MACs
    while high - low > tolerance:
        middle = (low + high) / 2
        reduction, _ = _mac_reduction(middle, calib, example, picks)
        low, high = (middle, high) if reduction < target else (low, middle)
        print(f"  channel sparsity {middle:.4f}: MAC reduction {reduction:.4f}", file=sys.stderr)
    return round(high, 4)


def channel_run(target: float, calib, test, out: Path, warmup: int, repeats: int, threads: int,
                allocation: str = "uniform") -> dict:
    """Latency and accuracy of the reference model after Taylor channel pruning to ``target`` MAC reduction.

    ``allocation``: ``uniform`` (the same fraction of channels in every layer, bisected to the target),
    ``uniform-x8`` (the same, channels pruned 8 at a time: ``channel_multiple=8``), ``knapsack`` (channels
    chosen under the MAC budget) or ``knapsack-latency`` (under a latency table measured on this CPU at
    batch 64; ``target`` is then the latency fraction removed).
    """
    example = torch.randn(8, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    if allocation.startswith("uniform"):
        picks = {"channel_multiple": 8} if allocation == "uniform-x8" else {}
        sparsity = channel_sparsity_for(target, calib, example, picks)
    else:
        cost = "latency" if allocation == "knapsack-latency" else "macs"
        sparsity, picks = target, {"allocation": "knapsack", "knapsack_cost": cost}
    result = ptsparse.sparsify(load_reference(), calib, method="taylor", sparsity=sparsity, eval_data=test,
                               progress=False, architecture="reference_resnet20", calib_size=len(calib), **picks)
    smaller, report = remove_channels(result.model, example)
    dense = load_reference()
    latency = {"dense": {}, "pruned": {}}
    for batch in BATCH_SIZES:  # interleaved, so a burst of load on the machine hits both models alike
        latency["dense"][str(batch)] = measure_latency(dense, INPUT_SHAPE, batch, "cpu", warmup, repeats)
        latency["pruned"][str(batch)] = measure_latency(smaller, INPUT_SHAPE, batch, "cpu", warmup, repeats)
    onnx_latency = {"dense": {}, "pruned": {}}
    with tempfile.TemporaryDirectory() as directory:
        paths = {"dense": Path(directory) / "dense.onnx", "pruned": Path(directory) / "pruned.onnx"}
        export_onnx(dense, example, paths["dense"])
        export_onnx(smaller, example, paths["pruned"])
        for batch in BATCH_SIZES:
            for name, path in paths.items():
                onnx_latency[name][str(batch)] = measure_onnx_latency(path, INPUT_SHAPE, batch, warmup, repeats,
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


def _load(directory: Path, part: str) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob(f"{part}-*.json"))]
    return sorted(rows, key=lambda r: (r.get("allocation", "uniform") != "uniform", r.get("allocation", ""),
                                       r.get("sparsity", r.get("target_mac_reduction", 0))))


def export_section(directory: str | Path = RESULTS) -> str:
    """Markdown for ``RESULTS.md``: compressed file sizes and channel-pruned latency, from the JSON results."""
    directory = Path(directory)
    sizes, channels = _load(directory, "size"), _load(directory, "channels")
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
                  "MAC reduction target; `uniform-x8`: the same with channels pruned 8 at a time, so every kept "
                  "width is a multiple of 8 (`--channel-multiple 8`); `knapsack`: channels kept by the knapsack "
                  "under the MAC budget "
                  "(`--allocation knapsack`); `knapsack-latency`: under a per-layer latency table measured on this CPU "
                  "at batch 64 (`--knapsack-cost latency`), the target then being the latency removed. MACs of Conv "
                  "and Linear layers, counted after removal; the weight sparsity is over the counted layers. Accuracy "
                  "on the 10,000 test images; the removed model's accuracy equals the masked model's. Latency: median of "
                  f"{first['repeats']} runs after {first['warmup']} warm-up runs, {first['cpu']}, "
                  f"{first['threads']} threads, torch {first['torch']}.",
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["size", "channels"], choices=["size", "channels"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SIZE_SPARSITIES))
    parser.add_argument("--mac-reductions", nargs="+", type=float, default=list(MAC_REDUCTIONS))
    parser.add_argument("--allocations", nargs="+", default=["uniform", "knapsack"],
                        choices=["uniform", "uniform-x8", "knapsack", "knapsack-latency"],
                        help="channel allocations to measure")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--table", action="store_true", help="only print the markdown section from --out")
    args = parser.parse_args(argv)
    if args.table:
        print(export_section(args.out))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = sample_calibration(FashionMNIST("train"), args.calib_size, seed=args.seed)
    if "size" in args.parts:
        for sparsity in args.sparsities:
            row = size_run(sparsity, calib, args.out)
            print(f"size @ {sparsity:g}: fp32 {row['ratio_fp32']:.2f}x, fp16 {row['ratio_fp16']:.2f}x", file=sys.stderr)
    if "channels" in args.parts:
        test = FashionMNIST("test")
        for allocation in args.allocations:
            for target in args.mac_reductions:
                row = channel_run(target, calib, test, args.out, args.warmup, args.repeats, torch.get_num_threads(),
                                  allocation)
                print(f"channels ({allocation}) @ {target:.0%}: MAC reduction {row['mac_reduction']:.3f}, accuracy "
                      f"{100 * row['pruned_accuracy']:.2f}%, speedup b64 {row['speedup']['64']:.2f}x", file=sys.stderr)
    print(export_section(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
