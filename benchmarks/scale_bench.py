"""Scale benchmark: time per method on a zoo model with synthetic calibration images, on any device; and N
data-parallel ranks against one process on the reference model.

Issue 8's setting is torchvision ResNet-50 (random weights: only the time counts) at 224x224 with 1,024
synthetic calibration images at sparsity 0.9 on CUDA::

    python benchmarks/scale_bench.py --device cuda                       # every method, issue 8's setting
    python benchmarks/scale_bench.py --device cuda --precision bf16 --grad-checkpointing
    python benchmarks/scale_bench.py --part block_cache --model torchvision:resnet18 --image-size 64 \\
        --calib-size 128                                                 # CPU-sized
    python benchmarks/scale_bench.py --table                             # print the markdown section
    python benchmarks/scale_bench.py --nproc 2 --seeds 0 1 2             # N ranks against one process

* ``methods``: ``ptsparse.sparsify`` per method (no evaluation); wall time of the call (CUDA synchronised),
  peak GPU memory on CUDA, achieved sparsity. Distilling methods run ``--iterations`` steps (the presets'
  default is 100 epochs of the calibration set: 1,600 steps here), and their time per step is recorded too.
* ``block_cache``: layer-by-layer Wanda and SparseGPT pruning (``prune_model``) with each layer's statistics
  pass on its block's cached inputs against full passes through the network; the masks must be equal.
* ``ranks`` (``--nproc N``): each method of :data:`RANK_METHODS` on the reference ResNet-20 with ``--calib-size``
  Fashion-MNIST training images (seeded), once in one process and once under ``torchrun --nproc-per-node N``, each
  in fresh processes; distilling methods run ``--iterations`` steps (default :data:`RANK_ITERATIONS`). On the CPU
  the one process gets N threads and each rank one (``OMP_NUM_THREADS``), so both use the same N cores: the row
  compares threads within operations against ranks over the data, not more hardware. Recorded: the wall time of
  the ``sparsify`` call (rank 0's, between barriers), test accuracy (10,000 images) and achieved sparsity of each,
  the speedup and the accuracy difference; ``--seeds`` repeats every row, each seed its own calibration sample.

Each measurement is one JSON file in ``benchmarks/results/scale/``; :func:`scale_section` builds the
markdown for ``RESULTS.md`` from them (a ``--nproc`` run into the default directory rewrites that section of
``RESULTS.md``; ``pts_bench.py --table-only`` writes the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ptsparse
from ptsparse import distributed
from ptsparse.checkpoint import write_json, write_text
from ptsparse.config import resolve_config
from ptsparse.criteria import CRITERIA, prune_model
from ptsparse.data import FashionMNIST, as_calibration, sample_calibration
from ptsparse.evaluate import accuracy
from ptsparse.graph.cost import synchronize
from ptsparse.errors import IncompatibleOptionsError
from ptsparse.models import load_reference, resolve_model
from ptsparse.offload import Offload
from ptsparse.patterns import Unstructured
from ptsparse.sparsify import resolve_device
from ptsparse.targets import find_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import mean_std, paired  # noqa: E402  (a script beside this one)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale"
METHODS = ("magnitude", "wanda", "sparsegpt", "pot", "magnitude_kd", "fcpts", "unipts", "iee")
RANK_METHODS = ("magnitude", "wanda", "sparsegpt", "pot", "magnitude_kd", "recommended", "fcpts", "unipts", "iee")
RANK_ITERATIONS = 200  # distillation steps of the ranks part: a short budget (the presets' is 1,600)
RANK_TOLERANCE = 0.3  # accuracy points within which distilling methods on N ranks should match one process


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


def _distils(method: str) -> bool:
    return resolve_config(None, method=method).recovery == "distill"


def _barrier() -> None:
    if distributed.world()[1] > 1:
        dist.barrier()


def ranks_child(method: str, args: argparse.Namespace) -> None:
    """One timed ``sparsify`` of ``method`` on the reference model in this process, alone or as one rank of a
    ``torchrun`` launch; rank 0 writes the measurement to ``args.child``."""
    torch.set_num_threads(args.threads)
    with distributed.process_group():
        seed = args.seeds[0]
        calib = sample_calibration(FashionMNIST("train"), args.calib_size, seed=seed)
        steps = {"distill_iterations": args.iterations or RANK_ITERATIONS} if _distils(method) else {}
        model = load_reference()
        _barrier()
        start = time.perf_counter()
        result = ptsparse.sparsify(model, calib, method=method, sparsity=args.sparsity, device=args.device,
                                   seed=seed, progress=False, **steps)
        synchronize(args.device)
        _barrier()
        seconds = time.perf_counter() - start
        device = resolve_device(args.device)
        test_accuracy = accuracy(result.model.to(device), FashionMNIST("test"), device=str(device))
        if distributed.is_main():
            write_json(Path(args.child), {
                "ranks": distributed.world()[1], "threads": torch.get_num_threads(), "seconds": seconds,
                "accuracy": test_accuracy, "achieved_sparsity": result.report["achieved_sparsity"],
                "distill_iterations": result.report["recovery"].get("iterations")})


def ranks_run(method: str, seed: int, args: argparse.Namespace) -> dict:
    """``method`` in one process (N threads on the CPU) and on ``args.nproc`` ranks (one thread each), each in
    fresh processes; writes and returns the row."""
    nproc, measured = args.nproc, {}
    for ranks, threads in ((1, nproc), (nproc, 1)):
        launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                           str(ranks)]
        with tempfile.TemporaryDirectory() as directory:
            child = Path(directory) / "measured.json"
            command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--part", "ranks", "--child",
                       str(child), "--methods", method, "--threads", str(threads), "--seeds", str(seed),
                       "--calib-size", str(args.calib_size), "--sparsity", str(args.sparsity), "--device",
                       args.device, *(["--iterations", str(args.iterations)] if args.iterations else [])]
            done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise SystemExit(f"{method} on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
            measured[ranks] = json.loads(child.read_text())
    single, parallel = measured[1], measured[nproc]
    row = {"part": "ranks", "method": method, "model": "reference", "data": "fashion-mnist", "seed": seed,
           "calib_size": args.calib_size, "sparsity": args.sparsity, "device": args.device,
           "device_name": _device_name(args.device).split(" (")[0], "torch": torch.__version__, "nproc": nproc,
           "distils": _distils(method), "distill_iterations": single["distill_iterations"], "one_process": single,
           "ranks_run": parallel, "speedup": single["seconds"] / parallel["seconds"],
           "accuracy_difference": 100 * (parallel["accuracy"] - single["accuracy"])}
    write_json(args.out / f"ranks-{args.device.split(':')[0]}-reference-{method}-n{nproc}-s{seed}.json", row)
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
    text += _ranks_table([r for r in rows if r["part"] == "ranks"])
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


def _ranks_table(rows: list[dict]) -> str:
    """N ranks against one process, one line per method and setting (times: means over seeds)."""
    if not rows:
        return ""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["nproc"], r["device"], r["device_name"], r["calib_size"], r["sparsity"], r["distill_iterations"],
               r["method"])
        groups.setdefault(key, []).append(r)
    text = ("Data-parallel ranks against one process (`--nproc`): reference ResNet-20, Fashion-MNIST, the whole "
            "`sparsify` call (rank 0's wall time between barriers; no evaluation inside), then test accuracy. On the "
            "CPU both runs share the same cores: one process with N threads against N ranks of one thread each. "
            f"Distilling methods should stay within {RANK_TOLERANCE} points of one process; a difference is the "
            "paired mean ± standard deviation over seeds (`(1 seed)`: one run against one run, not evidence).\n\n"
            "| method | setting | calib | steps | sparsity | one process s | N ranks s | speedup | one process acc | "
            f"N ranks acc | difference (points) | within {RANK_TOLERANCE} |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for (nproc, device, name, calib, sparsity, steps, method), group in groups.items():
        single = {r["seed"]: 100 * r["one_process"]["accuracy"] for r in group}
        parallel = {r["seed"]: 100 * r["ranks_run"]["accuracy"] for r in group}
        difference = paired(parallel, single)
        setting = (f"{name}: 1 process x {group[0]['one_process']['threads']} threads / {nproc} ranks x "
                   f"{group[0]['ranks_run']['threads']} thread" if device == "cpu" else
                   f"{name}: 1 process / {nproc} ranks, one GPU each")
        within = ("yes" if abs(difference.mean) <= RANK_TOLERANCE else "no") if group[0]["distils"] else "-"
        text += (f"| {method} | {setting} | {calib} | {steps or '-'} | {sparsity:g} | "
                 f"{mean_std([r['one_process']['seconds'] for r in group])[0]:.1f} | "
                 f"{mean_std([r['ranks_run']['seconds'] for r in group])[0]:.1f} | "
                 f"{mean_std([r['speedup'] for r in group])[0]:.2f}x | {mean_std(list(single.values()))[0]:.2f} | "
                 f"{mean_std(list(parallel.values()))[0]:.2f} | {difference} | {within} |\n")
    return text + "\n"


def update_results(path: Path = HERE / "RESULTS.md") -> None:
    """Rewrites the scale section of ``RESULTS.md`` from the JSON results (as ``pts_bench.py --table-only``)."""
    text = path.read_text()
    start = text.index("\n## Scale: ")
    end = text.find("\n## ", start + 1)
    write_text(path, text[:start] + scale_section() + ("\n" + text[end + 1:] if end >= 0 else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("methods", "block_cache", "ranks"), default="methods")
    parser.add_argument("--model", default="torchvision:resnet50", help="methods, block_cache (ranks: the reference "
                        "ResNet-20)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted({*METHODS, *RANK_METHODS}),
                        help=f"methods: {' '.join(METHODS)}; ranks: {' '.join(RANK_METHODS)} (the defaults)")
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
    parser.add_argument("--nproc", type=int, default=None, help="N ranks against one process (--part ranks)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="ranks: seeds to repeat every row with")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # of a ranks child
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a ranks child's output file
    args = parser.parse_args(argv)
    if args.table:
        print(scale_section(args.out))
        return 0
    if args.nproc is not None:
        args.part = "ranks"
    if args.part == "ranks" and args.child is not None:
        ranks_child(args.methods[0], args)
    elif args.part == "ranks":
        if args.nproc is None or args.nproc < 2:
            parser.error("--part ranks needs --nproc N (2 or more)")
        for seed in args.seeds:
            for method in args.methods or RANK_METHODS:
                row = ranks_run(method, seed, args)
                print(f"{method} seed {seed}: 1 process {row['one_process']['seconds']:.1f} s, {args.nproc} ranks "
                      f"{row['ranks_run']['seconds']:.1f} s, accuracy {row['accuracy_difference']:+.2f} points",
                      file=sys.stderr, flush=True)
        if args.out == RESULTS:
            update_results()
        else:
            print(scale_section(args.out))
    elif args.part == "methods":
        for method in args.methods or METHODS:
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
