"""Scale benchmark: time per method on a zoo model with synthetic calibration images, on any device.

Issue 8's setting is torchvision ResNet-50 (random weights: only the time counts) at 224x224 with 1,024
synthetic calibration images at sparsity 0.9 on CUDA::

    python benchmarks/scale_bench.py --device cuda                       # every method, issue 8's setting
    python benchmarks/scale_bench.py --device cuda --precision bf16 --grad-checkpointing
    python benchmarks/scale_bench.py --part block_cache --model torchvision:resnet18 --image-size 64 \\
        --calib-size 128                                                 # CPU-sized
    python benchmarks/scale_bench.py --table                             # print the markdown section

* ``methods``: ``ptsparse.sparsify`` per method (no evaluation); wall time of the call (CUDA synchronised),
  peak GPU memory on CUDA, achieved sparsity. Distilling methods run ``--iterations`` steps (the presets'
  default is 100 epochs of the calibration set: 1,600 steps here), and their time per step is recorded too.
* ``block_cache``: layer-by-layer Wanda and SparseGPT pruning (``prune_model``) with each layer's statistics
  pass on its block's cached inputs against full passes through the network; the masks must be equal.

Each measurement is one JSON file in ``benchmarks/results/scale/``; :func:`scale_section` builds the
markdown for ``RESULTS.md`` from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import ptsparse
from ptsparse.checkpoint import write_json
from ptsparse.criteria import CRITERIA, prune_model
from ptsparse.data import as_calibration
from ptsparse.graph.cost import synchronize
from ptsparse.errors import IncompatibleOptionsError
from ptsparse.models import resolve_model
from ptsparse.offload import Offload
from ptsparse.patterns import Unstructured
from ptsparse.targets import find_targets

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale"
METHODS = ("magnitude", "wanda", "sparsegpt", "pot", "magnitude_kd", "fcpts", "unipts", "iee")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def _setting(args: argparse.Namespace) -> dict:
    return {"model": args.model, "image_size": args.image_size, "calib_size": args.calib_size,
            "device": args.device, "device_name": _device_name(args.device), "torch": torch.__version__}


def _images(args: argparse.Namespace) -> torch.Tensor:
    return torch.randn(args.calib_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))


def method_run(method: str, args: argparse.Namespace) -> dict:
    """Times ``sparsify`` of ``method`` at ``args.sparsity``."""
    torch.manual_seed(0)
    model, architecture = resolve_model(args.model)
    calib = _images(args)
    overrides = {"distill_iterations": args.iterations, "distill_precision": args.precision,
                 "distill_grad_checkpointing": args.grad_checkpointing,
                 "offload": args.offload and _offloadable(method)}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(args.device))
    synchronize(args.device)
    start = time.perf_counter()
    result = ptsparse.sparsify(model, calib, method=method, sparsity=args.sparsity, device=args.device,
                               progress=False, architecture=architecture, **overrides)
    synchronize(args.device)
    seconds = time.perf_counter() - start
    recovery = result.report["recovery"]
    row = {"part": "methods", "method": method, "sparsity": args.sparsity, **_setting(args), **overrides,
           "achieved_sparsity": result.report["achieved_sparsity"], "seconds": seconds,
           "distill_iterations": recovery.get("iterations")}
    if args.device.startswith("cuda"):
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**30
    suffix = "-".join(str(v) for v in (args.precision, "ckpt" if args.grad_checkpointing else "",
                                        "offload" if overrides["offload"] else "") if v)
    write_json(args.out / f"methods-{args.device.split(':')[0]}-{_slug(args.model)}-{method}-{suffix}.json", row)
    return row


def block_cache_run(criterion: str, args: argparse.Namespace) -> dict:
    """Times layer-by-layer pruning with cached block inputs and with full passes."""
    torch.manual_seed(0)
    model, _ = resolve_model(args.model)
    model = model.to(args.device).eval()
    calib = as_calibration(_images(args))
    row = {"part": "block_cache", "criterion": criterion, "sparsity": args.sparsity, **_setting(args)}
    masks = {}
    for cached in (True, False):
        copied = copy.deepcopy(model)
        targets = find_targets(copied)
        counts = {t.name: int(args.sparsity * t.numel) for t in targets}
        synchronize(args.device)
        start = time.perf_counter()
        offload = Offload.of(copied.cpu(), targets, args.device) if args.offload else None
        masks[cached] = prune_model(copied, targets, counts, Unstructured(), CRITERIA.get(criterion)(), calib,
                                    device=args.device, cache_block_inputs=cached, offload=offload)
        synchronize(args.device)
        row["cached_seconds" if cached else "full_pass_seconds"] = time.perf_counter() - start
    row["same_masks"] = all(torch.equal(masks[True][k], masks[False][k]) for k in masks[True])
    row["speedup"] = row["full_pass_seconds"] / row["cached_seconds"]
    write_json(args.out / f"block_cache-{args.device.split(':')[0]}-{_slug(args.model)}-{criterion}.json", row)
    return row


def _offloadable(method: str) -> bool:
    """Whether ``method`` runs with offload (one-shot methods; those that distil need the whole model on the device)."""
    try:
        ptsparse.SparsityConfig(method=method, offload=True)
    except IncompatibleOptionsError:
        return False
    return True


def _slug(spec: str) -> str:
    return spec.replace(":", "_").replace(",", "_").replace("=", "")


def scale_section(directory: str | Path = RESULTS) -> str:
    """Markdown for ``RESULTS.md`` from the JSON results (empty when there are none)."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    if not rows:
        return ""
    text = "\n## Scale: time per method and cached block inputs (`benchmarks/scale_bench.py`)\n\n"
    methods = [r for r in rows if r["part"] == "methods"]
    if methods:
        text += ("| model | image | calib | device | precision | checkpointing | method | sparsity | seconds | "
                 "distill steps | peak GPU GB |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in methods:
            memory = f"{r['peak_gpu_memory_gb']:.1f}" if "peak_gpu_memory_gb" in r else "-"
            text += (f"| {r['model']} | {r['image_size']} | {r['calib_size']} | {r['device_name']} | "
                     f"{r['precision']} | {'yes' if r['grad_checkpointing'] else 'no'} | {r['method']} | "
                     f"{r['achieved_sparsity']:.4f} | {r['seconds']:.1f} | {r['distill_iterations'] or '-'} | "
                     f"{memory} |\n")
        text += "\n"
    cache = [r for r in rows if r["part"] == "block_cache"]
    if cache:
        text += ("Layer-by-layer pruning (uniform per-layer sparsity, random weights), each layer's statistics pass "
                 "on its block's cached inputs against full passes through the network (the same masks required):\n\n"
                 "| model | image | calib | device | criterion | sparsity | full passes s | cached s | speedup | "
                 "same masks |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for r in cache:
            text += (f"| {r['model']} | {r['image_size']} | {r['calib_size']} | {r['device_name']} | "
                     f"{r['criterion']} | {r['sparsity']:g} | {r['full_pass_seconds']:.1f} | "
                     f"{r['cached_seconds']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same_masks'] else 'NO'} |\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("methods", "block_cache"), default="methods")
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--criteria", nargs="+", default=["wanda", "sparsegpt"], choices=("wanda", "sparsegpt"),
                        help="block_cache: the layer-by-layer criteria timed")
    parser.add_argument("--iterations", type=int, default=None, help="distillation steps (default: the presets')")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--offload", action="store_true",
                        help="the model and cached block inputs in CPU memory, one block at a time on the device "
                             "(one-shot methods; the others run without)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--table", action="store_true", help="print the markdown section and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(scale_section(args.out))
        return 0
    if args.part == "methods":
        for method in args.methods:
            row = method_run(method, args)
            print(f"{method}: {row['seconds']:.1f} s, sparsity {row['achieved_sparsity']:.4f}", file=sys.stderr)
    else:
        for criterion in args.criteria:
            row = block_cache_run(criterion, args)
            print(f"{criterion}: full passes {row['full_pass_seconds']:.1f} s, cached {row['cached_seconds']:.1f} s, "
                  f"same masks {row['same_masks']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
