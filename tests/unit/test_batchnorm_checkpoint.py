"""BatchNorm re-calibration, and safetensors checkpoints written atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ptsparse.checkpoint import (atomic_path, load_into, load_model, load_state, save_model, save_state,
                                 write_json, write_text)
from ptsparse.data import as_calibration
from ptsparse.errors import CheckpointError
from ptsparse.recovery import recalibrate_batchnorm


# BatchNorm re-calibration ---------------------------------------------------------------------------

def conv_bn(momentum: float | None = 0.1) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=momentum))
    with torch.no_grad():  # stale statistics that the re-calibration must replace
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(9.0)
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(20, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def conv_statistics(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = conv(x)
    return out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=True)


def test_statistics_of_a_single_batch_are_exact(images):
    model = conv_bn()
    assert recalibrate_batchnorm(model, as_calibration(images), batch_size=len(images)) == 1
    mean, var = conv_statistics(model[0], images)
    bn = model[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_mean_is_averaged_over_equal_batches(images):
    model = conv_bn()
    recalibrate_batchnorm(model, as_calibration(images), batch_size=5)
    mean, _ = conv_statistics(model[0], images)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 4
    batch_vars = torch.stack([conv_statistics(model[0], chunk)[1] for chunk in images.split(5)])
    assert torch.allclose(model[1].running_var, batch_vars.mean(0), atol=1e-5)  # cumulative average


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("training", [False, True])
def test_momentum_and_modes_are_restored(images, momentum, training):
    model = conv_bn(momentum)
    model.train(training)
    recalibrate_batchnorm(model, as_calibration(images), batch_size=8)
    assert model[1].momentum == momentum
    assert all(module.training == training for module in model.modules())


def test_mixed_modes_are_restored_individually(images):
    model = conv_bn()
    model[0].train()  # only the conv in train mode
    recalibrate_batchnorm(model, as_calibration(images))
    assert [m.training for m in model.modules()] == [False, True, False]


def test_dropout_stays_in_eval_mode_during_recalibration(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Dropout(0.9), nn.BatchNorm2d(3)).eval()
    recalibrate_batchnorm(model, as_calibration(images), batch_size=len(images))
    mean, var = conv_statistics(model[0], images)  # as if dropout were not there
    assert torch.allclose(model[2].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[2].running_var, var, atol=1e-5)


def test_recalibration_leaves_weights_alone(images):
    model = conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    recalibrate_batchnorm(model, as_calibration(images))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batchnorm1d_in_an_mlp():
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).eval()
    assert recalibrate_batchnorm(model, as_calibration(x), batch_size=32) == 1
    with torch.no_grad():
        out = model[0](x)
    assert torch.allclose(model[1].running_mean, out.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, out.var(0, unbiased=True), atol=1e-5)


def test_models_without_running_statistics_are_untouched(images):
    assert recalibrate_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3)), as_calibration(images)) == 0
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False))
    assert recalibrate_batchnorm(model, as_calibration(images)) == 0


def test_modes_restored_when_forward_fails():
    model = conv_bn(0.2)
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, as_calibration(torch.randn(4, 7, 6, 6)))  # wrong channel count
    assert model[1].momentum == 0.2
    assert not any(m.training for m in model.modules())


# checkpoints ----------------------------------------------------------------------------------------

@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.randn(4, generator=generator).double(),
        "half": torch.randn(2, 5, generator=generator).half(),
        "steps": torch.arange(7),
        "mask": torch.rand(3, 3, generator=generator) > 0.5,
        "transposed": torch.randn(3, 6, generator=generator).t(),  # not contiguous
        "special": torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-45]),
    }


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes()


def test_save_load_round_trip_is_bit_exact(tmp_path, state):
    metadata = {"architecture": "tiny", "config": {"sparsity": 0.9, "include": ["*"]}, "achieved_sparsity": 0.9}
    path = tmp_path / "model.safetensors"
    save_state(state, path, metadata)
    loaded, loaded_metadata = load_state(path)
    assert set(loaded) == set(state)
    assert all(bit_equal(loaded[k], state[k]) for k in state)
    assert loaded_metadata == metadata
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_round_trip_without_metadata(tmp_path, state):
    save_state(state, tmp_path / "m.safetensors")
    _, metadata = load_state(tmp_path / "m.safetensors")
    assert metadata is None


def test_save_creates_parent_directories(tmp_path, state):
    path = tmp_path / "a" / "b" / "m.safetensors"
    save_state(state, path)
    assert path.is_file()


def test_save_model_and_load_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    save_model(model, tmp_path / "m.safetensors", {"x": 1})

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))

    loaded = load_model(build, tmp_path / "m.safetensors")
    assert not loaded.training
    assert all(bit_equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_load_into_rejects_other_names_and_shapes(state):
    model = nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match="missing weight"):
        load_into(model, {"bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match="unexpected extra"):
        load_into(model, {"weight": torch.zeros(4, 3), "bias": torch.zeros(4), "extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape of weight"):
        load_into(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(4)})


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError):
        load_state(tmp_path)  # a directory is not a checkpoint


@pytest.mark.parametrize("kind", ["random", "empty", "text", "truncated", "small-header"])
def test_load_corrupt_file_raises(tmp_path, state, kind):
    path = tmp_path / "bad.safetensors"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n" * 20)
    elif kind == "truncated":
        save_state(state, path, {"a": 1})
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_state(path)


def test_metadata_that_is_not_json_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"ptsparse": "{not json"})
    with pytest.raises(CheckpointError):
        load_state(path)


# atomic writes --------------------------------------------------------------------------------------

def test_atomic_writes_leave_only_the_final_files(tmp_path, state):
    write_text(tmp_path / "a.txt", "hello")
    write_json(tmp_path / "b.json", {"x": [1, 2]})
    save_state(state, tmp_path / "c.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.json", "c.safetensors"]
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "b.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'


def test_atomic_path_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "out.txt") as temporary:
            assert temporary.parent == tmp_path and temporary.exists()
            temporary.write_text("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as temporary:
            temporary.write_text("new but unfinished")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_failed_save_state_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        save_state({"a": torch.zeros(4)}, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_tensors_sharing_memory_are_saved_under_each_name(tmp_path):
    shared = torch.arange(4.0)
    save_state({"a": shared, "b": shared}, tmp_path / "m.safetensors")
    loaded, _ = load_state(tmp_path / "m.safetensors")
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)


def test_atomic_write_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
