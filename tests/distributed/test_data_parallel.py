"""Data-parallel runs (``torchrun --nproc-per-node 2``, gloo on CPU) against one process: equal masks, close
weights, one writer, refusals in one line, and a failing rank ending the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ptsparse
from tests.conftest import needs_fashion_mnist

from .worker import RUNS, calibration, model

WORKER = Path(__file__).with_name("worker.py")


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS``, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ranks")
    done = torchrun(str(WORKER), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", ["magnitude", "wanda", "magnitude_kd"])
def test_every_rank_ends_with_the_same_model(ranks, name):
    first, second = (rank["results"][name] for rank in ranks[1])
    assert all(torch.equal(first["masks"][layer], second["masks"][layer]) for layer in first["masks"])
    assert all(torch.equal(first["state"][key], second["state"][key]) for key in first["state"])


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_one_shot_masks_and_batchnorm_statistics_equal_one_process(ranks, name):
    alone = ptsparse.sparsify(model(), calibration(), **RUNS[name])
    parallel = ranks[1][0]["results"][name]
    assert all(torch.equal(alone.masks[layer], parallel["masks"][layer]) for layer in alone.masks)
    # BatchNorm re-calibration: each rank averages its turn of the batches, combined by batch count
    for key, value in alone.model.state_dict().items():
        torch.testing.assert_close(parallel["state"][key], value, rtol=1e-5, atol=1e-6)


def test_distillation_at_the_same_global_batch_stays_close_to_one_process(ranks):
    alone = ptsparse.sparsify(model(), calibration(), **RUNS["magnitude_kd"])
    parallel = ranks[1][0]["results"]["magnitude_kd"]
    assert all(torch.equal(alone.masks[layer], parallel["masks"][layer]) for layer in alone.masks)  # static masks
    # each rank's BatchNorm normalises by its half of the batch: close to one process, not equal
    for key, value in alone.model.state_dict().items():
        torch.testing.assert_close(parallel["state"][key], value, rtol=0, atol=1e-3)
    losses = [entry["loss"] for entry in alone.report["recovery"]["history"]]
    assert [entry["loss"] for entry in parallel["history"]] == pytest.approx(losses, rel=0.05)


def test_rank_zero_alone_writes(ranks):
    out, _ = ranks
    assert (out / "saved_by_rank0" / "model.safetensors").is_file()
    assert not (out / "saved_by_rank1").exists()


@pytest.mark.parametrize(("name", "message"), [
    ("iee", "IncompatibleOptionsError: dynamics 'iee' does not run data-parallel yet"),
    ("tiny_batches", "ConfigError: batch of 1 sample(s) for 2 ranks"),
    ("other_calibration", "DistributedError: calibration samples differ between ranks: rank(s) 1"),
])
def test_what_cannot_run_data_parallel_is_refused_on_every_rank(ranks, name, message):
    for rank in ranks[1]:
        assert rank["errors"][name].startswith(message)


def test_a_failing_rank_ends_every_rank(tmp_path):
    start = time.perf_counter()
    done = torchrun(str(WORKER), str(tmp_path), "fail", timeout=120)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert time.perf_counter() - start < 60
    assert not list(tmp_path.iterdir())


@needs_fashion_mnist
def test_command_line_under_torchrun_prints_and_writes_once(tmp_path):
    out = tmp_path / "run"
    done = torchrun("-m", "ptsparse", "sparsify", "--method", "magnitude_kd", "--sparsity", "0.5", "--calib-size",
                    "32", "--batch-size", "16", "--distill-iterations", "2", "--no-eval", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"wrote {out}/model.safetensors") == 1
    assert ptsparse.sparsity_of(ptsparse.load(out)) == pytest.approx(0.5, abs=1e-3)
