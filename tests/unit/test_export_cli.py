"""`ptsparse export` and `ptsparse bench-latency` on the reference model (no data set needed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ptsparse
from ptsparse.cli import main
from ptsparse.models import load_reference


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output directories of an unstructured and a channel run, as `ptsparse sparsify --out` writes them."""
    root = tmp_path_factory.mktemp("runs")
    calib = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name, overrides in {"u90": {"method": "magnitude", "sparsity": 0.9}, "ch30": {"method": "taylor", "sparsity": 0.3},
                            "ch30x8": {"method": "taylor", "sparsity": 0.3, "channel_multiple": 8}}.items():
        ptsparse.sparsify(load_reference(), calib, progress=False, architecture="reference_resnet20",
                          **overrides).save(root / name)
    return root


def test_export_compressed_writes_a_loadable_smaller_file(capsys, runs, tmp_path):
    out = tmp_path / "u90.safetensors"
    code, stdout, stderr = run_cli(capsys, "export", runs / "u90", "--format", "compressed", "--out", out)
    assert code == 0
    assert "smaller than the dense checkpoint" in stdout and "runs no faster" in stderr
    report = json.loads(stdout[:stdout.rindex("}") + 1])
    assert report["bytes"] == out.stat().st_size and report["size_ratio"] >= 6.5  # the bitmask limit is 7.6x; the file also holds the config
    model = ptsparse.load(runs / "u90")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ptsparse.load(out).state_dict().items())


def test_export_channels_then_bench_latency(capsys, runs, tmp_path):
    out = tmp_path / "small.safetensors"
    code, stdout, _ = run_cli(capsys, "export", runs / "ch30", "--format", "channels", "--out", out)
    assert code == 0 and out.is_file()
    results = tmp_path / "latency.json"
    code, stdout, stderr = run_cli(capsys, "bench-latency", "reference", out, runs / "u90", "--batch-sizes", 1, 2,
                                   "--warmup", 0, "--repeats", 2, "--json", results)
    assert code == 0 and "| reference |" in stdout
    measured = json.loads(results.read_text())
    rows = {row["model"]: row for row in measured["models"]}
    assert rows[str(out)]["params"] < rows["reference"]["params"]
    assert rows[str(out)]["macs"] < rows["reference"]["macs"]
    assert rows[str(runs / "u90")]["nonzero_macs"] < rows[str(runs / "u90")]["macs"]
    assert set(rows["reference"]["latency"]) == {"1", "2"}
    assert "scattered inside dense tensors" in stderr  # the unstructured model gets its no-speedup warning


@pytest.mark.parametrize("run, warned", [("ch30", True), ("ch30x8", False)])
def test_onnx_export_of_channel_widths_off_multiples_of_8_warns(capsys, runs, tmp_path, run, warned):
    small = tmp_path / "small.safetensors"
    assert run_cli(capsys, "export", runs / run, "--format", "channels", "--out", small)[0] == 0
    code, _, stderr = run_cli(capsys, "export", small, "--format", "onnx", "--out", tmp_path / "small.onnx")
    assert code == 0 and (tmp_path / "small.onnx").is_file()
    assert ("convolutions keep a width that is not a multiple of 8" in stderr) is warned
    assert ("--channel-multiple 8" in stderr) is warned


@pytest.mark.parametrize("argv, message", [
    (["--format", "zip"], "unknown export format 'zip'"),
    (["--format", "compressed", "--dtype", "int3"], "value dtype 'int3'"),
])
def test_bad_export_input_is_one_line_and_writes_nothing(capsys, runs, tmp_path, argv, message):
    out = tmp_path / "x.safetensors"
    code, _, stderr = run_cli(capsys, "export", runs / "u90", "--out", out, *argv)
    assert code == 2 and stderr.startswith("ptsparse: error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_export_of_a_missing_model_is_an_error(capsys, tmp_path):
    code, _, stderr = run_cli(capsys, "export", tmp_path / "nope", "--format", "compressed", "--out", tmp_path / "x")
    assert code == 2 and "neither a reference model (reference, " in stderr and "nor an existing checkpoint" in stderr


def test_export_to_a_directory_is_an_error(capsys, runs, tmp_path):
    code, _, stderr = run_cli(capsys, "export", runs / "u90", "--format", "compressed", "--out", tmp_path)
    assert code == 2 and "is a directory" in stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "repeats 0"),
    (["--batch-sizes", "0"], "batch size 0"),
    (["missing.onnx"], "'missing.onnx' does not exist"),
    (["--compile", "--warmup", "0"], "warmup 0 is not allowed with --compile"),
])
def test_bench_latency_rejects_bad_settings(capsys, argv, message):
    code, _, stderr = run_cli(capsys, "bench-latency", *argv)
    assert code == 2 and message in stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_bench_latency_says_why_two_four_kernels_are_missing_on_cpu(capsys):
    code, stdout, stderr = run_cli(capsys, "bench-latency", "--semi-structured", "--batch-sizes", 1,
                                   "--warmup", 0, "--repeats", 1)
    assert code == 0 and "CUDA" in stderr and "no speedup" in stderr and "(2:4 kernels)" not in stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU kernels need a C++ compiler")
def test_bench_latency_times_the_compiled_model(capsys, tmp_path):
    results = tmp_path / "latency.json"
    code, stdout, _ = run_cli(capsys, "bench-latency", "reference", "--compile", "--batch-sizes", 2, "--warmup", 1,
                              "--repeats", 2, "--json", results)
    assert code == 0 and "PyTorch models compiled by torch.compile" in stdout
    measured = json.loads(results.read_text())
    assert measured["compiled"] and [row["runtime"] for row in measured["models"]] == ["torch.compile"]
    assert measured["models"][0]["latency"]["2"]["median_ms"] > 0


def test_a_model_torch_compile_cannot_compile_is_one_line(capsys, monkeypatch):
    class Uncompilable(torch.nn.Module):
        def forward(self, x):
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no working C++ compiler"), None)

    monkeypatch.setattr(torch, "compile", lambda model: Uncompilable())
    code, _, stderr = run_cli(capsys, "bench-latency", "reference", "--compile", "--batch-sizes", 1, "--warmup", 1,
                              "--repeats", 1)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "torch.compile could not compile the model" in stderr and "without --compile" in stderr
