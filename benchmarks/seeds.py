"""Statistics over seeds for the benchmark tables: mean and standard deviation of a cell, and the paired
difference of two runs over the seeds they share.

A cell is one run in one regime (model, calibration size, recovery steps, sparsity); its seeds differ in the
calibration sample and the training order. Two runs are called different only when the mean of their paired
differences lies beyond two standard deviations of those differences (and at least two seeds are shared); a
single seed never makes a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MODEL = "reference"
DEFAULT_CALIB_SIZE = 1024


def regime_of(report: dict) -> dict:
    """The regime a report ran in; reports written before regimes existed ran in the default one."""
    bench = report.get("bench", {})
    return {"model": bench.get("model", DEFAULT_MODEL), "calib_size": report.get("calib_size", DEFAULT_CALIB_SIZE),
            "steps": bench.get("steps"), "sparsity": report["config"]["sparsity"]}


def is_default_regime(report: dict) -> bool:
    regime = regime_of(report)
    return (regime["model"], regime["calib_size"], regime["steps"]) == (DEFAULT_MODEL, DEFAULT_CALIB_SIZE, None)


def dense_by_model(reports: list[dict]) -> dict[str, float]:
    """Each reference model's dense accuracy in points."""
    return {regime_of(r)["model"]: 100 * r["dense_accuracy"] for r in reports}


def cell_key(report: dict) -> tuple:
    regime = regime_of(report)
    return regime["model"], regime["calib_size"], regime["steps"], regime["sparsity"], report["run"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Paired:
    """``run`` minus ``baseline`` over their shared seeds, in accuracy points."""

    mean: float
    std: float
    seeds: int

    @property
    def significant(self) -> bool:
        return self.seeds >= 2 and abs(self.mean) > 2 * self.std

    def __str__(self) -> str:
        if self.seeds < 2:
            return f"{self.mean:+.2f} (1 seed)"
        mark = " **" if self.significant else ""
        return f"{self.mean:+.2f} ± {self.std:.2f}{mark}"


def paired(run: dict[int, float], baseline: dict[int, float]) -> Paired | None:
    """Paired difference of two ``{seed: accuracy}`` maps, or None when they share no seed."""
    shared = sorted(set(run) & set(baseline))
    if not shared:
        return None
    mean, std = mean_std([run[s] - baseline[s] for s in shared])
    return Paired(mean, std, len(shared))


def accuracy_by_seed(reports: list[dict]) -> dict[tuple, dict[int, float]]:
    """cell key -> {seed: sparse accuracy in points}."""
    cells: dict[tuple, dict[int, float]] = {}
    for report in reports:
        cells.setdefault(cell_key(report), {})[report["seed"]] = 100 * report["sparse_accuracy"]
    return cells


def wall_times(reports: list[dict]) -> dict[tuple, list[float]]:
    """cell key -> the wall times of its seeds (s)."""
    cells: dict[tuple, list[float]] = {}
    for report in reports:
        cells.setdefault(cell_key(report), []).append(report["wall_time_s"])
    return cells


def parts_of(report: dict) -> str:
    """The run's allocation / objective / dynamics (the factorial's axes; ``-`` where it does not distil);
    ``kd_blocks (rel)``: normalised by the teacher's block outputs."""
    config = report["config"]
    if config.get("recovery") != "distill":
        return f"{config['allocation']} / - / -"
    objective = config["objective"]
    if objective == "kd_blocks" and config.get("kd_blocks", {}).get("normalize") == "teacher":
        objective += " (rel)"
    return f"{config['allocation']} / {objective} / {config['dynamics']}"


def format_cell(values: dict[int, float]) -> str:
    mean, std = mean_std(list(values.values()))
    return f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f} ± {std:.2f} ({len(values)})"
