"""What every rank of ``torchrun --nproc-per-node 2 worker.py OUT`` runs for ``test_data_parallel.py``: the runs
in :data:`RUNS` and :data:`REFERENCE_RUNS` (which the tests repeat in one process; each rank also counts the work
it did of what the ranks share out), the runs each rank must refuse, a save, and a run
interrupted after a checkpoint then resumed (:data:`RESUMED`, :data:`RESUMED_SHARDED`); each rank writes what it
got to ``OUT/rank<R>.pt``.
With ``fail`` after ``OUT``, the command line distils on every rank and rank 1 fails at its third step. With
``one_shot``, the data-driven one-shot criteria of :data:`ONE_SHOT` prune the reference model (a chain of residual
blocks: layer-by-layer on cached block inputs) and each rank writes its masks and the batches its stem ran, and a
latency knapsack (:data:`LATENCY`) its masks and how many layers it timed. With ``lm DIR TRAIN VALID``, :data:`LM`
distils the causal language model in ``DIR`` (:func:`lm_run`), its student whole on each rank and sharded, and each
rank writes its masks, weights, perplexities and the parameter elements its optimizer held."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ptsparse  # noqa: E402
from ptsparse import cli, distributed  # noqa: E402
from ptsparse.allocation import knapsack  # noqa: E402
from ptsparse.allocation.unipts_search import FitnessEvaluator  # noqa: E402
from ptsparse.errors import CalibrationError, PtsparseError  # noqa: E402
from ptsparse.graph.cost import count_macs  # noqa: E402
from ptsparse.data import load_source, sample_calibration  # noqa: E402
from ptsparse.models import load_reference, resolve_model, zoo  # noqa: E402
from ptsparse.recovery import DYNAMICS, Dynamics, layerwise, trainer  # noqa: E402
from ptsparse.recovery.memory import SHARDS  # noqa: E402
from tests.conftest import TinyCNN  # noqa: E402

DISTIL = {"sparsity": 0.8, "distill_iterations": 12, "batch_size": 16}
IEE_CYCLES = {"iee_exploit_steps": 2, "iee_improve_steps": 2, "iee_explore_steps": 2, "iee_alpha": 0.3}
RUNS = {
    "magnitude": {"method": "magnitude", "sparsity": 0.8},
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "magnitude_kd": {"method": "magnitude_kd", **DISTIL},
    # the mask-moving dynamics, each with what reaches its decisions: gradients through DDP, Taylor sums
    "dst": {"method": "magnitude_kd", "dynamics": "dst", **DISTIL, "distill_lr": 0.05},
    "iee": {"method": "iee", **DISTIL, "distill_iterations": 20, **IEE_CYCLES},
    "iee_taylor": {"method": "iee", **DISTIL, "distill_iterations": 20, **IEE_CYCLES, "iee_criterion": "taylor"},
    "iee_channels": {"method": "iee", "pattern": "channel", "sparsity": 0.3, "distill_iterations": 20,
                     "batch_size": 16, **IEE_CYCLES},
    "fcpts": {"method": "fcpts", **DISTIL, "learned_thresholds_score_grad": "ste"},
    # work the ranks share out instead of repeating: POT's layers, the UniPTS search's candidates (and finalists)
    "pot": {"method": "pot", "sparsity": 0.8, "layerwise_iterations": 30, "batch_size": 16},
    "unipts": {"method": "unipts", **DISTIL, "distill_iterations": 4, "unipts_search_population": 6,
               "unipts_search_generations": 2, "unipts_search_parents": 3, "unipts_search_bn_samples": 16,
               "unipts_search_fit_samples": 16, "unipts_search_rescore_top": 2, "unipts_search_rescore_steps": 3},
    # memory savers
    "bf16": {"method": "magnitude_kd", **DISTIL, "distill_precision": "bf16"},
}
# Runs on the reference model (a chain of residual blocks, which gradient checkpointing recomputes).
REFERENCE_RUNS = {
    "no_checkpointing": {"method": "magnitude_kd", "sparsity": 0.5, "distill_iterations": 3, "batch_size": 16},
    "grad_checkpointing": {"method": "magnitude_kd", "sparsity": 0.5, "distill_iterations": 3, "batch_size": 16,
                           "distill_grad_checkpointing": True},
    # the student sharded with FSDP2, each residual block one unit, its activations recomputed
    "fsdp": {"method": "magnitude_kd", "sparsity": 0.5, "distill_iterations": 3, "batch_size": 16,
             "distill_grad_checkpointing": True, "distill_shard": "fsdp"},
}
# 64 samples in batches of 16: two whole batches per rank.
ONE_SHOT = {
    "wanda": {"method": "wanda", "sparsity": 0.6, "batch_size": 16},
    "wanda_2_4": {"method": "wanda", "pattern": "2:4", "batch_size": 16},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.6, "batch_size": 16},
    "sparsegpt_2_4": {"method": "sparsegpt", "pattern": "2:4", "batch_size": 16},
    "taylor": {"method": "taylor", "sparsity": 0.3, "batch_size": 16},
    "wanda_offload": {"method": "wanda", "sparsity": 0.6, "batch_size": 16, "offload": True},
}
# Channel counts within a latency budget: the tables' standalone layers are timed by the ranks in turn.
LATENCY = {"method": "taylor", "allocation": "knapsack", "knapsack_cost": "latency", "sparsity": 0.3,
           "batch_size": 16}
# A causal language model (a tiny Llama) distilled on packed text, perplexity on held-out text.
LM = {"method": "magnitude_kd", "sparsity": 0.5, "distill_iterations": 5, "batch_size": 4}
# Checkpoints at step 5, in the exploration of IEE's first cycle; the interrupted run stops at step 8.
RESUMED = {**RUNS["iee_taylor"], "distill_checkpoint_every": 5}
INTERRUPT_AT = 8
# The same with the student sharded (FSDP2): checkpoints of full state dicts gathered from the shards.
RESUMED_SHARDED = {**RUNS["magnitude_kd"], "distill_shard": "fsdp", "distill_checkpoint_every": 5}


@DYNAMICS.register("rank_local")
class RankLocal(Dynamics):
    """A dynamics that does not declare that it runs data-parallel."""


REFUSED = {
    "rank_local": {"method": "magnitude_kd", "dynamics": "rank_local", "sparsity": 0.8, "distill_iterations": 2},
    "tiny_batches": {"method": "magnitude_kd", "sparsity": 0.8, "distill_iterations": 2, "batch_size": 1},
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def calibration(offset: int = 0) -> torch.Tensor:
    return torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(1 + offset))


def reference() -> torch.nn.Module:
    return load_reference().eval()


def reference_calibration() -> torch.Tensor:
    return torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def run(name: str) -> ptsparse.SparsifyResult:
    """``sparsify`` of run ``name`` of :data:`RUNS` (on :func:`model`) or :data:`REFERENCE_RUNS` (on the reference
    model)."""
    if name in REFERENCE_RUNS:
        return ptsparse.sparsify(reference(), reference_calibration(), **REFERENCE_RUNS[name])
    return ptsparse.sparsify(model(), calibration(), **RUNS[name])


class Counting:
    """Within the context, counts this rank's part of the shared-out work: candidates scored by the UniPTS search,
    layers whose inputs POT caches (one per layer it reconstructs), and the elements of the parameters its
    distillation optimizer holds (the shards of a sharded student)."""

    def __enter__(self) -> dict[str, int]:
        self.counts = {"candidates": 0, "layers": 0, "optimized": 0}
        self.saved = FitnessEvaluator._score, layerwise.cache_layer_io, trainer.make_optimizer

        def score(evaluator, *args, _score=FitnessEvaluator._score):
            self.counts["candidates"] += 1
            return _score(evaluator, *args)

        def cache(*args, _cache=layerwise.cache_layer_io, **kwargs):
            self.counts["layers"] += 1
            return _cache(*args, **kwargs)

        def optimizer(groups, *args, _make=trainer.make_optimizer):
            local = [getattr(p, "to_local", lambda p=p: p)() for group in groups for p in group["params"]]
            self.counts["optimized"] += sum(tensor.numel() for tensor in local)
            return _make(groups, *args)

        FitnessEvaluator._score, layerwise.cache_layer_io, trainer.make_optimizer = score, cache, optimizer
        return self.counts

    def __exit__(self, *exc) -> None:
        FitnessEvaluator._score, layerwise.cache_layer_io, trainer.make_optimizer = self.saved


@contextmanager
def timed_by_macs() -> Iterator[list[int]]:
    """Within the context, the knapsack's latency tables time each layer as its MACs (deterministic, so ranks and
    one process can be compared); yields a list holding the number of layers this rank timed."""
    timed = [0]

    def measure(module, shape, *args, **kwargs) -> dict[str, float]:
        timed[0] += 1
        return {"median_ms": count_macs(module, torch.zeros(1, *shape))["macs"] / 1e6}

    measure_latency, knapsack.measure_latency = knapsack.measure_latency, measure
    try:
        yield timed
    finally:
        knapsack.measure_latency = measure_latency


def one_shot(overrides: dict) -> tuple[dict[str, torch.Tensor], int]:
    """The masks of ``sparsify`` on the reference model, and how many batches went through its stem here."""
    net, batches = reference(), []
    net.stem.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    result = ptsparse.sparsify(net, reference_calibration(), **overrides, progress=False)
    return result.masks, len(batches)


def lm_run(directory: str | Path, train: str | Path, valid: str | Path, **overrides) -> ptsparse.SparsifyResult:
    """:data:`LM` (and ``overrides``) on the ``hf:`` model in ``directory``: 8 windows of 16 tokens of ``train``,
    perplexity on ``valid``."""
    model, architecture = resolve_model(f"hf:{directory}")
    tokenizer = zoo.load_tokenizer(architecture)
    source = load_source(f"text:{train}", tokenizer=tokenizer, seq_len=16, packed=True)
    held_out = load_source(f"text:{valid}", tokenizer=tokenizer, seq_len=16, packed=True)
    return ptsparse.sparsify(model, sample_calibration(source, 8, seed=0), eval_data=held_out,
                             architecture=architecture, progress=False, **{**LM, **overrides})


def stopping_at(step: int, error: BaseException):
    """``trainer.batch_at`` that raises ``error`` at ``step``."""
    batch_at = trainer.batch_at

    def stop(calibration, at, schedule):
        if at == step:
            raise error
        return batch_at(calibration, at, schedule)
    return stop


def resumed(out: Path, overrides: dict) -> dict[str, torch.Tensor]:
    """The state of an uninterrupted run of ``overrides`` and that of the same run interrupted at
    :data:`INTERRUPT_AT` then resumed (rank 0 keeps a copy of its checkpoint in ``out/kept``)."""
    whole = ptsparse.sparsify(model(), calibration(), **overrides, checkpoint_dir=out / "whole")
    batch_at, trainer.batch_at = trainer.batch_at, stopping_at(INTERRUPT_AT, KeyboardInterrupt())
    try:
        ptsparse.sparsify(model(), calibration(), **overrides, checkpoint_dir=out / "parts")
    except KeyboardInterrupt:
        if distributed.is_main():
            shutil.copytree(out / "parts", out / "kept")
    finally:
        trainer.batch_at = batch_at
    again = ptsparse.sparsify(model(), calibration(), **overrides, checkpoint_dir=out / "parts", resume=True)
    return {"whole": whole.model.state_dict(), "resumed": again.model.state_dict()}


def main(out: Path) -> None:
    with distributed.process_group():
        rank = distributed.world()[0]
        results, errors = {}, {}
        for name in (*RUNS, *REFERENCE_RUNS):
            with Counting() as work:
                result = run(name)
            report = {key: result.report[key] for key in ("achieved_sparsity", "target_sparsity", "recovery",
                                                          "layers", "allocation_search")}
            results[name] = {"masks": result.masks, "state": result.model.state_dict(), "report": report,
                             "work": dict(work)}
        result.save(out / f"saved_by_rank{rank}")
        runs = {name: (calibration(), overrides) for name, overrides in REFUSED.items()}
        runs["other_calibration"] = (calibration(offset=rank), RUNS["magnitude"])
        for name, (calib, overrides) in runs.items():
            try:
                ptsparse.sparsify(model(), calib, **overrides)
            except PtsparseError as error:
                errors[name] = f"{type(error).__name__}: {error}"
        runs = {"resumed": resumed(out, RESUMED), "resumed_sharded": resumed(out / "sharded", RESUMED_SHARDED)}
        torch.save({"results": results, "errors": errors, **runs}, out / f"rank{rank}.pt")


def fail(out: Path) -> int:
    """The command line on every rank, rank 1 failing at step 3 of a long distillation."""
    if distributed.launched_by_torchrun() and int(os.environ["RANK"]) == 1:
        trainer.batch_at = stopping_at(3, CalibrationError("rank 1 fails on purpose"))
    return cli.main(["sparsify", "--method", "magnitude_kd", "--sparsity", "0.5", "--calib-size", "32",
                     "--batch-size", "16", "--distill-iterations", "100000", "--no-eval", "--quiet",
                     "--out", str(out / "run")])


def main_one_shot(out: Path) -> None:
    with distributed.process_group():
        results = {name: one_shot(overrides) for name, overrides in ONE_SHOT.items()}
        with timed_by_macs() as timed:
            results["latency"] = one_shot(LATENCY)[0], timed[0]
        torch.save(results, out / f"rank{distributed.world()[0]}.pt")


def main_lm(out: Path, directory: str, train: str, valid: str) -> None:
    with distributed.process_group():
        results = {}
        for shard in SHARDS:
            with Counting() as work:
                result = lm_run(directory, train, valid, distill_shard=shard)
            report = {key: result.report[key] for key in ("dense_perplexity", "sparse_perplexity", "evaluation")}
            results[shard] = {"masks": result.masks, "state": result.model.state_dict(), "report": report,
                              "work": dict(work)}
        torch.save(results, out / f"rank{distributed.world()[0]}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["fail"]:
        sys.exit(fail(Path(sys.argv[1])))
    if sys.argv[2:3] == ["lm"]:
        sys.exit(main_lm(Path(sys.argv[1]), *sys.argv[3:]))
    (main_one_shot if sys.argv[2:] == ["one_shot"] else main)(Path(sys.argv[1]))
