"""Language-model benchmark (issue 19): perplexity of the reference language model after one-shot pruning and
after recovery, by method, sparsity and pattern.

Model: ``reference_lm`` (the committed 4-layer Llama trained on the Python 3.11 documentation,
:mod:`ptsparse.models.language`); its decoder layers' Linear layers are pruned, the output layer and the embedding
are not. Calibration: :data:`CALIB_SIZE` windows of :data:`SEQ_LEN` tokens drawn by seed from the calibration text
(training-split files, ``python -m ptsparse.models.language texts``). Perplexity: on the first :data:`EVAL_TOKENS`
tokens of the held-out test split, by ptsparse's protocol (:func:`ptsparse.evaluate.perplexity`: windows of
:data:`SEQ_LEN` tokens every ``SEQ_LEN // 2``, every token after the first scored once), measured outside
``sparsify``: a row's wall time is the ``sparsify`` call alone (pruning, search, recovery), its peak RSS the
process's during that call (:func:`ptsparse.report.reset_peak_rss` before it); its CPU time is the process's
during that call (with one thread, its time on one core whatever else shares the machine).

Rows: :data:`RUNS` at :data:`SPARSITIES` (unstructured) and :data:`NM_RUNS` at 2:4, each one-shot and with
recovery (:data:`RECOVERY`: mask-keeping logit distillation from the dense model on the calibration windows, the
``magnitude_kd`` recipe's parts with a budget that fits a shared 2-core CPU), and FCPTS (:data:`LEARNED_RUNS`),
whose per-layer thresholds are learned during that same distillation. Each row writes one JSON to
``benchmarks/results/lm/``; :func:`lm_section` builds the ``RESULTS.md`` section from every file present (means
and standard deviations where a cell ran with several seeds)::

    OMP_NUM_THREADS=1 python benchmarks/lm_bench.py                         # every row, seed 0
    python benchmarks/lm_bench.py --runs wanda sparsegpt --sparsities 0.5 --seeds 0 1 2
    python benchmarks/lm_bench.py --recovery none                           # one-shot rows only
    python benchmarks/lm_bench.py --table-only                              # rebuild RESULTS.md from the files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import format_cell, mean_std, paired  # noqa: E402  (a script beside this one)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm"
MODEL = "reference_lm"
SEQ_LEN = 128  # the reference model's training windows
CALIB_SIZE = 128  # windows, as Wanda and SparseGPT calibrate (128 sequences)
EVAL_TOKENS = 32768  # of the test split's ~158k: the whole split costs ~1 min per row on one shared core
BATCH_SIZE = 8
SPARSITIES = (0.5, 0.6, 0.7)

# UniPTS's search, cut to fit: 8 genomes, 4 generations, scored on 32 of the calibration windows.
SEARCH = {"unipts_search_population": 8, "unipts_search_generations": 4, "unipts_search_parents": 4,
          "unipts_search_elites": 2, "unipts_search_fit_samples": 32}
# name -> sparsify overrides of a one-shot run.
RUNS: dict[str, dict] = {
    "magnitude": {"method": "magnitude", "allocation": "uniform"},  # layer-wise, as the LLM papers' baseline
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "owl-wanda": {"method": "wanda", "allocation": "owl"},
    # The search scores magnitude masks (it prunes its candidates by magnitude), so the run prunes by magnitude.
    "unipts_search-magnitude": {"method": "magnitude", "allocation": "unipts_search", **SEARCH},
}
NM_RUNS = ("magnitude", "wanda", "sparsegpt")  # OWL and the search allocate nothing under N:M
RECOVERY_STEPS = 50
RECOVERY: dict = {"recovery": "distill", "objective": "kd_logits", "dynamics": "static",
                  "distill_iterations": RECOVERY_STEPS, "distill_optimizer": "adam", "distill_lr": 3e-4,
                  "distill_weight_decay": 0.0, "distill_warmup_iterations": 5, "kd_logits_temperature": 1.0}
# Runs that only exist with recovery: FCPTS learns per-layer thresholds during the same distillation.
LEARNED_RUNS: dict[str, dict] = {"fcpts": {"method": "fcpts", "dynamics": "learned_thresholds"}}
RECOVERY_SUFFIX = "+kd"


def result_path(run: str, sparsity: float | None, seed: int = 0, directory: Path = RESULTS) -> Path:
    """``RUN[-kd]-SPARSITY[-sSEED].json`` (``2_4`` for the 2:4 rows)."""
    cell = "2_4" if sparsity is None else f"{sparsity:g}"
    return directory / f"{run.replace(RECOVERY_SUFFIX, '-kd')}-{cell}{'' if seed == 0 else f'-s{seed}'}.json"


def overrides_of(run: str) -> dict:
    """The sparsify overrides of a row name (``wanda``, ``wanda+kd``, ``fcpts``)."""
    if run in LEARNED_RUNS:
        return {**RECOVERY, **LEARNED_RUNS[run]}
    base = run.removesuffix(RECOVERY_SUFFIX)
    return {**RUNS[base], **(RECOVERY if run.endswith(RECOVERY_SUFFIX) else {})}


def cells(runs: list[str], sparsities: list[float], recovery: str, nm: bool) -> list[tuple[str, float | None]]:
    """The (row name, sparsity or None for 2:4) to run, one-shot rows before the recovered ones."""
    one_shot = [(run, s) for run in runs if run in RUNS for s in sparsities]
    one_shot += [(run, None) for run in runs if nm and run in NM_RUNS]
    recovered = [(run + RECOVERY_SUFFIX, s) for run, s in one_shot]
    recovered += [(run, s) for run in runs if run in LEARNED_RUNS for s in sparsities]
    return {"none": one_shot, "only": recovered, "both": one_shot + recovered}[recovery]


def token_hash(tokens) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


class Setup:
    """The model, its calibration source and the held-out tokens, loaded once for every row."""

    def __init__(self, model: str, texts: Path, eval_tokens: int) -> None:
        from ptsparse.data import PackedText
        from ptsparse.models import resolve_model, zoo

        self.model_name = model
        self.model, self.architecture = resolve_model(model)
        tokenizer = zoo.load_tokenizer(self.architecture)
        self.source = PackedText(texts / "calibration.txt", tokenizer, SEQ_LEN)
        test = PackedText(texts / "test.txt", tokenizer, SEQ_LEN).tokens
        self.tokens = test[:eval_tokens]
        self.evaluation = {"text": "test split (Python 3.11 docs, held out by file)", "split_tokens": len(test),
                           "tokens": len(self.tokens), "max_length": SEQ_LEN, "stride": SEQ_LEN // 2,
                           "scored_tokens": len(self.tokens) - 1, "tokens_sha256": token_hash(self.tokens)}

    def perplexity(self, model) -> tuple[float, float]:
        """Perplexity of ``model`` on the held-out tokens, and the seconds it took."""
        from ptsparse.evaluate import perplexity

        start = time.perf_counter()
        value = perplexity(model, self.tokens, SEQ_LEN, SEQ_LEN // 2, batch_size=BATCH_SIZE)
        return value, round(time.perf_counter() - start, 1)

    def bench(self, run: str, seed: int, eval_time_s: float) -> dict:
        return {"run": run, "model": self.model_name, "seq_len": SEQ_LEN, "calib_windows": CALIB_SIZE,
                "calib_source": f"calibration.txt ({len(self.source)} windows of {SEQ_LEN} tokens)",
                "recovery_steps": RECOVERY_STEPS if run.endswith(RECOVERY_SUFFIX) or run in LEARNED_RUNS else None,
                "eval_time_s": eval_time_s, "seed": seed}


def run_dense(setup: Setup, directory: Path = RESULTS) -> dict:
    from ptsparse.checkpoint import write_json
    from ptsparse.targets import find_targets

    value, seconds = setup.perplexity(setup.model)
    row = {"run": "dense", "model": setup.model_name, "perplexity": value, "evaluation": setup.evaluation,
           "parameters": sum(p.numel() for p in setup.model.parameters()),
           "counted_params": sum(t.numel for t in find_targets(setup.model)), "eval_time_s": seconds}
    write_json(directory / "dense.json", row)
    return row


def run_row(setup: Setup, run: str, sparsity: float | None, seed: int, directory: Path = RESULTS) -> dict:
    """One row: ``sparsify`` (timed, its peak memory measured alone), then the perplexity of its model."""
    import ptsparse
    from ptsparse.checkpoint import write_json
    from ptsparse.data import sample_calibration
    from ptsparse.report import reset_peak_rss

    calibration = sample_calibration(setup.source, CALIB_SIZE, seed=seed)
    pattern = {"sparsity": sparsity} if sparsity is not None else {"pattern": "2:4"}
    reset_peak_rss()
    cpu = time.process_time()
    result = ptsparse.sparsify(setup.model, calibration, progress=False, calib_size=CALIB_SIZE, seed=seed,
                               batch_size=BATCH_SIZE, **overrides_of(run), **pattern)
    cpu = round(time.process_time() - cpu, 1)
    value, seconds = setup.perplexity(result.model)
    report = dict(result.report, run=run, sparse_perplexity=value, evaluation=setup.evaluation,
                  bench=dict(setup.bench(run, seed, seconds), cpu_time_s=cpu))
    write_json(result_path(run, sparsity, seed, directory), report)
    return report


# --- the RESULTS.md section ------------------------------------------------------------------------------------

def load_rows(directory: Path = RESULTS) -> tuple[dict | None, list[dict]]:
    rows = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    dense = next((r for r in rows if r["run"] == "dense"), None)
    return dense, [r for r in rows if r["run"] != "dense"]


def cell_of(row: dict) -> str:
    """``0.5``, ``0.6``, ... or ``2:4``."""
    return "2:4" if row["pattern"] == "2:4" else f"{row['config']['sparsity']:g}"


def by_cell(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(row name, cell) -> its rows, one per seed."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        grouped.setdefault((row["run"], cell_of(row)), []).append(row)
    return grouped


def mean_of(rows: list[dict]) -> float:
    """The mean perplexity of a cell's seeds."""
    return mean_std([r["sparse_perplexity"] for r in rows])[0]


def perplexity_cell(rows: list[dict] | None) -> str:
    return "-" if not rows else format_cell({r["seed"]: r["sparse_perplexity"] for r in rows})


def row_names() -> list[str]:
    names = []
    for run in RUNS:
        names += [run, run + RECOVERY_SUFFIX]
    return names + list(LEARNED_RUNS)


def cell_order(cell: str) -> float:
    return 1.0 if cell == "2:4" else float(cell)


def parts(row: dict) -> str:
    config = row["config"]
    allocation = "n:m" if row["pattern"] == "2:4" else config["allocation"]
    recovery = f"{config['objective']} / {config['dynamics']}" if config["recovery"] == "distill" else "-"
    return f"{allocation} / {config['criterion']} / {recovery}"


def detail(row: dict) -> str:
    """What the allocation chose, where it chose something."""
    search = row.get("allocation_search") or {}
    if row["config"]["allocation"] == "unipts_search" and search:
        kl, erk = -search["best_fitness"], -search["erk_fitness"]  # ratios: free of how the KL is averaged
        return (f"search {search['wall_time_s']:.0f} s, {search['evaluations']} candidates, best: {search['best']} "
                f"(its KL to dense {100 * (1 - kl / erk):.1f}% below ERK's)")
    if row["config"]["allocation"] == "owl" and search:
        sparsities = [layer["sparsity"] for layer in search["layers"].values()]
        return f"layer sparsities {min(sparsities):.3f}-{max(sparsities):.3f}"
    learned = (row.get("recovery") or {}).get("learned_allocation")
    if learned:
        return f"learned layer sparsities {min(learned.values()):.3f}-{max(learned.values()):.3f}"
    return ""


def ordering_statement(dense: float, grouped: dict[tuple[str, str], list[dict]]) -> str:
    """The Wanda and SparseGPT papers' ordering on LLaMA, checked on this model's one-shot rows (seed means)."""

    def ppl(run: str, cell: str) -> float | None:
        rows = grouped.get((run, cell))
        return mean_of(rows) if rows else None

    half = {run: ppl(run, "0.5") for run in NM_RUNS}
    nm = {run: ppl(run, "2:4") for run in NM_RUNS}
    if None in half.values():
        return "The ordering check needs the one-shot magnitude, Wanda and SparseGPT rows at 0.5; not all ran yet.\n"
    gap = {run: value - dense for run, value in half.items()}
    best = max(gap["wanda"], gap["sparsegpt"])
    close = all(half[run] <= 1.5 * dense for run in ("wanda", "sparsegpt"))
    far = gap["magnitude"] >= 3 * best
    lines = [
        "The Wanda and SparseGPT papers report, on LLaMA at 50% unstructured sparsity, SparseGPT and Wanda close to "
        "the dense perplexity and magnitude pruning far worse, and at 2:4 every method further from dense than at "
        "50% unstructured. On this model (one-shot, mean over the seeds run; checks computed by "
        "`benchmarks/lm_bench.py`):\n",
        f"- At 0.5: dense {dense:.2f}; SparseGPT {half['sparsegpt']:.2f} ({half['sparsegpt'] / dense:.2f}x dense), "
        f"Wanda {half['wanda']:.2f} ({half['wanda'] / dense:.2f}x), magnitude {half['magnitude']:.2f} "
        f"({half['magnitude'] / dense:.2f}x).",
        f"- SparseGPT and Wanda close to dense (within 1.5x its perplexity): {'holds' if close else 'does not hold'}.",
        f"- Magnitude far worse (its perplexity increase over dense at least 3x the larger of Wanda's and "
        f"SparseGPT's): {'holds' if far else 'does not hold'} ({gap['magnitude'] / best:.1f}x)." if best > 0 else
        "- Magnitude far worse: Wanda and SparseGPT are not above dense, so there is no gap to compare.",
        f"- SparseGPT {'at or below' if half['sparsegpt'] <= half['wanda'] else 'above'} Wanda at 0.5 "
        f"({half['sparsegpt']:.2f} vs {half['wanda']:.2f}; the papers find them within a few percent of each other "
        f"on LLaMA-7B and larger).",
    ]
    if None not in nm.values():
        further = [run for run in NM_RUNS if nm[run] > half[run]]
        lines.append(f"- 2:4 further from dense than 0.5 unstructured for every method: "
                     f"{'holds' if len(further) == len(NM_RUNS) else 'does not hold'} (2:4: "
                     + ", ".join(f"{run} {nm[run]:.2f}" for run in NM_RUNS) + ").")
        order_half = sorted(NM_RUNS, key=lambda run: half[run])
        order_nm = sorted(NM_RUNS, key=lambda run: nm[run])
        lines.append(f"- Order from best to worst: 0.5 {' < '.join(order_half)}; 2:4 {' < '.join(order_nm)}"
                     + (" (the same)." if order_half == order_nm else " (they differ)."))
    return "\n".join(lines) + "\n"


def outlier_statement(grouped: dict[tuple[str, str], list[dict]], parameters: int) -> str:
    """OWL's outlier ratios on this model (what Wanda's activation term and OWL's allocation act on)."""
    rows = grouped.get(("owl-wanda", "0.5"))
    if not rows:
        return ""
    search = rows[0]["allocation_search"]
    ratios = {layer["group"]: layer["outlier_ratio"] for layer in search["layers"].values()}
    return (f"- Outlier weights (Wanda scores above {search['outlier_threshold']:g}x their decoder layer's mean, "
            f"OWL's measure) on this model: {100 * min(ratios.values()):.2f}%-{100 * max(ratios.values()):.2f}% by "
            "decoder layer. The Wanda paper motivates its activation term by the large outlier input features of "
            f"LLMs with billions of parameters; a model of {parameters / 1e6:.1f}M parameters, trained briefly, need "
            "not have them: one reading (not tested here) of why Wanda gains little over magnitude on it.\n")


def seed_map(rows: list[dict]) -> dict[int, float]:
    return {r["seed"]: r["sparse_perplexity"] for r in rows}


# (run, baseline): the allocation (or learned thresholds) against the uniform one, the rest of the run alike.
ALLOCATION_PAIRS = (("unipts_search-magnitude", "magnitude"), ("owl-wanda", "wanda"),
                    ("unipts_search-magnitude" + RECOVERY_SUFFIX, "magnitude" + RECOVERY_SUFFIX),
                    ("owl-wanda" + RECOVERY_SUFFIX, "wanda" + RECOVERY_SUFFIX),
                    ("fcpts", "magnitude" + RECOVERY_SUFFIX))


def allocation_statement(grouped: dict[tuple[str, str], list[dict]]) -> str:
    """Each allocation's perplexity minus the uniform allocation's, paired by seed, per sparsity."""
    lines = []
    for run, baseline in ALLOCATION_PAIRS:
        shared = [cell for cell in ("0.5", "0.6", "0.7") if (run, cell) in grouped and (baseline, cell) in grouped]
        if shared:
            lines.append(f"- `{run}` minus `{baseline}`: " + ", ".join(
                f"{cell}: {paired(seed_map(grouped[(run, cell)]), seed_map(grouped[(baseline, cell)]))}"
                for cell in shared) + ".")
    if not lines:
        return ""
    return ("\nAllocations against the uniform one (perplexity difference, paired by seed: mean ± standard deviation "
            "over the seeds, `**` beyond two standard deviations; `(1 seed)`: no claim; negative: lower perplexity "
            "than uniform). `fcpts` against `magnitude+kd`: ERK magnitude masks whose per-layer thresholds are "
            "learned during the same distillation, against uniform magnitude masks held fixed:\n\n"
            + "\n".join(lines) + "\n")


def recovery_statement(grouped: dict[tuple[str, str], list[dict]]) -> str:
    pairs = [(run, cell, mean_of(rows), mean_of(grouped[(run + RECOVERY_SUFFIX, cell)]))
             for (run, cell), rows in grouped.items() if (run + RECOVERY_SUFFIX, cell) in grouped]
    if not pairs:
        return ""
    lower = [p for p in pairs if p[3] < p[2]]
    ratios = sorted(after / before for _, _, before, after in pairs)
    return (f"- Recovery lowers the perplexity in {len(lower)} of {len(pairs)} cells; after / before: median "
            f"{ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}.\n")


def lm_section(directory: Path = RESULTS) -> str:
    """Markdown for ``RESULTS.md`` from the JSON rows (empty when there are none)."""
    dense_row, rows = load_rows(directory)
    if dense_row is None or not rows:
        return ""
    grouped = by_cell(rows)
    dense = dense_row["perplexity"]
    evaluation = dense_row["evaluation"]
    first = rows[0]
    steps = next((r["bench"]["recovery_steps"] for r in rows if r["bench"]["recovery_steps"]), None)
    seeds = sorted({r["seed"] for r in rows})
    text = (
        "\n## Language model: perplexity by method (`benchmarks/lm_bench.py`)\n\n"
        f"`reference_lm` (4-layer Llama, {dense_row['parameters'] / 1e6:.1f}M parameters, of which "
        f"{dense_row['counted_params'] / 1e6:.2f}M in the decoder layers' Linear layers are pruned and counted; the "
        f"output layer and the embedding stay dense), trained on the Python 3.11 documentation. Calibration: "
        f"{first['bench']['calib_windows']} windows of {first['bench']['seq_len']} tokens drawn by seed from the "
        f"calibration text (training-split files). Perplexity: the first {evaluation['tokens']:,} tokens of the "
        f"held-out test split ({evaluation['split_tokens']:,} tokens in all), windows of {evaluation['max_length']} "
        f"tokens every {evaluation['stride']} (each token after the first scored once, with at least "
        f"{evaluation['max_length'] - evaluation['stride']} tokens of context past the start). Seeds run: "
        f"{', '.join(map(str, seeds))} (a cell with several shows mean ± standard deviation (seeds); a difference "
        "between single-seed cells is not evidence).\n\n"
        "One-shot: `magnitude` (uniform layer-wise, the LLM papers' baseline), `wanda`, `sparsegpt` (uniform, as "
        "their papers), `owl-wanda` (OWL's outlier-weighted allocation, lambda 0.08, M 5, per decoder layer, pruned "
        "by Wanda), `unipts_search-magnitude` (UniPTS's reducing-regrowing search, population 8, 4 generations, "
        "delta 0.05, its fitness the KL of the whole model's next-token distributions to the dense model's, per "
        "token, on 32 calibration windows; it prunes its candidates by magnitude, so the run does too). "
        f"`+kd`: the same masks, then {steps} steps of logit distillation from the dense model on the calibration "
        f"windows (KL at T = 1 averaged over every token, Adam 3e-4 with 5 warm-up steps then cosine, batch "
        f"{BATCH_SIZE} windows, about 3 passes over the calibration windows, no weight decay; pruned weights stay "
        "zero; optimizer, learning rate and temperature chosen on the validation split, never the test split, "
        "among SGD 0.01 at T = 4 (the `magnitude_kd` preset's) and Adam 1e-4, 3e-4, 1e-3 at T = 1, for Wanda at "
        "0.5 and magnitude at 0.6). `fcpts`: ERK magnitude masks, then the "
        "same distillation with one threshold per layer learned jointly (FCPTS), projected onto the exact target.\n\n"
        "Wall time: the `sparsify` call alone (search, pruning, recovery; perplexity measured outside it); CPU "
        "time: the process's during that call; peak RSS: the process's during that call, reset before each row "
        f"(the lowest, {min(r['peak_rss_mb'] for r in rows):.0f} MiB, is mostly PyTorch, transformers, the dense "
        "model and the text). All runs used one thread and "
        "shared the 2-core CPU with other jobs (training runs, other benchmarks, tests), so wall times are not "
        "comparable to runs alone and only roughly to each other; the CPU time is the time on one core. "
        f"In all: {len(rows)} rows, {sum(r['wall_time_s'] for r in rows) / 60:.0f} min of `sparsify` wall time "
        f"({sum(r['bench']['cpu_time_s'] for r in rows) / 60:.0f} min CPU) and "
        f"{(sum(r['bench']['eval_time_s'] for r in rows) + dense_row['eval_time_s']) / 60:.0f} min of perplexity "
        "evaluation.\n\n"
        f"Dense perplexity: **{dense:.2f}**.\n\n"
    )
    cells_present = sorted({cell for _, cell in grouped}, key=cell_order)
    names = [name for name in row_names() if any((name, cell) in grouped for cell in cells_present)]
    text += "| run | " + " | ".join(cells_present) + " |\n" + "|---" * (len(cells_present) + 1) + "|\n"
    text += "| dense | " + " | ".join(f"{dense:.2f}" for _ in cells_present) + " |\n"
    for name in names:
        text += (f"| {name} | " + " | ".join(perplexity_cell(grouped.get((name, cell))) for cell in cells_present)
                 + " |\n")
    text += ("\nEvery row (seed 0 shown for the time, memory and detail columns):\n\n"
             "| run | target | achieved | allocation / criterion / recovery | perplexity | wall time (s) | "
             "CPU time (s) | peak RSS (MiB) | detail |\n|---|---|---|---|---|---|---|---|---|\n")
    for name in names:
        for cell in cells_present:
            cell_rows = grouped.get((name, cell))
            if not cell_rows:
                continue
            r = cell_rows[0]
            text += (f"| {name} | {cell} | {r['achieved_sparsity']:.4f} | {parts(r)} | {perplexity_cell(cell_rows)} "
                     f"| {r['wall_time_s']:.1f} | {r['bench']['cpu_time_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{detail(r)} |\n")
    text += ("\n" + ordering_statement(dense, grouped) + outlier_statement(grouped, dense_row["parameters"])
             + recovery_statement(grouped) + allocation_statement(grouped))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = [*RUNS, *LEARNED_RUNS]
    parser.add_argument("--runs", nargs="+", default=every, choices=every, metavar="RUN",
                        help=f"runs to do (default all): {', '.join(every)}")
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--no-nm", action="store_true", help="leave out the 2:4 rows")
    parser.add_argument("--recovery", choices=("both", "none", "only"), default="both",
                        help="one-shot rows, rows with recovery, or both (default)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", default=MODEL, help="the model (default reference_lm; any hf: directory with "
                                                       "a tokenizer for a trial run)")
    parser.add_argument("--texts", type=Path, default=None,
                        help="a directory holding calibration.txt and test.txt (default: written by "
                             "ptsparse.models.language.write_texts into a temporary directory)")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the row JSONs go")
    parser.add_argument("--table-only", action="store_true",
                        help="only rebuild RESULTS.md (every section, by pts_bench) from the files")
    args = parser.parse_args(argv)
    if not args.table_only:
        with tempfile.TemporaryDirectory() as scratch:
            texts = args.texts
            if texts is None:
                from ptsparse.models.language import write_texts

                texts = Path(scratch)
                write_texts(texts)
            setup = Setup(args.model, texts, args.eval_tokens)
            dense = run_dense(setup, args.out)
            print(f"dense: perplexity {dense['perplexity']:.3f} ({dense['eval_time_s']:.0f} s)", file=sys.stderr,
                  flush=True)
            for seed in args.seeds:
                for run, sparsity in cells(args.runs, args.sparsities, args.recovery, not args.no_nm):
                    report = run_row(setup, run, sparsity, seed, args.out)
                    print(f"{run} @ {sparsity or '2:4'} seed {seed}: perplexity {report['sparse_perplexity']:.3f} "
                          f"({report['wall_time_s']:.1f} s, {report['peak_rss_mb']:.0f} MiB)", file=sys.stderr,
                          flush=True)
    if args.out == RESULTS:
        from pts_bench import write_results

        write_results()
    else:
        print(lm_section(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
