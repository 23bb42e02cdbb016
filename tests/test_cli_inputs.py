"""The command line's first minutes: where results go, interrupted runs, one-line errors with suggestions."""

from __future__ import annotations

import logging

import pytest
import torch

from ptsparse.checkpoint import check_output_directory, result_directory
from ptsparse.cli import _interrupted, build_parser, main
from ptsparse.errors import ConfigError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --out ------------------------------------------------------------------------------------------------

def test_out_naming_a_file_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    import ptsparse.models

    monkeypatch.setattr(ptsparse.models, "resolve_model", lambda *a: pytest.fail("loaded the model"))
    path = tmp_path / "taken.txt"
    path.write_text("keep me")
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--out", path)
    assert code == 2 and err.count("\n") == 1
    assert err == f"ptsparse: error: output directory {str(path)!r} is an existing file; give a directory for " \
                  f"model.safetensors, config.yaml, report.json\n"
    assert path.read_text() == "keep me"


def test_out_holding_other_files_is_refused_unless_forced(capsys, tmp_path, monkeypatch):
    import ptsparse.models

    monkeypatch.setattr(ptsparse.models, "resolve_model", lambda *a: pytest.fail("loaded the model"))
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--out", tmp_path)
    assert code == 2 and "holds files that are not a ptsparse result" in err and "--force" in err
    check_output_directory(tmp_path, force=True)  # no error


def test_a_result_directory_is_replaced_whole_and_a_failed_write_keeps_it(tmp_path):
    out = tmp_path / "run"
    with result_directory(out) as staging:
        for name in ("model.safetensors", "report.json", "sparsity.png"):
            (staging / name).write_text("old")
    with result_directory(out) as staging:
        for name in ("model.safetensors", "report.json"):
            (staging / name).write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json"]  # no stale plot
    with pytest.raises(RuntimeError), result_directory(out) as staging:
        (staging / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_forced_into_a_directory_of_other_files_the_result_is_written_among_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with result_directory(tmp_path, force=True) as staging:
        (staging / "report.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.json"]


# interrupted runs ---------------------------------------------------------------------------------------

def test_resume_without_a_checkpoint_is_an_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--out", tmp_path / "run", "--resume")
    assert code == 2 and "--resume: no checkpoint in" in err and "run without --resume" in err


def test_an_interrupt_says_what_it_kept_and_how_to_continue(tmp_path):
    out = tmp_path / "run"
    argv = ["sparsify", "--method", "magnitude_kd", "--out", str(out)]
    args = build_parser().parse_args(argv)
    assert _interrupted(args, argv) == "ptsparse: interrupted; nothing was written"
    (out / ".resume").mkdir(parents=True)
    torch.save({"step": 200}, out / ".resume" / "recovery.pt")
    assert _interrupted(args, argv) == (
        f"ptsparse: interrupted; kept the checkpoint at recovery step 200 in {out / '.resume'}; "
        f"continue with: ptsparse sparsify --method magnitude_kd --out {out} --resume")


# discovery and one-line errors -------------------------------------------------------------------------

def test_a_mistyped_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sparsify", "--method", "magnitude", "--sparsty", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "unrecognized arguments: --sparsty 0.5; did you mean '--sparsity'?" in err


def test_a_mistyped_name_gets_a_suggestion(capsys):
    code, _, err = run_cli(capsys, "sparsify", "--method", "wandaa")
    assert code == 2 and "unknown method 'wandaa'; did you mean 'wanda'?" in err


def test_a_mistyped_config_key_gets_a_suggestion_not_the_key_list(tmp_path):
    from ptsparse.config import SparsityConfig

    with pytest.raises(ConfigError) as info:
        SparsityConfig(method="magnitude", sparsty=0.5)
    message = str(info.value)
    assert "did you mean 'sparsity'?" in message and "calib_balanced" not in message


def test_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        main(["sparsify", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.5)" in out and "(default: magnitude)" in out and "(default: 1024)" in out


def test_a_config_file_takes_flag_spellings_and_the_run_inputs(tmp_path):
    from ptsparse.cli import _config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("calib-size: 256\nmodel: torchvision:resnet18\nout: runs/x\ndistill: {warmup-iterations: 3}\n")
    args = build_parser().parse_args(["sparsify", "--config", str(path), "--out", "runs/y"])
    config = _config_from_args(args)
    assert config.calib_size == 256 and config.distill_warmup_iterations == 3
    assert args.model == "torchvision:resnet18" and args.out == "runs/y"  # the command line wins


def test_list_methods_shows_picks_and_cost(capsys):
    out = run_cli(capsys, "list", "methods")[1]
    line = next(line for line in out.splitlines() if line.startswith("pot "))
    assert "allocation global" in line and "recovery layerwise" in line and " s at 90%" in line


def test_a_text_file_as_weights_says_what_it_is(capsys, tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello\n")
    code, _, err = run_cli(capsys, "eval", "--model", "torchvision:resnet18", "--weights", path)
    assert code == 2 and err.strip().endswith("are neither a safetensors file nor a torch file (torch.save)")


def test_log_messages_have_the_same_style_as_warnings():
    from ptsparse.cli import _LowercaseLevels

    record = logging.LogRecord("ptsparse", logging.WARNING, __file__, 1, "look", None, None)
    assert _LowercaseLevels("ptsparse: %(levelname)s: %(message)s").format(record) == "ptsparse: warning: look"
    assert record.levelname == "WARNING"  # other handlers still see the record as it was
