"""The `ptsparse` command line on the bundled reference model and Fashion-MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ptsparse.cli import main
from ptsparse.config import SparsityConfig
from ptsparse.models import architecture_of, load_reference, reference_metadata

from .conftest import needs_fashion_mnist

REPORT_KEYS = {"dense_accuracy", "sparse_accuracy", "target_sparsity", "achieved_sparsity", "layers",
               "wall_time_s", "peak_rss_mb", "seed", "calib_hash", "method"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


REFERENCE_MODELS = [("reference", "reference_resnet20", 272_186, 0.93),
                    ("reference_mobilenet", "reference_mobilenet", 158_954, 0.91)]


@pytest.mark.parametrize("name, architecture, params, accuracy", REFERENCE_MODELS)
def test_reference_weights_load_and_metadata(name, architecture, params, accuracy):
    model = load_reference(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert architecture_of(model) == architecture
    metadata = reference_metadata(name)
    assert metadata["test_accuracy"] >= accuracy and metadata["architecture"] == architecture
    assert {"recipe", "seed"} <= metadata.keys()


def test_the_compact_reference_has_depthwise_layers_and_identity_shortcuts():
    model = load_reference("reference_mobilenet")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.groups == c.in_channels > 1 for c in convs) >= 9
    assert sum(block.residual for block in model.blocks) >= 3


def test_an_unknown_reference_model_is_one_line(capsys):
    code, _, err = run_cli(capsys, "eval", "--model", "reference_mobilnet", "-q")
    assert code == 2 and err.count("\n") == 1 and "reference_mobilenet" in err


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("name, architecture, params, accuracy", REFERENCE_MODELS)
def test_reference_models_reach_their_accuracy(capsys, name, architecture, params, accuracy):
    code, out, _ = run_cli(capsys, "eval", "--model", name, "-q")
    assert code == 0
    assert json.loads(out)["accuracy"] >= accuracy


def sparsify_eval_and_report(capsys, out, calib_size: int, dense_floor: float) -> dict:
    """Runs `sparsify` (reference model, 90%) into ``out``, then `eval` and `report` on it, checking each step;
    returns the run's report."""
    code, stdout, _ = run_cli(capsys, "sparsify", "--method", "magnitude", "--model", "reference", "--data",
                              "fashion-mnist",
                              "--sparsity", "0.9", "--calib-size", str(calib_size), "--seed", "0", "--out", str(out),
                              "-q")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert dense_floor <= report["dense_accuracy"] <= 1 and 0 <= report["sparse_accuracy"] <= 1
    total = sum(layer["params"] for layer in report["layers"])
    assert round(report["achieved_sparsity"] * total) == round(0.9 * total)
    assert all({"name", "target", "achieved", "params"} <= layer.keys() for layer in report["layers"])
    assert report["calib_size"] == calib_size and report["seed"] == 0 and report["method"] == "magnitude"
    assert "achieved 0.9000" in stdout
    assert SparsityConfig.load(out / "config.yaml").sparsity == 0.9

    code, stdout, _ = run_cli(capsys, "eval", "--model", str(out), "-q")
    evaluated = json.loads(stdout)
    assert evaluated["accuracy"] == pytest.approx(report["sparse_accuracy"], abs=1e-6)
    assert evaluated["sparsity"] == pytest.approx(report["achieved_sparsity"], abs=1e-9)

    code, stdout, _ = run_cli(capsys, "report", str(out))
    assert code == 0 and "stages.2.2.conv2" in stdout
    assert (out / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


@pytest.mark.slow
@needs_fashion_mnist
def test_sparsify_writes_outputs_and_report(capsys, tmp_path):
    sparsify_eval_and_report(capsys, tmp_path / "run", calib_size=256, dense_floor=0.93)


def test_sparsify_eval_and_report_on_a_tiny_fashion_mnist(capsys, tmp_path, monkeypatch):
    """The fast variant of the slow test above (three passes over the 10,000 test images): the same commands
    and checks on a synthetic Fashion-MNIST of 256 + 64 images, without the accuracy floor."""
    from .test_train_reference import fake_fashion_mnist

    data = tmp_path / "fashion-mnist"
    data.mkdir()
    fake_fashion_mnist(data)
    monkeypatch.setenv("PTSPARSE_FASHION_MNIST_DIR", str(data))
    report = sparsify_eval_and_report(capsys, tmp_path / "run", calib_size=64, dense_floor=0)
    correct = report["sparse_accuracy"] * 64  # evaluated on the 64 synthetic test images
    assert correct == pytest.approx(round(correct), abs=1e-5)


@needs_fashion_mnist
def test_config_file_and_flag_precedence(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: magnitude\nsparsity: 0.7\nallocation: uniform\ncalib_size: 128\nseed: 1\n")
    code, _, _ = run_cli(capsys, "sparsify", "--config", str(config), "--allocation", "global",
                         "--no-eval", "--out", str(tmp_path / "run"), "-q")
    assert code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["target_sparsity"] == 0.7 and report["allocation"] == "global" and report["seed"] == 1


@needs_fashion_mnist
def test_same_seed_same_calibration_hash(capsys, tmp_path):
    hashes = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_cli(capsys, "sparsify", "--method", "magnitude", "--calib-size", "64", "--seed", seed, "--no-eval", "--out",
                str(tmp_path / name), "-q")
        hashes.append(json.loads((tmp_path / name / "report.json").read_text())["calib_hash"])
    assert hashes[0] == hashes[1] != hashes[2]


def corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    return str(path)


def wrong_checkpoint(tmp_path):
    from ptsparse.checkpoint import save_state

    path = tmp_path / "wrong.safetensors"
    save_state({"weight": torch.zeros(3)}, path, {"architecture": "reference_resnet20"})
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity 1.5"),
    (["--sparsity", "-0.1"], "sparsity -0.1"),
    (["--pattern", "4:4"], "'4:4'"),
    (["--pattern", "diagonal"], "'diagonal'"),
    (["--method", "nope"], "'nope'"),
    (["--allocation", "nope"], "'nope'"),
    (["--include", "no.such.layer"], "'no.such.layer'"),
    (["--calib-size", "0"], "calib_size"),
    (["--calib-size", "70000"], "70000"),
    (["--model", "missing.safetensors"], "missing.safetensors"),
    (["--model", corrupt_checkpoint], "corrupt"),
    (["--model", wrong_checkpoint], "does not match"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
@needs_fashion_mnist
def test_bad_input_one_line_error_no_output(capsys, tmp_path, args, message):
    args = [a(tmp_path) if callable(a) else a for a in args]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--no-eval", "--calib-size", "64", "--out",
                           str(out), "-q", *args)
    assert code == 2
    assert err.startswith("ptsparse: error:") and err.count("\n") == 1 and message in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_fashion_mnist_names_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PTSPARSE_FASHION_MNIST_DIR", str(tmp_path))
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--out", str(tmp_path / "out"), "-q")
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in err and str(tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_report_of_missing_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "no report" in err


def test_list_axes(capsys):
    assert {"magnitude", "magnitude_kd", "pot"} <= set(run_cli(capsys, "list", "methods")[1].split())
    assert run_cli(capsys, "list", "allocations")[1].split() == ["erk", "fcpts", "global", "knapsack", "owl", "uniform",
                                                               "unipts_search"]


def test_list_details_come_from_the_parts(capsys):
    out = run_cli(capsys, "list", "dynamics", "--details")[1]
    assert "iee: " in out and "    --iee-alpha (default 0.1): " in out
    assert run_cli(capsys, "list", "formats")[1].split() == ["compressed", "channels", "onnx", "hf"]


def test_sparsify_help_groups_the_flags_by_axis(capsys):
    with pytest.raises(SystemExit):
        main(["sparsify", "--help"])
    out = capsys.readouterr().out
    groups = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    for axis in ("allocation", "criterion", "recovery", "objective", "dynamics", "pattern"):
        assert any(axis in group for group in groups), axis
    assert out.index("--iee-alpha") > out.index("dynamics")
    assert "--lr " not in out  # moved keys are accepted but not listed


def test_a_moved_flag_still_works_and_says_once_where_it_moved(capsys):
    from ptsparse.cli import _config_from_args, build_parser

    config = _config_from_args(build_parser().parse_args(["sparsify", "--method", "magnitude_kd", "--lr", "0.02"]))
    assert config.distill_lr == 0.02
    assert capsys.readouterr().err == "ptsparse: warning: config key 'lr' moved to distill_lr\n"


def test_console_script_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, PTSPARSE_FASHION_MNIST_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "ptsparse.cli", "sparsify", "--method", "magnitude", "--sparsity",
                           "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "ptsparse: error: sparsity 2.0 is not allowed; it must be in [0, 1)"


def test_sparsify_from_an_image_folder(capsys, tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 3)):
        for label in ("bag", "shirt"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(32, 30, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, "sparsify", "--method", "magnitude", "--data", str(tmp_path / "images"),
                         "--calib-size", "12",
                         "--sparsity", "0.8", "--out", str(out), "-q")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calib_size"] == 12
    correct = report["sparse_accuracy"] * 6  # evaluated on the 6 images of val/
    assert correct == pytest.approx(round(correct), abs=1e-5)
    assert report["achieved_sparsity"] == pytest.approx(0.8, abs=1e-5)


@needs_fashion_mnist
def test_distill_run_leaves_no_checkpoint_and_resume_needs_out(capsys, tmp_path):
    out = tmp_path / "kd"
    code, _, _ = run_cli(capsys, "sparsify", "--method", "magnitude_kd", "--iterations", "6", "--checkpoint-every",
                         "2", "--calib-size", "64", "--no-eval", "--out", str(out), "-q")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["iterations"] == 6 and report["recovery"]["teacher_bn"] == "eval"
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--resume", "--calib-size", "64", "-q")
    assert code == 2 and "--resume needs --out" in err


@pytest.mark.slow
@needs_fashion_mnist
def test_pot_beats_plain_magnitude_at_80_percent():
    import ptsparse
    from ptsparse.data import FashionMNIST, sample_calibration

    calib = sample_calibration(FashionMNIST("train"), 512, seed=0)
    test = torch.utils.data.Subset(FashionMNIST("test"), range(5000))
    common = {"sparsity": 0.8, "allocation": "global", "global_normalize": "l2", "progress": False}
    plain = ptsparse.sparsify(load_reference(), calib, eval_data=test, method="magnitude", **common)
    pot = ptsparse.sparsify(load_reference(), calib, eval_data=test, method="pot", layer_iterations=300, **common)
    assert pot.report["sparse_accuracy"] > plain.report["sparse_accuracy"]
    assert pot.masks.keys() == plain.masks.keys()


@needs_fashion_mnist
def test_iee_combines_with_the_unipts_search_and_base_decay_from_the_cli(capsys, tmp_path):
    out = tmp_path / "iee"
    code, _, _ = run_cli(capsys, "sparsify", "--method", "iee", "--allocation", "unipts_search", "--objective",
                         "base_decayed", "--sparsity", "0.8", "--iterations", "12", "--iee-exploit-steps", "3",
                         "--iee-improve-steps", "2", "--iee-explore-steps", "2", "--iee-criterion", "taylor",
                         "--search-population", "4", "--search-generations", "1", "--search-parents", "2",
                         "--search-bn-samples", "32", "--search-fit-samples", "32", "--calib-size", "64",
                         "--no-eval", "--out", str(out), "-q")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"] == "unipts_search" and report["allocation_search"]
    assert report["recovery"]["objective"] == "base_decayed" and report["recovery"]["dynamics"] == "iee"
    assert report["recovery"]["iee_criterion"] == "taylor" and report["recovery"]["iee_cycles"]
    total = sum(layer["params"] for layer in report["layers"])
    assert round(report["achieved_sparsity"] * total) == round(0.8 * total)
