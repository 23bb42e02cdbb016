"""Channel pruning across torchvision's classification families, end to end, as a new user would run it.

For one model of each family (random weights, 10 classes, the smallest input the architecture takes; a layer the
constructor initialises to zero, such as ViT's head, gets PyTorch's default initialisation, else every output and
every Taylor score upstream of it would be zero): Taylor channel pruning (``method="taylor", pattern="channel",
sparsity=0.3``) on random calibration images, the channel export (``ptsparse export --format channels``),
``ptsparse.load`` of the written file, and a check that the reloaded model gives the masked model's outputs
(relative to their largest magnitude; in float64 where float32 rounding alone exceeds the tolerance, as the export
checks: :func:`ptsparse.export.base.check_outputs`). Each model runs in a child process of its own with a wall-time
limit and a resident-memory limit (polled), so one model that hangs or grows cannot stop the others or the machine.
The child seeds PyTorch's global generator (``torch.manual_seed(0)``) before building its model, so a model's random
weights, and with them its row, are the same from run to run (unseeded, inception_v3's output difference varied
from 5e-5 to 1.7e-4); calibration and example images come from a generator of their own, also seeded with 0.

A row is ``ok``, ``refused`` (a ptsparse error: its one line, and the stage that raised it) or ``failed`` (any
other exception, its type and first line; a killed or timed-out child). Each model's row is one JSON file in
``benchmarks/results/families/``; :func:`families_section` builds the markdown table for ``RESULTS.md``::

    OMP_NUM_THREADS=1 python benchmarks/family_sweep.py                  # every family (run on a quiet CPU)
    OMP_NUM_THREADS=1 python benchmarks/family_sweep.py --models resnet18 swin_t
    python benchmarks/family_sweep.py --table                             # print the markdown section
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "families"
SPARSITY = 0.3
CLASSES = 10
CALIB_SIZE = 16
EXAMPLE_SIZE = 4
TOLERANCE = 1e-4  # largest output difference, relative to the largest output magnitude (as the export checks)

# One model per family: constructor arguments beyond num_classes, and the smallest square input side it takes.
FAMILIES: dict[str, tuple[str, int]] = {
    "resnet18": ("", 32),
    "resnext50_32x4d": ("", 32),
    "wide_resnet50_2": ("", 32),
    "mobilenet_v2": ("", 32),
    "mobilenet_v3_small": ("", 32),
    "efficientnet_b0": ("", 32),
    "regnet_x_400mf": ("", 32),
    "regnet_y_400mf": ("", 32),
    "convnext_tiny": ("", 32),
    "densenet121": ("", 32),
    "googlenet": (",aux_logits=False,init_weights=True", 32),
    "inception_v3": (",aux_logits=False,init_weights=True", 75),
    "mnasnet0_5": ("", 32),
    "squeezenet1_0": ("", 48),
    "alexnet": ("", 63),
    "vgg11_bn": ("", 32),
    "vit_b_16": (",image_size=32", 32),
    "swin_t": ("", 32),
    "swin_v2_t": ("", 32),
    "maxvit_t": ("", 224),  # every stage's side must be a multiple of its partition size 7
    "shufflenet_v2_x0_5": ("", 32),
}


def spec_of(name: str) -> str:
    """The ``--model`` spec of family ``name``: random weights, :data:`CLASSES` classes."""
    return f"torchvision:{name},num_classes={CLASSES}{FAMILIES[name][0]}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _channel_fraction(model, layers: list[str]) -> float:
    """Fraction of the output channels of ``layers`` whose weights are all zero."""
    import torch

    zero = total = 0
    with torch.no_grad():
        for name in layers:
            weight = model.get_submodule(name).weight
            zero += int(weight.flatten(1).eq(0).all(1).sum())
            total += weight.shape[0]
    return zero / total


def _initialise_zero_layers(model, generator) -> list[str]:
    """Gives every Conv/Linear whose weight is all zero PyTorch's default initialisation; their names."""
    import math

    import torch

    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.any():
                torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                names.append(name)
    return names


def run_family(name: str) -> dict:
    """Runs one family end to end in this process; the row of :data:`RESULTS` (every stage timed)."""
    import torch

    import ptsparse
    from ptsparse.errors import ExportError, PtsparseError
    from ptsparse.export import export_model
    from ptsparse.export.base import check_outputs, float64_outputs
    from ptsparse.models import resolve_model
    from ptsparse.report import peak_rss_mb

    side = FAMILIES[name][1]
    row: dict = {"model": name, "spec": spec_of(name), "input": [3, side, side], "sparsity": SPARSITY,
                 "times_s": {}, "torch": torch.__version__}
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(CALIB_SIZE, 3, side, side, generator=generator)
    example = torch.randn(EXAMPLE_SIZE, 3, side, side, generator=generator)
    stage = "build"
    try:
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            torch.manual_seed(0)  # the constructor's random weights (the global generator)
            model, architecture = resolve_model(spec_of(name))
            row["initialised"] = _initialise_zero_layers(model, generator)
            stage = "sparsify"
            result = ptsparse.sparsify(model, calib, method="taylor", pattern="channel", sparsity=SPARSITY,
                                       architecture=architecture, progress=False)
            row["times_s"]["sparsify"] = round(time.perf_counter() - start, 2)
            layers = [layer["name"] for layer in result.report["layers"]]
            row["achieved_sparsity"] = result.report["achieved_sparsity"]
            row["channel_fraction"] = _channel_fraction(result.model, layers)
            stage, start = "export", time.perf_counter()
            path = Path(directory) / "channels.safetensors"
            report = export_model(result.model, "channels", path, metadata={"architecture": architecture},
                                  input_shape=(3, side, side))
            row["times_s"]["export"] = round(time.perf_counter() - start, 2)
            row.update(params=report["params"], params_after=report["params_after"],
                       mac_reduction=report["mac_reduction"], channels_removed=report["channels_removed"],
                       zeroed_channels_kept=report["zeroed_channels_kept"])
            stage, start = "load", time.perf_counter()
            reloaded = ptsparse.load(path).eval()
            with torch.no_grad():
                expected, got = result.model.eval()(example), reloaded(example)
            row["times_s"]["load"] = round(time.perf_counter() - start, 2)
            stage = "check"
            try:
                row["max_relative_difference"] = check_outputs(
                    got, expected, TOLERANCE, "the reloaded model differs from the masked model",
                    exact=lambda: (float64_outputs(reloaded, example), float64_outputs(result.model, example)))
                row["status"] = "ok"
            except ExportError as error:  # not a refusal: the model was written and read back wrong
                row.update(status="failed", stage=stage, message=_first_line(error))
    except PtsparseError as error:
        row.update(status="refused", stage=stage, message=_first_line(error))
    except Exception as error:  # noqa: BLE001  the sweep records whatever breaks
        row.update(status="failed", stage=stage, message=f"{type(error).__name__}: {_first_line(error)}")
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def _rss_gb(pid: int) -> float:
    """Resident memory of process ``pid`` in GiB (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _run_child(name: str, out: Path, timeout_s: float, memory_gb: float) -> str | None:
    """Runs family ``name`` in a child process; why it died (timed out, killed over ``memory_gb`` resident, exit
    status), or ``None`` when it wrote its row."""
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen([sys.executable, __file__, "--one", name, "--out", str(out)], stdout=log, stderr=log)
        start, peak = time.perf_counter(), 0.0
        while child.poll() is None:
            peak = max(peak, _rss_gb(child.pid))
            if peak > memory_gb or time.perf_counter() - start > timeout_s:
                child.kill()
                child.wait()
                return (f"killed at {peak:.1f} GB resident (limit {memory_gb:g} GB)" if peak > memory_gb
                        else f"timed out after {timeout_s:g} s")
            time.sleep(0.2)
        if (out / f"{name}.json").exists():
            return None
        log.seek(0)
        lines = log.read().strip().splitlines() or ["no output"]
        return f"child exited with status {child.returncode}: {lines[-1]}"


def sweep(names: list[str], out: Path, timeout_s: float, memory_gb: float) -> list[dict]:
    """Runs each family in a child process (``timeout_s`` wall time, ``memory_gb`` resident) and writes its row."""
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / f"{name}.json"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        died = _run_child(name, out, timeout_s, memory_gb)
        row = json.loads(path.read_text()) if died is None else {
            "model": name, "spec": spec_of(name), "status": "failed", "stage": "?", "message": died}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        row["limits"] = {"timeout_s": timeout_s, "resident_gb": memory_gb}
        path.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
        print(f"{name}: {row['status']} {row.get('message', '')} ({row['wall_s']} s)", file=sys.stderr)
    return rows


def families_section(directory: str | Path = RESULTS) -> str:
    """Markdown for ``RESULTS.md``: one row per torchvision family of the channel path, from the JSON results."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    order = {name: i for i, name in enumerate(FAMILIES)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    if not rows:
        return ""
    limits = rows[0].get("limits", {})
    lines = ["## Channel pruning across torchvision families", "",
             "Produced by `python benchmarks/family_sweep.py` (JSON in `benchmarks/results/families/`). One model "
             "per family, random weights (seed 0; a zero-initialised layer, ViT's head, gets PyTorch's default "
             f"initialisation), {CLASSES} classes, the smallest input it takes; "
             "`sparsify(method=\"taylor\", "
             f"pattern=\"channel\", sparsity={SPARSITY})` on {CALIB_SIZE} random images, then the channel export "
             "(`ptsparse export --format channels`), `ptsparse.load` of the file, and the reloaded model's outputs "
             "against the masked model's (largest difference relative to the largest output; in float64 where float32 "
             f"rounding alone exceeds {TOLERANCE:g}). Channels: fraction of "
             "the pruned layers' output channels zeroed; removed: channels the export took out; kept: zeroed "
             "channels the export could not take out (0: every pruned channel went; layers whose channels it could "
             "not remove, such as a residual stream that feeds LayerNorms, stay dense). Each model in a "
             f"process of its own (limits: {limits.get('timeout_s', '?')} s, "
             f"{limits.get('resident_gb', '?')} GB resident), one thread, the whole sweep alone on the "
             "machine.",
             "", "| model | input | result | channels | removed | kept | params | MAC reduction | output diff "
             "| sparsify s | export s | load s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        times = r.get("times_s", {})
        result = "ok" if r["status"] == "ok" else f"{r['status']} ({r.get('stage', '?')}): {r.get('message', '')}"
        result = result.replace("|", "\\|")
        params = f"{r['params']:,} -> {r['params_after']:,}" if "params_after" in r else "-"
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input'][1:])) if 'input' in r else '-'} | {result} | "
            + (f"{r['channel_fraction']:.3f}" if "channel_fraction" in r else "-") + " | "
            + f"{r.get('channels_removed', '-')} | {r.get('zeroed_channels_kept', '-')} | {params} | "
            + (f"{r['mac_reduction']:.1%}" if "mac_reduction" in r else "-") + " | "
            + (f"{r['max_relative_difference']:.1e}" if "max_relative_difference" in r else "-") + " | "
            + " | ".join(str(times.get(k, "-")) for k in ("sparsify", "export", "load"))
            + f" | {r.get('peak_rss_mb', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--timeout", type=float, default=480, help="wall-time limit of one model, seconds")
    parser.add_argument("--memory-gb", type=float, default=8, help="resident-memory limit of one model's process, GB")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    parser.add_argument("--one", choices=list(FAMILIES), help=argparse.SUPPRESS)  # the child process's model
    parser.add_argument("--table", action="store_true", help="only print the markdown section from --out")
    args = parser.parse_args(argv)
    if args.one:
        row = run_family(args.one)
        (args.out / f"{args.one}.json").write_text(json.dumps(row, indent=2) + "\n")
        return 0
    if not args.table:
        sweep(args.models, args.out, args.timeout, args.memory_gb)
    print(families_section(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
