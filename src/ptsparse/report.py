"""The run report: per-layer sparsity, accuracy, time and memory; as JSON, a text table and a PNG plot."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (since :func:`reset_peak_rss`, where it worked), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_device_memory_mb(device: str | torch.device) -> float | None:
    """Peak memory of the tensors this process has held on ``device`` so far, in MiB: CUDA's
    ``max_memory_allocated`` (the caching allocator reserves somewhat more); ``None`` for the CPU, whose tensors
    are part of the peak RSS."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _memory(report: dict[str, Any]) -> str:
    """Peak RSS, and the device's peak tensor memory where the run used one (older reports: RSS alone)."""
    rss = f"peak RSS {report['peak_rss_mb']:.0f} MiB"
    device = report.get("device", "cpu")
    if report.get("peak_device_memory_mb") is not None:
        return f"{rss}  peak {device} memory {report['peak_device_memory_mb']:.0f} MiB"
    return f"{rss} (tensors included: the device is the CPU)" if device == "cpu" else rss


def _calibration(report: dict[str, Any]) -> str:
    """The calibration set: samples, or a causal language model's sequences and their length."""
    if report.get("calib_seq_len"):
        return f"calibration {report['calib_size']} sequences of {report['calib_seq_len']} tokens"
    return f"calibration {report['calib_size']} samples"


def reset_peak_rss() -> bool:
    """Starts :func:`peak_rss_mb` afresh from the current resident memory, so that one process can measure the
    peak of several runs in turn (Linux 4.0 and later: ``5`` written to ``/proc/self/clear_refs``). Returns
    whether it did; elsewhere the peak stays the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def removed_fractions(modules: list[nn.Module], weights: float, macs: float | None) -> dict[str, float | None]:
    """What a channel run removed: fractions of the layers' output channels (all-zero rows), of their weights
    (``weights``, the achieved sparsity), and of the model's MACs once the zeroed channels are removed (``macs``:
    :func:`~ptsparse.allocation.knapsack.mac_reduction`, ``None`` where the coupling cannot be traced)."""
    with torch.no_grad():
        empty = [m.weight.flatten(1).eq(0).all(1) for m in modules]
    return {"channels": sum(int(e.sum()) for e in empty) / sum(len(e) for e in empty), "weights": weights,
            "macs": macs}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the layers followed by the run's summary lines."""
    rows = [("layer", "params", "target", "achieved")]
    rows += [(l["name"], str(l["params"]), f"{l['target']:.4f}", f"{l['achieved']:.4f}") for l in report["layers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))

    lines += [
        "",
        f"method {report['method']}  pattern {report['pattern']}  allocation {report['allocation']}  "
        f"criterion {report['criterion']}",
        f"sparsity: target {report['target_sparsity']:.4f}  achieved {report['achieved_sparsity']:.4f}",
        *_removed_lines(report.get("removed")),
        *_learned_allocation_lines(report.get("recovery", {})),
        *_search_lines(report.get("allocation_search")),
        _metric_line(report),
        f"time {report['wall_time_s']:.1f} s  {_memory(report)}  seed {report['seed']}  {_calibration(report)} "
        f"(hash {report['calib_hash']})",
    ]
    return "\n".join(lines)


def _removed_lines(removed: dict[str, float] | None) -> list[str]:
    if not removed:
        return []
    macs = "" if removed["macs"] is None else f", {100 * removed['macs']:.2f}% of the MACs (once removed)"
    return [f"removed: {100 * removed['channels']:.2f}% of the channels, {100 * removed['weights']:.2f}% of the "
            f"weights{macs}"]


def _metric_line(report: dict[str, Any]) -> str:
    """Dense and sparse accuracy (perplexity for a causal language model), and what recovery changed."""
    if report.get("metric") == "perplexity":
        dense, sparse, before = (report.get(f"{kind}_perplexity") for kind in ("dense", "sparse", "one_shot"))
        shown = ["n/a" if value is None else f"{value:.2f}" for value in (dense, sparse)]
        evaluation = report.get("evaluation") or {}
        where = (f" ({evaluation['scored_tokens']} held-out tokens, windows of {evaluation['max_length']}, stride "
                 f"{evaluation['stride']})" if evaluation else " (no held-out text: --eval-data text:FILE)")
        change = "" if before is None or sparse is None else \
            f"  (one-shot masks before recovery {before:.2f}: recovery changed it by {sparse - before:+.2f})"
        return f"perplexity: dense {shown[0]}  sparse {shown[1]}{where}{change}"
    dense, sparse, before = (report.get(f"{kind}_accuracy") for kind in ("dense", "sparse", "one_shot"))
    shown = ["n/a" if value is None else f"{100 * value:.2f}%" for value in (dense, sparse)]
    change = "" if before is None or sparse is None else \
        f"  (one-shot masks before recovery {100 * before:.2f}%: recovery added {100 * (sparse - before):+.2f} points)"
    return f"accuracy: dense {shown[0]}  sparse {shown[1]}{change}"


def more_time_hint(report: dict[str, Any]) -> str | None:
    """For a run that distilled: the flag that buys accuracy (a lower perplexity for a causal language model) with
    more time (``None`` for other runs)."""
    recovery = report.get("recovery") or {}
    if recovery.get("kind") != "distill":
        return None
    steps = recovery["iterations"]
    if report.get("metric") == "perplexity":
        return f"more time for a lower perplexity: --distill-iterations (this run: {steps} steps)"
    return (f"more time for accuracy: --distill-iterations (this run: {steps} steps); benchmarks/RESULTS.md, "
            "'Time to accuracy', shows what each budget bought on the reference models and where more stopped paying")


def _learned_allocation_lines(recovery: dict[str, Any]) -> list[str]:
    """What a dynamics that learns the allocation (FCPTS) changed: the table's target is where it started."""
    if recovery.get("learned_allocation") is None:
        return []
    return [f"allocation learned by {recovery['dynamics']} (target column: the initial allocation); sparsity "
            f"before the exact projection {recovery['raw_sparsity']:.4f}, {recovery['projection_flips']} "
            f"weights moved by it"]


def _search_lines(search: dict[str, Any] | None) -> list[str]:
    """unipts_search's outcome (other allocations' summaries, OWL's or knapsack's, are in the JSON only)."""
    if not search or "best" not in search:
        return []
    return [f"allocation search: best {search['best']} (fitness {search['best_fitness']:.4f}, ERK "
            f"{search['erk_fitness']:.4f}, {search['fitness']}), {search['evaluations']} evaluations in "
            f"{search['wall_time_s']:.1f} s"]


def plot_layers(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes a bar chart of target and achieved sparsity per layer to ``path`` (PNG), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_path

    layers = report["layers"]
    positions = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.5))
    ax.bar(positions, [l["achieved"] for l in layers], color="tab:blue", label="achieved")
    ax.scatter(positions, [l["target"] for l in layers], color="tab:red", marker="_", s=120, label="target",
               zorder=3)
    ax.axhline(report["achieved_sparsity"], color="grey", linestyle="--", linewidth=1, label="global")
    ax.set_xticks(list(positions))
    ax.set_xticklabels([l["name"] for l in layers], rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(f"{report['method']} / {report['allocation']} / {report['pattern']}: "
                 f"global {report['achieved_sparsity']:.3f}")
    # beside the axes, where no bar can be under it
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=120)
    plt.close(fig)
    return path
