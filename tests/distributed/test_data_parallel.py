"""Data-parallel runs (``torchrun --nproc-per-node 2``, gloo on CPU) against one process: equal masks for static
masks and nearly equal ones for moving masks, close weights, work shared out rather than repeated (POT's layers, the
UniPTS search's candidates, the latency knapsack's timings), the memory savers and a sharded student (FSDP2), a
causal language model, one writer, refusals in one line, a failing rank ending the run with one line, and resumed
runs ending as uninterrupted ones."""

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

from ptsparse.errors import CheckpointError

from .worker import (LATENCY, ONE_SHOT, REFERENCE_RUNS, RESUMED, RUNS, calibration, lm_run, model, one_shot, run,
                     timed_by_macs)

# Agreement measured with one process: 1.0 for each (dst 0.998). IEE's Taylor scores (run "iee_taylor": the same
# model on every rank, but 0.979 of one process's masks) take gradients that BatchNorm in train mode changes when it
# normalises 8 samples per rank instead of 16 (1.0 on an MLP without BatchNorm, 0.990 at a batch of 48).
MOVING = ["dst", "iee", "iee_channels", "fcpts"]

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


@pytest.mark.parametrize("name", [*RUNS, *REFERENCE_RUNS])
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


@pytest.fixture(scope="module")
def one_shot_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one_shot")
    done = torchrun(str(WORKER), str(out), "one_shot")
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", list(ONE_SHOT))
def test_one_shot_criteria_on_each_ranks_batches_give_one_process_masks(one_shot_ranks, name):
    masks, batches = one_shot(ONE_SHOT[name])
    for parallel, parallel_batches in (rank[name] for rank in one_shot_ranks):
        assert masks.keys() == parallel.keys() and all(torch.equal(masks[k], parallel[k]) for k in masks)
        # every statistics pass runs a rank's two of the four batches: 10 batches through a rank's stem against
        # 18 in one process for Wanda and SparseGPT (the chain check runs the first batch on every rank), 11 vs 15
        # for Taylor (its coupling and norm checks run an example on every rank)
        assert parallel_batches < batches


def test_latency_knapsack_shares_its_timings_out_and_gives_one_process_masks(one_shot_ranks):
    with timed_by_macs() as timed:  # real timings differ between ranks and runs: these are deterministic
        masks, _ = one_shot(LATENCY)
    for parallel, _ in (rank["latency"] for rank in one_shot_ranks):
        assert masks.keys() == parallel.keys() and all(torch.equal(masks[k], parallel[k]) for k in masks)
    shares = [rank["latency"][1] for rank in one_shot_ranks]
    assert sum(shares) == timed[0] and all(0 < share < timed[0] for share in shares)


def test_distillation_at_the_same_global_batch_stays_close_to_one_process(ranks):
    alone = ptsparse.sparsify(model(), calibration(), **RUNS["magnitude_kd"])
    parallel = ranks[1][0]["results"]["magnitude_kd"]
    assert all(torch.equal(alone.masks[layer], parallel["masks"][layer]) for layer in alone.masks)  # static masks
    # each rank's BatchNorm normalises by its half of the batch: close to one process, not equal
    for key, value in alone.model.state_dict().items():
        torch.testing.assert_close(parallel["state"][key], value, rtol=0, atol=1e-3)
    losses = [entry["loss"] for entry in alone.report["recovery"]["history"]]
    assert [entry["loss"] for entry in parallel["report"]["recovery"]["history"]] == pytest.approx(losses, rel=0.05)


@pytest.mark.parametrize("name", MOVING)
def test_moving_masks_at_the_same_global_batch_nearly_agree_with_one_process(ranks, name):
    alone = ptsparse.sparsify(model(), calibration(), **RUNS[name])
    parallel = ranks[1][0]["results"][name]
    same = sum(int((alone.masks[layer] == parallel["masks"][layer]).sum()) for layer in alone.masks)
    assert same / sum(mask.numel() for mask in alone.masks.values()) >= 0.99
    # both meet the exact target, and the masks did move
    for report in (alone.report, parallel["report"]):
        if name == "iee_channels":  # a MACs budget (the knapsack's plan): channels move between units under it
            budget = report["recovery"]["iee_budget"]
            assert budget == report["allocation_search"]["cost_after"]
            assert report["recovery"]["iee_cost_after"] <= budget
        else:
            assert report["achieved_sparsity"] == pytest.approx(report["target_sparsity"], abs=1e-3)
    recovery = parallel["report"]["recovery"]
    moved = {"dst": recovery.get("kept_changed"), "fcpts": recovery.get("projection_flips"),
             "iee": sum(cycle["swapped"] for cycle in recovery.get("iee_cycles", []))}
    assert moved.get(name, moved["iee"]) > 0


def test_pot_shares_its_layers_out_and_gives_one_process_masks_and_weights(ranks):
    alone = run("pot")
    layers = len(alone.masks)
    for rank, parallel in enumerate(rank["results"]["pot"] for rank in ranks[1]):
        assert all(torch.equal(alone.masks[layer], parallel["masks"][layer]) for layer in alone.masks)
        assert parallel["work"]["layers"] == len(range(rank, layers, 2))  # layer i reconstructed on rank i % 2 alone
        # each layer is the single process's computation; BatchNorm re-calibration sums each rank's batches
        for key, value in alone.model.state_dict().items():
            torch.testing.assert_close(parallel["state"][key], value, rtol=1e-5, atol=1e-6)
        losses = parallel["report"]["recovery"]["layer_losses"]
        assert losses == pytest.approx(alone.report["recovery"]["layer_losses"], rel=1e-5)


def test_unipts_search_shares_its_candidates_out_and_picks_the_one_process_allocation(ranks):
    alone = run("unipts")
    search = alone.report["allocation_search"]
    allocation = [layer["target"] for layer in alone.report["layers"]]
    for parallel in (rank["results"]["unipts"]["report"] for rank in ranks[1]):
        assert [layer["target"] for layer in parallel["layers"]] == allocation
        shared = parallel["allocation_search"]
        assert (shared["best"], shared["evaluations"]) == (search["best"], search["evaluations"])
        assert shared["best_per_generation"] == pytest.approx(search["best_per_generation"], rel=1e-5)
        assert [c["label"] for c in shared["rescored"]] == [c["label"] for c in search["rescored"]]
        assert [c["after_distillation"] for c in shared["rescored"]] == pytest.approx(
            [c["after_distillation"] for c in search["rescored"]], rel=1e-5)
    scored = [rank["results"]["unipts"]["work"]["candidates"] for rank in ranks[1]]
    assert sum(scored) == search["evaluations"] and all(0 < count < search["evaluations"] for count in scored)


def test_bf16_distillation_runs_data_parallel_close_to_one_process(ranks):
    alone = run("bf16")
    parallel = ranks[1][0]["results"]["bf16"]
    assert all(torch.equal(alone.masks[layer], parallel["masks"][layer]) for layer in alone.masks)
    # as fp32 (each rank's BatchNorm normalises its half batch), and each rank's autocast rounds its half: 2e-4 apart
    for key, value in alone.model.state_dict().items():
        torch.testing.assert_close(parallel["state"][key], value, rtol=0, atol=1e-3)


def test_gradient_checkpointing_runs_data_parallel_to_the_same_weights(ranks):
    alone = run("grad_checkpointing")
    for rank in ranks[1]:
        parallel, plain = rank["results"]["grad_checkpointing"], rank["results"]["no_checkpointing"]
        assert all(torch.equal(alone.masks[layer], parallel["masks"][layer]) for layer in alone.masks)
        # recomputing the reference model's blocks under DDP changes nothing (its distance to one process is that of
        # BatchNorm on half batches, which the 2-rank run without checkpointing shares)
        assert all(torch.equal(plain["state"][key], value) for key, value in parallel["state"].items())


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny random Llama's directory (with its word tokenizer), training text and held-out text."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.unit.test_language_models import CONFIGS, sentences, word_tokenizer

    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(str(directory / "model"))
    word_tokenizer().save_pretrained(str(directory / "model"))
    (directory / "train.txt").write_text(sentences(60, 0) + "\n")
    (directory / "valid.txt").write_text(sentences(12, 1) + "\n")
    return directory / "model", directory / "train.txt", directory / "valid.txt"


def test_a_language_model_distils_data_parallel_to_one_process_masks_and_perplexity(llama, tmp_path):
    """Each rank training a whole student (DistributedDataParallel) or its shards (FSDP2)."""
    done = torchrun(str(WORKER), str(tmp_path), "lm", *map(str, llama))
    assert done.returncode == 0, done.stderr[-3000:]
    alone = lm_run(*llama)
    assert alone.report["sparse_perplexity"] > alone.report["dense_perplexity"] > 1
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    whole = ranks[0]["none"]["work"]["optimized"]
    assert [rank["fsdp"]["work"]["optimized"] for rank in ranks] == [whole // 2] * 2  # every tensor halves evenly
    for parallel in (rank[shard] for rank in ranks for shard in ("none", "fsdp")):
        assert alone.masks.keys() == parallel["masks"].keys()
        for name, mask in alone.masks.items():
            assert torch.equal(mask, parallel["masks"][name])
            assert bool((parallel["state"][f"{name}.weight"][~mask] == 0).all()), name  # pruned weights stay zero
        # no BatchNorm: the ranks' half batches sum to one process's gradients up to float rounding (6e-11 measured)
        for key, value in alone.model.state_dict().items():
            torch.testing.assert_close(parallel["state"][key], value, rtol=1e-5, atol=1e-6)
        for key in ("dense_perplexity", "sparse_perplexity"):  # the windows scored across the ranks
            assert parallel["report"][key] == pytest.approx(alone.report[key], rel=1e-6)
        assert parallel["report"]["evaluation"] == alone.report["evaluation"]


@pytest.mark.parametrize("name", ["resumed", "resumed_sharded"])
def test_resume_after_an_interrupt_ends_as_an_uninterrupted_run(ranks, name):
    for rank in ranks[1]:
        whole, resumed = rank[name]["whole"], rank[name]["resumed"]
        assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_a_sharded_student_trains_as_a_whole_one_holding_half_its_parameters_per_rank(ranks):
    alone = run("fsdp")
    for rank in ranks[1]:
        sharded, whole = rank["results"]["fsdp"], rank["results"]["grad_checkpointing"]
        assert all(torch.equal(alone.masks[layer], sharded["masks"][layer]) for layer in alone.masks)
        # the same steps as DistributedDataParallel's, with each block's weights gathered (and masked) to run it
        for key, value in whole["state"].items():
            torch.testing.assert_close(sharded["state"][key], value, rtol=1e-5, atol=1e-6)
        assert sharded["work"]["optimized"] < 0.51 * whole["work"]["optimized"]


def test_resume_on_another_number_of_ranks_is_refused_in_one_line(ranks):
    out, _ = ranks
    with pytest.raises(CheckpointError, match=r"is of a run on 2 rank\(s\), this one has 1: resume it on 2"):
        ptsparse.sparsify(model(), calibration(), **RESUMED, checkpoint_dir=out / "kept", resume=True)


def test_rank_zero_alone_writes(ranks):
    out, _ = ranks
    assert (out / "saved_by_rank0" / "model.safetensors").is_file()
    assert not (out / "saved_by_rank1").exists()


@pytest.mark.parametrize(("name", "message"), [
    ("rank_local", "IncompatibleOptionsError: dynamics 'rank_local' does not run data-parallel (2 ranks)"),
    ("tiny_batches", "ConfigError: batch of 1 sample(s) for 2 ranks"),
    ("other_calibration", "DistributedError: calibration samples differ between ranks: rank(s) 1"),
])
def test_what_cannot_run_data_parallel_is_refused_on_every_rank(ranks, name, message):
    for rank in ranks[1]:
        assert rank["errors"][name].startswith(message)


@needs_fashion_mnist
def test_a_failing_rank_ends_every_rank_with_one_line(tmp_path):
    start = time.perf_counter()
    done = torchrun(str(WORKER), str(tmp_path), "fail", timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("ptsparse: error:")]
    assert errors == ["ptsparse: error: rank 1 of 2: rank 1 fails on purpose"]
    assert "gloo" not in done.stderr and "Connection closed" not in done.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run" / "model.safetensors").exists()


@needs_fashion_mnist
def test_command_line_under_torchrun_prints_and_writes_once(tmp_path):
    out = tmp_path / "run"
    done = torchrun("-m", "ptsparse", "sparsify", "--method", "magnitude_kd", "--sparsity", "0.5", "--calib-size",
                    "32", "--batch-size", "16", "--distill-iterations", "2", "--no-eval", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"wrote {out}/model.safetensors") == 1
    assert ptsparse.sparsity_of(ptsparse.load(out)) == pytest.approx(0.5, abs=1e-3)
