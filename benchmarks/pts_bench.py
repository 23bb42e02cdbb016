"""Post-training sparsity benchmark on the reference model (Fashion-MNIST, 1024 calibration images, seed 0).

Each run writes one report.json-style file to benchmarks/results/; the table in benchmarks/RESULTS.md and
the accuracy-vs-sparsity plot are rebuilt from every result file present, so a later change runs only its
own rows:

    python benchmarks/pts_bench.py                                   # every run below
    python benchmarks/pts_bench.py --runs magnitude-erk --sparsities 0.9 0.95
    python benchmarks/pts_bench.py --table-only                      # rebuild RESULTS.md from the files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ptsparse
from ptsparse.checkpoint import write_json, write_text
from ptsparse.data import FashionMNIST, sample_calibration
from ptsparse.models import load_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import export_section  # noqa: E402  (scripts beside this one)
from scale_bench import scale_section  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)

# name -> sparsify overrides; a run is a method preset plus its picks on the axes.
RUNS: dict[str, dict] = {
    "magnitude-uniform": {"method": "magnitude", "allocation": "uniform"},
    "magnitude-global": {"method": "magnitude", "allocation": "global"},
    "magnitude-erk": {"method": "magnitude", "allocation": "erk"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt-erk": {"method": "sparsegpt", "allocation": "erk"},
    "pot": {"method": "pot"},
    "magnitude_kd": {"method": "magnitude_kd"},
    "fcpts": {"method": "fcpts"},
    "unipts": {"method": "unipts"},
    "iee": {"method": "iee"},
}
# Ablations run at ABLATION_SPARSITIES only (``--sparsities`` overrides): one FCPTS knob changed at a time.
ABLATION_RUNS: dict[str, dict] = {
    "fcpts-kde": {"method": "fcpts", "learned_thresholds_density": "kde"},
    "fcpts-ste": {"method": "fcpts", "learned_thresholds_score_grad": "ste"},
    "fcpts-blocks": {"method": "fcpts", "objective": "kd_blocks"},
    "magnitude_kd-blocks": {"method": "magnitude_kd", "objective": "kd_blocks"},  # control: the block loss alone
    "unipts-no_search": {"method": "unipts", "allocation": "erk"},
    "unipts-no_base_decay": {"method": "unipts", "objective": "kd_logits"},
    "unipts-no_dst": {"method": "unipts", "dynamics": "static"},
    "iee-no_reactivate": {"method": "iee", "iee_reactivate": False},
    "iee-taylor": {"method": "iee", "iee_criterion": "taylor"},
    "iee-alpha0.05": {"method": "iee", "iee_alpha": 0.05},
    "iee-alpha0.3": {"method": "iee", "iee_alpha": 0.3},
    "magnitude_kd-dst": {"method": "magnitude_kd", "dynamics": "dst"},  # plain DST on the same masks and budget
    "iee-fcpts": {"method": "iee", "allocation": "fcpts"},  # IEE on FCPTS's learned allocation
    "unipts-iee": {"method": "unipts", "dynamics": "iee"},  # UniPTS with IEE in place of its DST
}
ABLATION_SPARSITIES = (0.9,)
# Runs whose sparsity is fixed by their pattern (N:M) run once, at that sparsity.
FIXED_PATTERN_RUNS: dict[str, dict] = {
    "magnitude-2:4": {"method": "magnitude", "pattern": "2:4"},
    "wanda-2:4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"},
}
# Channel runs: the fraction of output channels pruned in every layer (the output layer keeps its classes).
CHANNEL_RUNS: dict[str, dict] = {
    "taylor-channel": {"method": "taylor"},
}
CHANNEL_FRACTIONS = (0.3, 0.5)
# Channel runs under a MAC budget (knapsack allocation): the target is the fraction of MACs removed.
MAC_RUNS: dict[str, dict] = {
    "taylor-knapsack_kd": {"method": "magnitude_kd", "pattern": "channel", "criterion": "taylor",
                           "allocation": "knapsack"},
    "iee-channel": {"method": "iee", "pattern": "channel"},
}
MAC_REDUCTIONS = (0.3, 0.5)


def result_path(name: str, sparsity: float | None) -> Path:
    suffix = "" if sparsity is None else f"-{sparsity:g}"
    return RESULTS / f"{name.replace(':', '_')}{suffix}.json"


def run(name: str, overrides: dict, sparsity: float | None, calib, test) -> dict:
    extra = {} if sparsity is None else {"sparsity": sparsity}
    result = ptsparse.sparsify(load_reference(), calib, eval_data=test, progress=False, calib_size=len(calib),
                               **overrides, **extra)
    report = dict(result.report, run=name)
    write_json(result_path(name, sparsity), report)
    return report


def build_table() -> str:
    reports = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    reports.sort(key=lambda r: (r["run"], r["target_sparsity"]))
    lines = [
        "| run | pattern | target | achieved | dense acc | sparse acc | drop | wall time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        drop = 100 * (r["dense_accuracy"] - r["sparse_accuracy"])
        lines.append(
            f"| {r['run']} | {r['pattern']} | {r['target_sparsity']:.4f} | {r['achieved_sparsity']:.4f} | "
            f"{100 * r['dense_accuracy']:.2f} | {100 * r['sparse_accuracy']:.2f} | {drop:.2f} | "
            f"{r['wall_time_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines), reports


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptsparse.checkpoint import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = sorted({r["run"] for r in reports if r["pattern"] == "unstructured" and r["run"] in RUNS})
    for name in runs:
        rows = sorted((r for r in reports if r["run"] == name), key=lambda r: r["target_sparsity"])
        ax.plot([r["target_sparsity"] for r in rows], [100 * r["sparse_accuracy"] for r in rows], marker="o",
                label=name)
    if reports:
        ax.axhline(100 * reports[0]["dense_accuracy"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity (unstructured)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("reference ResNet-20, 1024 calibration images, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=120)
    plt.close(fig)


def comparison_table(reports: list[dict], runs: list[str]) -> str:
    """Sparse accuracy (%) of ``runs`` by sparsity, with dense, for the unstructured sparsities they share."""
    accuracy = {(r["run"], r["target_sparsity"]): 100 * r["sparse_accuracy"] for r in reports}
    sparsities = sorted({r["target_sparsity"] for r in reports if r["run"] == runs[-1]})
    lines = ["| sparsity | dense | " + " | ".join(runs) + " |", "|---" * (len(runs) + 2) + "|"]
    dense = 100 * reports[0]["dense_accuracy"]
    for sparsity in sparsities:
        cells = [f"{accuracy[(run, sparsity)]:.2f}" if (run, sparsity) in accuracy else "-" for run in runs]
        lines.append(f"| {sparsity:g} | {dense:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(reports: list[dict], base: str, variants: list[str], detail_name: str, detail) -> str:
    """One row per variant of ``base`` at each ablation sparsity: accuracy, its change, a detail, time."""
    by_key = {(r["run"], r["target_sparsity"]): r for r in reports}
    lines = [f"| run | changed | sparsity | sparse acc | vs {base} | {detail_name} | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for sparsity in sorted({r["target_sparsity"] for r in reports if r["run"] in variants}):
        reference = by_key.get((base, sparsity))
        for name in [base, *variants]:
            r = by_key.get((name, sparsity))
            if r is None:
                continue
            changed = ", ".join(f"{k}={v}" for k, v in ABLATION_RUNS.get(name, {}).items() if k != "method") or "-"
            delta = "" if reference is None or name == base else \
                f"{100 * (r['sparse_accuracy'] - reference['sparse_accuracy']):+.2f}"
            lines.append(f"| {name} | {changed} | {sparsity:g} | {100 * r['sparse_accuracy']:.2f} | {delta} | "
                         f"{detail(r)} | {r['wall_time_s']:.1f} |")
    return "\n".join(lines)


def raw_sparsity(report: dict) -> str:
    raw = report["recovery"].get("raw_sparsity")
    return "-" if raw is None else f"{raw:.4f}"


def search_share(report: dict) -> str:
    search = report.get("allocation_search")
    if not search:
        return "-"
    return f"{search['wall_time_s']:.0f} s ({100 * search['wall_time_s'] / report['wall_time_s']:.0f}%)"


def plot_allocation(report: dict, path: Path) -> None:
    """Per-layer sparsity: the initial allocation (ERK) against the learned one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptsparse.checkpoint import atomic_path

    initial, learned = report["recovery"]["initial_allocation"], report["recovery"]["learned_allocation"]
    names = list(learned)
    positions = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar([p - 0.2 for p in positions], [initial[n] for n in names], width=0.4, label=report["allocation"].upper())
    ax.bar([p + 0.2 for p in positions], [learned[n] for n in names], width=0.4, label="learned (FCPTS)")
    ax.axhline(report["target_sparsity"], color="grey", linestyle="--", linewidth=1, label="global target")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("layer sparsity")
    ax.set_title(f"FCPTS at {report['target_sparsity']:g}: learned per-layer sparsity vs ERK")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=120)
    plt.close(fig)


def fcpts_section(reports: list[dict]) -> str:
    fcpts = {r["target_sparsity"]: r for r in reports if r["run"] == "fcpts"}
    if not fcpts:
        return ""
    text = ("\n## FCPTS\n\n"
            "`fcpts`: ERK magnitude masks at the target, then one learned threshold per layer trained with the "
            "weights (KL at T = 4 plus |S - S*| through the histogram bridge, 1,600 steps, SGD 0.01, flips, "
            "teacher in eval mode), projected onto the exact target, then BatchNorm re-calibration. Same "
            "budget and settings as `magnitude_kd`, which keeps the ERK masks static.\n\n"
            + comparison_table(reports, ["pot", "magnitude_kd", "fcpts"]) + "\n\n")
    if 0.9 in fcpts:
        plot_allocation(fcpts[0.9], HERE / "fcpts_allocation_0.9.png")
        text += "![FCPTS learned allocation at 0.9](fcpts_allocation_0.9.png)\n\n"
    variants = [name for name in ABLATION_RUNS if name.startswith("fcpts-") or name == "magnitude_kd-blocks"]
    if any(r["run"] in variants for r in reports):
        text += "Ablation (one knob changed from the `fcpts` preset):\n\n" + ablation_table(
            reports, "fcpts", variants, "raw sparsity before projection", raw_sparsity) + "\n"
    return text


def unipts_section(reports: list[dict]) -> str:
    if not any(r["run"] == "unipts" for r in reports):
        return ""
    text = ("\n## UniPTS\n\n"
            "`unipts`: reducing-regrowing search (delta 0.05, population 16, 8 generations, kd fitness on 256 "
            "held-out calibration images after BN re-estimation on 256 others; ERK scored as one more candidate), "
            "then 1,600 steps of dynamic sparse training (per-layer magnitude top-k every step, straight-through "
            "gradients, SR-STE decay 5e-5) under the base-decayed objective (T = 4, tau 8 x 0.99 per epoch), "
            "SGD 0.01, weight decay 1e-4, flips, teacher in eval mode, then BatchNorm re-calibration.\n\n"
            + comparison_table(reports, ["pot", "magnitude_kd", "fcpts", "unipts"]) + "\n\n"
            "Search cost (wall time of the search and its share of the whole run):\n\n"
            "| sparsity | search | best candidate | fitness: best / ERK / uniform regrowth | evaluations |\n"
            "|---|---|---|---|---|\n")
    for r in sorted((r for r in reports if r["run"] == "unipts"), key=lambda r: r["target_sparsity"]):
        search = r["allocation_search"]
        text += (f"| {r['target_sparsity']:g} | {search_share(r)} | {search['best']} | {search['best_fitness']:.4f} / "
                 f"{search['erk_fitness']:.4f} / {search['uniform_regrowth_fitness']:.4f} | {search['evaluations']} |\n")
    variants = [name for name in ABLATION_RUNS if name.startswith("unipts-")]
    if any(r["run"] in variants for r in reports):
        text += ("\nAblation (each part removed in turn; `pot` above is the paper's starting point):\n\n"
                 + ablation_table(reports, "unipts", variants, "search time (share)", search_share) + "\n")
    return text


# run -> (what it is, the same run with static masks, the same run with plain DST), for the IEE comparison
IEE_COMPARISON = {
    "magnitude_kd": ("ERK, static masks", None, None),
    "magnitude_kd-dst": ("ERK, plain DST (per-layer top-k every step, straight-through, SR-STE decay)",
                         "magnitude_kd", None),
    "iee": ("ERK, IEE (magnitude)", "magnitude_kd", "magnitude_kd-dst"),
    "iee-taylor": ("ERK, IEE with the \\|w * g\\| criterion", "magnitude_kd", "magnitude_kd-dst"),
    "iee-no_reactivate": ("ERK, IEE without reactivation (prune/grow by magnitude only)", "magnitude_kd",
                          "magnitude_kd-dst"),
    "iee-alpha0.05": ("ERK, IEE with swap fraction 0.05", "magnitude_kd", "magnitude_kd-dst"),
    "iee-alpha0.3": ("ERK, IEE with swap fraction 0.3", "magnitude_kd", "magnitude_kd-dst"),
    "fcpts": ("FCPTS (learned thresholds)", None, None),
    "iee-fcpts": ("FCPTS's learned allocation, IEE", None, None),
    "unipts-no_dst": ("UniPTS search and base decay, static masks", None, None),
    "unipts": ("UniPTS (search, base decay, DST)", "unipts-no_dst", None),
    "unipts-iee": ("UniPTS search and base decay, IEE in place of DST", "unipts-no_dst", "unipts"),
}


IEE_COMPARISON_SPARSITIES = (0.9, 0.95)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def iee_section(reports: list[dict]) -> str:
    if not any(r["run"] == "iee" for r in reports):
        return ""
    by_key = {(r["run"], r["target_sparsity"]): r for r in reports}
    text = ("\n## IEE\n\n"
            "`iee`: ERK magnitude masks, then the `magnitude_kd` budget (1,600 steps, SGD 0.01, weight decay 3e-4, "
            "flips, teacher in eval mode) with exploit/explore cycles over the first 65% of the run: 40 steps on the "
            "active weights, prune the weakest `floor(zeta_t * k)` per layer (zeta from 0.1, cosine-decayed), 40 "
            "steps, 20 steps training only the reactivated pruned weights (kept weights, biases and BatchNorm "
            "frozen, statistics restored), regrow as many by the same criterion (10 cycles, 200 of the 1,600 steps "
            "dense). Then BatchNorm re-calibration.\n\n"
            + comparison_table(reports, ["magnitude_kd", "magnitude_kd-dst", "fcpts", "unipts", "iee"]) + "\n\n")
    sparsities = IEE_COMPARISON_SPARSITIES
    lines = ["| run | masks and dynamics | " + " | ".join(f"{s:g}" for s in sparsities)
             + " | vs the same run with static masks | vs the same run with plain DST | mean survival of regrown "
             "units to the end | wall time (s) |",
             "|---" * (len(sparsities) + 6) + "|"]
    for name, (what, static, dst) in IEE_COMPARISON.items():
        rows = [by_key.get((name, s)) for s in sparsities]
        if not any(rows):
            continue
        cells = [f"{100 * r['sparse_accuracy']:.2f}" if r else "-" for r in rows]

        def delta(base: str | None) -> str:
            parts = [f"{100 * (r['sparse_accuracy'] - by_key[(base, s)]['sparse_accuracy']):+.2f}" if r and
                     (base, s) in by_key else "-" for r, s in zip(rows, sparsities)]
            return " / ".join(parts) if base else ""

        survival = [_mean([c["survival_end"] for c in r["recovery"].get("iee_cycles", []) if "survival_end" in c])
                    for r in rows if r]
        times = " / ".join(f"{r['wall_time_s']:.0f}" if r else "-" for r in rows)
        survival_text = " / ".join(f"{v:.2f}" for v in survival if v == v) or "-"
        lines.append(f"| {name} | {what} | " + " | ".join(cells)
                     + f" | {delta(static)} | {delta(dst)} | {survival_text} | {times} |")
    text += ("Comparison and ablation (same calibration set, steps and seed; deltas per sparsity column, "
             f"{' / '.join(f'{s:g}' for s in sparsities)}; `magnitude_kd` is ERK with static masks, `unipts-no_dst` "
             "UniPTS with static masks). The IEE rows and their comparisons ran as two benchmark processes of one "
             "thread each beside other jobs, so their wall times are not comparable between rows:\n\n" + "\n".join(lines) + "\n\n")
    cycles = by_key.get(("iee", 0.9), {}).get("recovery", {}).get("iee_cycles")
    if cycles:
        text += ("Cycle diagnostics of `iee` at 0.9 (IoU of the masks before the prune and after the grow; survival: "
                 "share of the regrown weights still kept after the next cycle and at the end):\n\n"
                 "| cycle | step | swap fraction | swapped | IoU | regrown were just pruned | survival next | "
                 "survival end |\n|---|---|---|---|---|---|---|---|\n")
        for c in cycles:
            text += (f"| {c['cycle']} | {c['step']} | {c['swap_fraction']:.3f} | {c['swapped']} | {c['iou']:.3f} | "
                     f"{c['regrown_just_pruned']:.2f} | {c.get('survival_next', float('nan')):.2f} | "
                     f"{c['survival_end']:.2f} |\n")
    channel = sorted((r for r in reports if r["run"] in MAC_RUNS), key=lambda r: (r["run"], r["target_sparsity"]))
    if channel:
        text += ("\nChannels under a MAC budget: Taylor channel masks chosen by the knapsack allocation (coupled "
                 "residual channels share a mask) at the given fraction of the dense MACs removed, then the same "
                 "distillation budget with static masks (`taylor-knapsack_kd`) or IEE on channels (`iee-channel`: "
                 "Taylor gate scores from the distillation loss, prune and grow as knapsacks under the starting MACs). "
                 "MAC reduction counts every Conv and Linear layer after removal of the zeroed channels.\n\n"
                 "| run | MAC reduction target | achieved | weight sparsity | sparse acc | wall time (s) |\n"
                 "|---|---|---|---|---|---|\n")
        for r in channel:
            achieved = r["recovery"].get("iee_reduction", (r.get("allocation_search") or {}).get("reduction"))
            text += (f"| {r['run']} | {r['config']['sparsity']:g} | "
                     f"{'-' if achieved is None else f'{achieved:.4f}'} | {r['achieved_sparsity']:.4f} | "
                     f"{100 * r['sparse_accuracy']:.2f} | {r['wall_time_s']:.0f} |\n")
    return text


def write_results() -> None:
    table, reports = build_table()
    plot(reports, HERE / "accuracy_vs_sparsity.png")
    text = (
        "# Benchmark results\n\n"
        "Produced by `python benchmarks/pts_bench.py` (one JSON per run in `benchmarks/results/`). Reference "
        "ResNet-20 on Fashion-MNIST, 1024 calibration images from the training split, seed 0, accuracy on the "
        "10,000 test images, 2-core CPU. Wall time covers the whole `sparsify` call including both accuracy "
        "evaluations; peak RSS is the benchmark process's.\n\n"
        "Settings: every method ends with BatchNorm re-calibration on the calibration set. `wanda` and "
        "`sparsegpt` use uniform allocation as in their papers (`sparsegpt-erk`: ERK) and prune layer by "
        "layer on the pruned model's inputs; `pot` uses 2,000 Adam steps per layer (the toolkit's 20,000 "
        "scaled down for the CPU), no BN folding; `magnitude_kd` distils for 100 epochs of the calibration "
        "set (1,600 steps at batch 64, SGD 0.01, warm-up + cosine, flips) with the teacher in eval mode "
        "(`teacher_bn=eval`). `taylor-channel` rows prune the given fraction of output channels in every "
        "layer (the classifier keeps all its classes); their target column is that fraction. 2:4 rows skip "
        "the 1-channel stem, so their sparsity is just under 0.5.\n\n"
        f"{table}\n\n![accuracy vs sparsity](accuracy_vs_sparsity.png)\n"
        + fcpts_section(reports)
        + unipts_section(reports)
        + iee_section(reports)
        + "\n" + export_section()
        + scale_section()
    )
    write_text(HERE / "RESULTS.md", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = [*RUNS, *ABLATION_RUNS, *FIXED_PATTERN_RUNS, *CHANNEL_RUNS, *MAC_RUNS]
    parser.add_argument("--runs", nargs="+", default=every, choices=every, metavar="RUN",
                        help=f"runs to do (default all): {', '.join(every)}")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help=f"default {' '.join(map(str, SPARSITIES))}; ablations {' '.join(map(str, ABLATION_SPARSITIES))}")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true", help="only rebuild RESULTS.md and the plot")
    args = parser.parse_args(argv)
    if not args.table_only:
        calib = sample_calibration(FashionMNIST("train"), args.calib_size, seed=args.seed)
        test = FashionMNIST("test")
        for name in args.runs:
            if name in CHANNEL_RUNS:
                for fraction in CHANNEL_FRACTIONS:
                    report = run(name, dict(CHANNEL_RUNS[name], seed=args.seed), fraction, calib, test)
                    print(f"{name} @ {fraction}: {100 * report['sparse_accuracy']:.2f}%", file=sys.stderr)
                continue
            if name in MAC_RUNS:
                for reduction in args.sparsities or MAC_REDUCTIONS:
                    report = run(name, dict(MAC_RUNS[name], seed=args.seed), reduction, calib, test)
                    print(f"{name} @ {reduction} of the MACs: {100 * report['sparse_accuracy']:.2f}% "
                          f"({report['wall_time_s']:.1f} s)", file=sys.stderr)
                continue
            if name in FIXED_PATTERN_RUNS:
                report = run(name, dict(FIXED_PATTERN_RUNS[name], seed=args.seed), None, calib, test)
                print(f"{name}: {100 * report['sparse_accuracy']:.2f}%", file=sys.stderr)
                continue
            overrides = RUNS.get(name) or ABLATION_RUNS[name]
            default = SPARSITIES if name in RUNS else ABLATION_SPARSITIES
            for sparsity in args.sparsities or default:
                report = run(name, dict(overrides, seed=args.seed), sparsity, calib, test)
                print(f"{name} @ {sparsity}: {100 * report['sparse_accuracy']:.2f}% "
                      f"({report['wall_time_s']:.1f} s)", file=sys.stderr)
    write_results()
    return 0


if __name__ == "__main__":
    sys.exit(main())
