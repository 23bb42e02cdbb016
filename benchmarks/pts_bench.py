"""Post-training sparsity benchmark on the reference models (Fashion-MNIST).

The default regime is the reference ResNet-20, 1024 calibration images and each method's own recovery budget.
A regime changes the model (``--model reference_mobilenet``), the calibration size (``--calib-size 128``) or
the distillation steps (``--steps 200``); ``--seeds`` repeats every cell, each seed drawing its own calibration
sample and training order. Each run writes one report.json-style file to benchmarks/results/; RESULTS.md and
its plots are rebuilt from every result file present (means and standard deviations over seeds, and paired
differences, by ``seeds.py``), so a later change runs only its own rows:

    python benchmarks/pts_bench.py                                   # every run below, seed 0
    python benchmarks/pts_bench.py --runs magnitude-erk --sparsities 0.9 0.95
    python benchmarks/pts_bench.py --model reference_mobilenet --calib-size 128 --steps 200 \
        --runs magnitude_kd fcpts --sparsities 0.95 --seeds 0 1 2
    python benchmarks/pts_bench.py --table-only                      # rebuild RESULTS.md from the files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ptsparse
from ptsparse.checkpoint import write_json, write_text
from ptsparse.config import resolve_config
from ptsparse.data import FashionMNIST, sample_calibration
from ptsparse.models import load_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import export_section  # noqa: E402  (scripts beside this one)
from family_sweep import families_section  # noqa: E402
from lm_bench import lm_section  # noqa: E402
from lm_memory_bench import memory_section  # noqa: E402
from scale_bench import scale_section  # noqa: E402
from seeds import (  # noqa: E402
    DEFAULT_CALIB_SIZE,
    DEFAULT_MODEL,
    accuracy_by_seed,
    cell_key,
    dense_by_model,
    format_cell,
    is_default_regime,
    mean_std,
    paired,
    parts_of,
    regime_of,
    wall_times,
)

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
    "recommended": {"method": "recommended"},
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
    # The shared core with more signal per image: random crops, the block loss, both.
    "magnitude_kd-crop": {"method": "magnitude_kd", "distill_augment": "flip_crop"},
    "magnitude_kd-blocks-crop": {"method": "magnitude_kd", "objective": "kd_blocks", "distill_augment": "flip_crop"},
    # The block loss with each other part changed in turn (allocation, dynamics): a fractional factorial around it.
    "magnitude_kd-blocks_rel": {"method": "magnitude_kd", "objective": "kd_blocks", "kd_blocks_normalize": "teacher"},
    "magnitude_kd-blocks-global": {"method": "magnitude_kd", "objective": "kd_blocks", "allocation": "global"},
    "magnitude_kd-blocks-dst": {"method": "magnitude_kd", "objective": "kd_blocks", "dynamics": "dst"},
    "iee-blocks": {"method": "iee", "objective": "kd_blocks"},
    "unipts-blocks": {"method": "unipts", "objective": "kd_blocks"},
    # Versions of the methods beside the papers' (each changes one mechanism).
    "fcpts-ste_floor": {"method": "fcpts", "learned_thresholds_score_grad": "ste",
                        "learned_thresholds_init_floor": 0.05},
    "unipts-delta0.2": {"method": "unipts", "unipts_search_delta": 0.2},
    "unipts-rescore": {"method": "unipts", "unipts_search_rescore_top": 3},
    "iee-preview5x": {"method": "iee", "iee_explore_lr_scale": 5.0},
    # The recommended recipe with its masks fixed at the start instead of tightened gradually.
    "recommended-static": {"method": "recommended", "dynamics": "static"},
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


def result_path(name: str, sparsity: float | None, model: str = DEFAULT_MODEL, calib_size: int = DEFAULT_CALIB_SIZE,
                steps: int | None = None, seed: int = 0) -> Path:
    """``RUN[-SPARSITY][-MODEL][-cCALIB][-iSTEPS][-sSEED].json``, each part left out at its default."""
    parts = [name.replace(":", "_")]
    parts += [] if sparsity is None else [f"{sparsity:g}"]
    parts += [] if model == DEFAULT_MODEL else [model]
    parts += [] if calib_size == DEFAULT_CALIB_SIZE else [f"c{calib_size}"]
    parts += [] if steps is None else [f"i{steps}"]
    parts += [] if seed == 0 else [f"s{seed}"]
    return RESULTS / f"{'-'.join(parts)}.json"


def run(name: str, overrides: dict, sparsity: float | None, calib, test, model: str = DEFAULT_MODEL,
        steps: int | None = None, seed: int = 0) -> dict:
    """One cell and seed: ``steps`` (when given) replaces the distillation budget of a distilling method."""
    extra = {} if sparsity is None else {"sparsity": sparsity}
    if steps is not None and resolve_config(None, **overrides).recovery == "distill":
        extra["distill_iterations"] = steps
    result = ptsparse.sparsify(load_reference(model), calib, eval_data=test, progress=False, calib_size=len(calib),
                               seed=seed, **overrides, **extra)
    report = dict(result.report, run=name, bench={"model": model, "steps": steps})
    write_json(result_path(name, sparsity, model, len(calib), steps, seed), report)
    return report


def load_reports() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def default_cells(reports: list[dict]) -> tuple[dict[tuple, dict[int, float]], dict[tuple, dict]]:
    """The default regime's cells by (run, sparsity): their accuracy by seed, and their lowest seed's report."""
    default = [r for r in reports if is_default_regime(r)]
    accuracy = {(key[-1], key[-2]): values for key, values in accuracy_by_seed(default).items()}
    first: dict[tuple, dict] = {}
    for r in sorted(default, key=lambda r: r["seed"]):
        first.setdefault((r["run"], r["config"]["sparsity"]), r)
    return accuracy, first


def mac_reduction(report: dict) -> float | None:
    """The fraction of MACs a knapsack (MAC-budget) run removed, or None for other runs."""
    if report["allocation"] != "knapsack" and report["config"].get("allocation") != "knapsack":
        return None
    return report["recovery"].get("iee_reduction", (report.get("allocation_search") or {}).get("reduction"))


def build_table(reports: list[dict]) -> str:
    accuracy, first = default_cells(reports)
    lines = [
        "| run | pattern | target | achieved | dense acc | sparse acc | drop | wall time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in sorted(first.items(), key=lambda item: (item[0][0], item[1]["target_sparsity"])):
        mean, _ = mean_std(list(accuracy[key].values()))
        reduction = mac_reduction(r)
        target, achieved = (f"{r['target_sparsity']:.4f}", f"{r['achieved_sparsity']:.4f}") if reduction is None \
            else (f"{r['config']['sparsity']:g} of MACs", f"{reduction:.4f} of MACs")
        lines.append(
            f"| {r['run']} | {r['pattern']} | {target} | {achieved} | {100 * r['dense_accuracy']:.2f} | "
            f"{format_cell(accuracy[key])} | {100 * r['dense_accuracy'] - mean:.2f} | "
            f"{r['wall_time_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptsparse.checkpoint import atomic_path

    accuracy, first = default_cells(reports)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({run for run, _ in first if run in RUNS and first[(run, _)]["pattern"] == "unstructured"}):
        sparsities = sorted(s for run, s in first if run == name)
        ax.plot(sparsities, [mean_std(list(accuracy[(name, s)].values()))[0] for s in sparsities], marker="o",
                label=name)
    if first:
        ax.axhline(100 * next(iter(first.values()))["dense_accuracy"], color="black", linestyle="--", linewidth=1,
                   label="dense")
    ax.set_xlabel("sparsity (unstructured)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("reference ResNet-20, 1024 calibration images")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=120)
    plt.close(fig)


def comparison_table(reports: list[dict], runs: list[str]) -> str:
    """Sparse accuracy (%) of ``runs`` by sparsity, with dense, for the unstructured sparsities they share
    (mean ± standard deviation (seeds) where a cell ran with several seeds)."""
    accuracy, first = default_cells(reports)
    sparsities = sorted({s for run, s in first if run == runs[-1]})
    lines = ["| sparsity | dense | " + " | ".join(runs) + " |", "|---" * (len(runs) + 2) + "|"]
    dense = 100 * next(iter(first.values()))["dense_accuracy"]
    for sparsity in sparsities:
        cells = [format_cell(accuracy[(run, sparsity)]) if (run, sparsity) in accuracy else "-" for run in runs]
        lines.append(f"| {sparsity:g} | {dense:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(reports: list[dict], base: str, variants: list[str], detail_name: str, detail) -> str:
    """One row per variant of ``base`` at each ablation sparsity: accuracy, its paired change, a detail, time."""
    accuracy, first = default_cells(reports)
    lines = [f"| run | changed | sparsity | sparse acc | vs {base} | {detail_name} | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for sparsity in sorted({s for run, s in first if run in variants}):
        for name in [base, *variants]:
            r = first.get((name, sparsity))
            if r is None:
                continue
            changed = ", ".join(f"{k}={v}" for k, v in ABLATION_RUNS.get(name, {}).items() if k != "method") or "-"
            difference = paired(accuracy[(name, sparsity)], accuracy.get((base, sparsity), {}))
            delta = "" if difference is None or name == base else str(difference)
            lines.append(f"| {name} | {changed} | {sparsity:g} | {format_cell(accuracy[(name, sparsity)])} | {delta} | "
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
    fcpts = {sparsity: r for (run, sparsity), r in default_cells(reports)[1].items() if run == "fcpts"}
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
    for (run, _), r in sorted(default_cells(reports)[1].items(), key=lambda item: item[0]):
        if run != "unipts":
            continue
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
    accuracy, by_key = default_cells(reports)
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
        cells = [format_cell(accuracy[(name, s)]) if r else "-" for r, s in zip(rows, sparsities)]

        def delta(base: str | None) -> str:
            parts = [paired(accuracy[(name, s)], accuracy.get((base, s), {})) if r else None
                     for r, s in zip(rows, sparsities)]
            return " / ".join(str(d) if d else "-" for d in parts) if base else ""

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
    return text


MODEL_TITLES = {"reference": "ResNet-20", "reference_mobilenet": "compact MobileNet"}


def regime_order(regime: tuple) -> tuple:
    """Sort key of a (model, calibration size, steps, sparsity) regime: the default model first."""
    model, calib_size, steps, sparsity = regime
    return model != DEFAULT_MODEL, model, calib_size, steps or 0, sparsity


def channel_iee_section(reports: list[dict]) -> str:
    """Channel IEE against Taylor knapsack masks with the same distillation, per reference model and MAC budget:
    each one's mean ± standard deviation over seeds and their paired difference, and which wins."""
    cells = accuracy_by_seed(reports)
    budgets = sorted({key[:4] for key in cells if key[4] in MAC_RUNS}, key=regime_order)
    if not budgets:
        return ""
    achieved = {cell_key(r): mac_reduction(r) for r in reports if r["run"] in MAC_RUNS}
    fewest: dict[tuple, dict[int, int]] = {}  # the knapsack's narrowest unit, per seed
    for r in reports:
        if r["run"] == "taylor-knapsack_kd":
            fewest.setdefault(cell_key(r)[:4], {})[r["seed"]] = min(r["allocation_search"]["kept"].values())
    text = ("\n## Channels under a MAC budget: channel IEE against Taylor knapsack masks\n\n"
            "Taylor channel masks chosen by the knapsack allocation (coupled residual channels share a mask) at the "
            "given fraction of the dense MACs removed, then the `magnitude_kd` distillation budget (1,600 steps) with "
            "those masks static (`taylor-knapsack_kd`, HALP-style pruning then distillation) or IEE on channels "
            "(`iee-channel`: Taylor gate scores from the distillation loss, prune and grow as knapsacks under the "
            "starting MACs). MAC reduction counts every Conv and Linear layer after removal of the zeroed channels. "
            "Cells: mean ± standard deviation over seeds (each seed its own calibration sample and training order); "
            "`iee-channel - taylor-knapsack_kd`: the paired difference, `**` beyond two standard deviations. No wall "
            "times: these runs ran two at a time on one thread each, beside other work (some paused while timing "
            "benchmarks ran alone).\n\n"
            "| model | MACs removed (target) | taylor-knapsack_kd | iee-channel | iee-channel - taylor-knapsack_kd | "
            "narrowest unit of the knapsack (channels, by seed) |\n|---|---|---|---|---|---|\n")
    verdicts = []
    for model, calib_size, steps, target in budgets:
        regime = (model, calib_size, steps, target)
        static, iee = cells.get((*regime, "taylor-knapsack_kd"), {}), cells.get((*regime, "iee-channel"), {})
        difference = paired(iee, static)
        reached = [achieved[(*regime, run)] for run in MAC_RUNS if (*regime, run) in achieved]
        title = MODEL_TITLES.get(model, model) + ("" if (calib_size, steps) == (DEFAULT_CALIB_SIZE, None)
                                                   else f" ({calib_size} images, {steps or 'preset'} steps)")
        text += (f"| {title} | {min(reached):.3f} ({target:g}) | {format_cell(static) if static else '-'} | "
                 f"{format_cell(iee) if iee else '-'} | {difference if difference else '-'} | "
                 f"{', '.join(str(k) for _, k in sorted(fewest.get(regime, {}).items())) or '-'} |\n")
        if difference is not None and difference.seeds > 1:
            winner = ("`iee-channel`" if difference.mean > 0 else "`taylor-knapsack_kd`") if difference.significant \
                else "neither (within noise)"
            verdicts.append(f"{title} at {target:g} of the MACs: {winner}")
    if verdicts:
        text += "\nWhich wins, over the seeds: " + "; ".join(verdicts) + ".\n"
    return text


def regimes_section(reports: list[dict]) -> str:
    """One table per regime that ran with several seeds: each run's mean ± standard deviation and its paired
    difference from ``magnitude_kd`` (ERK masks + the same distillation), marked where it exceeds two standard
    deviations."""
    cells = {key: values for key, values in accuracy_by_seed(reports).items() if key[4] not in MAC_RUNS}
    regimes = sorted({key[:4] for key, values in cells.items() if len(values) > 1}, key=regime_order)
    if not regimes:
        return ""
    text = ("\n## Regimes: several seeds\n\n"
            "Each seed draws its own calibration sample and training order. Cells: mean ± standard deviation of the "
            "sparse accuracy (seeds); `vs magnitude_kd`: mean ± standard deviation of the paired difference over "
            "the shared seeds, `**` where it exceeds two standard deviations (a difference; anything else is "
            "within noise). Steps: the distillation budget of the distilling runs (`preset`: 100 epochs of the "
            "calibration set). The second column gives each run's parts; with 1024 images and 200 steps at 0.9 on "
            "the compact model the runs form a fractional factorial of allocation x objective x dynamics. These runs "
            "ran one at a time, but shared the 2 cores at times with unit tests and other work (those of 2026-12-04 "
            "often did), so their wall times can be up to about 3x high: the main table's `recommended` and the "
            "presets' costs ran alone.\n")
    wall = wall_times(reports)
    parts = {cell_key(r): parts_of(r) for r in reports}
    dense = dense_by_model(reports)
    text += "\nWhere the seed methods beat `magnitude_kd` by more than two standard deviations of the paired difference:\n\n"
    for method in ("fcpts", "unipts", "iee"):
        wins = []
        for regime in regimes:
            difference = paired(cells.get((*regime, method), {}), cells.get((*regime, "magnitude_kd"), {}))
            if difference is not None and difference.significant and difference.mean > 0:
                wins.append(f"{MODEL_TITLES.get(regime[0], regime[0])} {regime[1]}/{regime[2] or 'preset'}/"
                            f"{regime[3]:g} ({difference.mean:+.2f})")
        measured = sum((*regime, method) in cells for regime in regimes)
        text += (f"- `{method}`: " + ("; ".join(wins) if wins else
                 f"does not, in any of the {measured} regimes measured with several seeds") + "\n")
    for model, calib_size, steps, sparsity in regimes:
        runs = sorted(key[4] for key in cells if key[:4] == (model, calib_size, steps, sparsity))
        baseline = cells.get((model, calib_size, steps, sparsity, "magnitude_kd"), {})
        text += (f"\n**{MODEL_TITLES.get(model, model)}** (dense {dense[model]:.2f}), {calib_size} calibration images, "
                 f"{steps or 'preset'} steps, sparsity {sparsity:g}:\n\n"
                 "| run | allocation / objective / dynamics | sparse acc | vs magnitude_kd | wall time (s, mean) |\n"
                 "|---|---|---|---|---|\n")
        above, below = [], []
        for run in runs:
            key = (model, calib_size, steps, sparsity, run)
            difference = paired(cells[key], baseline) if run != "magnitude_kd" else None
            shown = "" if difference is None else str(difference) if difference.seeds > 1 else "1 seed: no claim"
            text += (f"| {run} | {parts[key]} | {format_cell(cells[key])} | {shown} | "
                     f"{mean_std(wall[key])[0]:.0f} |\n")
            if difference is not None and difference.significant:
                (above if difference.mean > 0 else below).append(f"`{run}` ({difference.mean:+.2f})")
        if baseline:
            text += (f"\nBeyond two standard deviations of `magnitude_kd`: above: {', '.join(above) or 'none'}; "
                     f"below: {', '.join(below) or 'none'}; every other run is within noise of it.\n")
    return text




def recommended_section(reports: list[dict]) -> str:
    """The recommended recipe against issue 16's targets, each computed from the runs that exist (mean over
    seeds); a target with no runs yet says so."""
    cells, dense = accuracy_by_seed(reports), dense_by_model(reports)

    def recipe(model, calib_size, steps, sparsity):
        key = (model, calib_size, steps, sparsity, "recommended")
        if len(cells.get(key, {})) > 1:
            return "recommended", cells[key], cells.get((model, calib_size, steps, sparsity, "magnitude_kd"), {})
        return None, {}, {}

    def versus(regime, margin):
        run, values, baseline = recipe(*regime)
        difference = paired(values, baseline) if run else None
        if difference is None or difference.seeds < 2:
            return "not measured with several seeds yet"
        met = "met" if difference.mean >= margin else "not met"
        return f"`{run}` {format_cell(values)} vs `magnitude_kd` {format_cell(baseline)}: {difference} ({met})"

    def near_dense(model, sparsity, margin):
        run, values, _ = recipe(model, DEFAULT_CALIB_SIZE, None, sparsity)
        if run is None:
            return "not measured with several seeds yet"
        gap = dense[model] - mean_std(list(values.values()))[0]
        return f"{format_cell(values)}, {gap:.2f} below dense ({'met' if gap <= margin else 'not met'})"

    below = []
    for key, values in cells.items():
        if key[4] == "recommended" and (*key[:4], "magnitude_kd") in cells:
            difference = paired(values, cells[(*key[:4], "magnitude_kd")])
            baseline_std = mean_std(list(cells[(*key[:4], "magnitude_kd")].values()))[1]
            if difference is not None and difference.seeds > 1 and difference.mean < -baseline_std:
                below.append(f"{MODEL_TITLES[key[0]]} {key[1]}/{key[2] or 'preset'}/{key[3]:g}")
    gradual_gains = []
    for key, values in cells.items():
        static = cells.get((*key[:4], "recommended-static"))
        difference = paired(values, static) if key[4] == "recommended" and static else None
        if difference is not None and difference.seeds > 1:
            gradual_gains.append(f"{MODEL_TITLES[key[0]]} {key[1]}/{key[2] or 'preset'}/{key[3]:g}: {difference}")
    full_run = [r for r in reports if r["run"] == "recommended" and regime_of(r) == {
        "model": DEFAULT_MODEL, "calib_size": DEFAULT_CALIB_SIZE, "steps": None, "sparsity": 0.9}]
    fastest = min((r["wall_time_s"] for r in full_run), default=None)
    lines = [
        "\n## The recommended recipe against its targets\n",
        "Computed from the runs above (mean ± standard deviation over seeds; `**`: beyond two standard deviations "
        "of the paired difference).\n",
        "- Compact model, 0.9, 1024 images, full budget, at least +2.0 over `magnitude_kd`: "
        + versus(("reference_mobilenet", DEFAULT_CALIB_SIZE, None, 0.9), 2.0),
        "- ResNet-20 at 0.9 within 1.0 point of dense: " + near_dense(DEFAULT_MODEL, 0.9, 1.0),
        "- ResNet-20 at 0.95 within 2.5 points of dense: " + near_dense(DEFAULT_MODEL, 0.95, 2.5),
        "- 128 images, 200 steps, 0.95, at least +1.0 over `magnitude_kd`: ResNet-20: "
        + versus((DEFAULT_MODEL, 128, 200, 0.95), 1.0) + "; compact model: "
        + versus(("reference_mobilenet", 128, 200, 0.95), 1.0),
        "- No regime below `magnitude_kd` by more than its standard deviation: "
        + ("met" if not below else "not met in " + ", ".join(below)),
        "- What tightening the masks gradually adds (`recommended` against `recommended-static`, paired over "
        "seeds): " + ("; ".join(gradual_gains) or "no regime with both yet"),
        "- A full `recommended` run at 0.9 on the ResNet-20 in under 10 minutes on 2 cores: "
        + ("no run yet" if fastest is None else f"{fastest:.0f} s"
           + (f", the fastest of {len(full_run)} runs (the others shared the CPU)" if len(full_run) > 1 else "")
           + f" ({'met' if fastest < 600 else 'not met'})"),
    ]
    return "\n".join(lines) + "\n"


TIME_TO_ACCURACY_RUNS = ("magnitude_kd", "fcpts", "unipts", "iee", "recommended", "recommended-static")


def time_to_accuracy_section(reports: list[dict]) -> str:
    """Per reference model at 0.9 with 1024 images: accuracy against wall time over the distillation budgets
    that ran (``--steps``, and the presets' own 1600), one line per run, so a user can choose by budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptsparse.checkpoint import atomic_path

    text = ""
    for model, title in MODEL_TITLES.items():
        by_budget: dict[tuple[str, int], list[dict]] = {}
        for report in reports:
            regime = regime_of(report)
            if (regime["model"], regime["calib_size"], regime["sparsity"]) == (model, DEFAULT_CALIB_SIZE, 0.9) \
                    and report["run"] in TIME_TO_ACCURACY_RUNS:
                by_budget.setdefault((report["run"], report["recovery"]["iterations"]), []).append(report)
        rows: dict[str, list[tuple[float, float, int]]] = {}
        table = "| run | steps | sparse acc | wall time (s, mean) |\n|---|---|---|---|\n"
        for (run, steps), group in sorted(by_budget.items()):
            wall = mean_std([r["wall_time_s"] for r in group])[0]
            accuracy = {r["seed"]: 100 * r["sparse_accuracy"] for r in group}
            rows.setdefault(run, []).append((wall, mean_std(list(accuracy.values()))[0], steps))
            table += f"| {run} | {steps} | {format_cell(accuracy)} | {wall:.0f} |\n"
            dense = 100 * group[0]["dense_accuracy"]
        if not any(len(points) > 1 for points in rows.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run, points in sorted(rows.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run)
            for wall, accuracy, steps in points:
                ax.annotate(str(steps), (wall, accuracy), fontsize=6, textcoords="offset points", xytext=(2, 2))
        ax.set_xscale("log")
        ax.set_xlabel("wall time of the whole run (s, 2-core CPU; labels: distillation steps)")
        ax.set_ylabel("test accuracy at 0.9 (%)")
        ax.set_title(f"{title}, 1024 calibration images, sparsity 0.9")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        name = f"time_to_accuracy_{model}.png"
        with atomic_path(HERE / name) as temporary:
            fig.savefig(temporary, format="png", dpi=120)
        plt.close(fig)
        text += f"\n**{title}** (dense {dense:.2f}):\n\n{table}\n![time to accuracy, {title}]({name})\n"
    return ("\n## Time to accuracy\n\nAccuracy at 0.9 with 1024 calibration images against the wall time of the "
            "whole run, over distillation budgets (`--steps`; the presets' own is 1600), mean over the seeds that "
            "ran. Read the steps more than the times: the ResNet-20's 1600-step rows of fcpts, unipts and iee ran alone "
            "on 2 threads (an earlier commit); every other row ran on 2026-12-04 beside other work (mostly one "
            "thread each, two runs at a time; the ResNet-20's 100-step rows and 400-step `recommended` on two "
            "threads), so their times are up to about 2-3x high. Each point is seed 0 alone, except the 1600-step "
            "points of `magnitude_kd`, `recommended` and `recommended-static` (3 seeds): one curve against another "
            "at one budget is not evidence; the regime tables above are.\n" + text) if text else ""


def write_results() -> None:
    reports = load_reports()
    table = build_table(reports)
    plot(reports, HERE / "accuracy_vs_sparsity.png")
    text = (
        "# Benchmark results\n\n"
        "Produced by `python benchmarks/pts_bench.py` (one JSON per run in `benchmarks/results/`). Up to the "
        "section on regimes: reference ResNet-20 on Fashion-MNIST, 1024 calibration images from the training "
        "split, seed 0 (cells run with several seeds show mean ± standard deviation (seeds), and differences as "
        "the paired mean ± standard deviation; a difference marked `(1 seed)` is not evidence), accuracy on the "
        "10,000 test images, 2-core CPU. Wall time covers the whole `sparsify` call including both accuracy "
        "evaluations; peak RSS is the benchmark process's. Channel rows under a MAC budget show the fraction of "
        "MACs targeted and removed.\n\n"
        "Settings: every method ends with BatchNorm re-calibration on the calibration set. `wanda` and "
        "`sparsegpt` use uniform allocation as in their papers (`sparsegpt-erk`: ERK) and prune layer by "
        "layer on the pruned model's inputs; `pot` uses 2,000 Adam steps per layer (the toolkit's 20,000 "
        "scaled down for the CPU), no BN folding; `magnitude_kd` distils for 100 epochs of the calibration "
        "set (1,600 steps at batch 64, SGD 0.01, warm-up + cosine, flips) with the teacher in eval mode "
        "(`teacher_bn=eval`); `recommended` is the same with the block loss relative to the teacher's block "
        "outputs (`objective: kd_blocks`, `kd_blocks_normalize: teacher`: the regimes' `magnitude_kd-blocks_rel`) "
        "and masks tightened gradually from the dense weights to the ERK counts over the first half of the "
        "budget (`dynamics: gradual`; `recommended-static`: fixed from the start). "
        "`taylor-channel` rows prune the given fraction of output channels in every "
        "layer (the classifier keeps all its classes); their target column is that fraction. 2:4 rows skip "
        "the 1-channel stem, so their sparsity is just under 0.5.\n\n"
        f"{table}\n\n![accuracy vs sparsity](accuracy_vs_sparsity.png)\n"
        + fcpts_section(reports)
        + unipts_section(reports)
        + iee_section(reports)
        + channel_iee_section(reports)
        + regimes_section(reports)
        + recommended_section(reports)
        + time_to_accuracy_section(reports)
        + "\n" + export_section()
        + scale_section()
        + "\n" + families_section()
        + memory_section()
        + lm_section()
    )
    write_text(HERE / "RESULTS.md", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = [*RUNS, *ABLATION_RUNS, *FIXED_PATTERN_RUNS, *CHANNEL_RUNS, *MAC_RUNS]
    parser.add_argument("--runs", nargs="+", default=every, choices=every, metavar="RUN",
                        help=f"runs to do (default all): {', '.join(every)}")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help=f"default {' '.join(map(str, SPARSITIES))}; ablations {' '.join(map(str, ABLATION_SPARSITIES))}")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=("reference", "reference_mobilenet"))
    parser.add_argument("--calib-size", type=int, default=DEFAULT_CALIB_SIZE)
    parser.add_argument("--steps", type=int, default=None,
                        help="distillation steps of the distilling runs (default: each preset's, 100 epochs)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to repeat every cell with")
    parser.add_argument("--table-only", action="store_true", help="only rebuild RESULTS.md and the plot")
    args = parser.parse_args(argv)
    if not args.table_only:
        test = FashionMNIST("test")
        for seed in args.seeds:
            calib = sample_calibration(FashionMNIST("train"), args.calib_size, seed=seed)
            for name in args.runs:
                for overrides, sparsity in cells_of(name, args.sparsities):
                    report = run(name, overrides, sparsity, calib, test, args.model, args.steps, seed)
                    print(f"{name} @ {sparsity} seed {seed}: {100 * report['sparse_accuracy']:.2f}% "
                          f"({report['wall_time_s']:.1f} s)", file=sys.stderr, flush=True)
    write_results()
    return 0


def cells_of(name: str, sparsities: list[float] | None) -> list[tuple[dict, float | None]]:
    """The (overrides, sparsity) cells of run ``name``: its sparsities, or ``sparsities`` where it has several."""
    if name in CHANNEL_RUNS:
        return [(CHANNEL_RUNS[name], fraction) for fraction in CHANNEL_FRACTIONS]
    if name in MAC_RUNS:
        return [(MAC_RUNS[name], reduction) for reduction in sparsities or MAC_REDUCTIONS]
    if name in FIXED_PATTERN_RUNS:
        return [(FIXED_PATTERN_RUNS[name], None)]
    default = SPARSITIES if name in RUNS else ABLATION_SPARSITIES
    return [(RUNS.get(name) or ABLATION_RUNS[name], sparsity) for sparsity in sparsities or default]


if __name__ == "__main__":
    sys.exit(main())
