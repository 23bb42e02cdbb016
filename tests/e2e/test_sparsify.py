"""End-to-end runs of `ptsparse.sparsify` on tiny models: exact targets, structure, safety, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import ptsparse
from ptsparse.errors import CalibrationError, ConfigError, ModelError, UnknownOptionError
from ptsparse.report import format_table, more_time_hint
from ptsparse.targets import find_targets

from ..conftest import largest_unit_step

PRUNABLE = (nn.Conv2d, nn.Linear)


def counted(model: nn.Module) -> tuple[int, int]:
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros, total


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.98])
def test_unstructured_target_is_exact(tiny_cnn, calib_images, allocation, sparsity):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=sparsity, allocation=allocation,
                               progress=False)
    zeros, total = counted(result.model)
    assert zeros == round(sparsity * total)
    assert ptsparse.sparsity_of(result.model) == pytest.approx(zeros / total, abs=0)
    assert result.report["achieved_sparsity"] == zeros / total
    for layer in result.report["layers"]:
        assert abs(layer["achieved"] - layer["target"]) * layer["params"] <= 1 + 1e-6


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_layer_caps_and_max_sparsity_are_honoured(tiny_cnn, calib_images, allocation):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.6, allocation=allocation,
                               max_sparsity=0.8, layer_caps={"fc": 0.0, "stem": 0.25}, progress=False)
    layers = {l["name"]: l for l in result.report["layers"]}
    assert layers["fc"]["achieved"] == 0.0
    assert layers["stem"]["achieved"] <= 0.25 + 1 / layers["stem"]["params"]
    assert all(l["achieved"] <= 0.8 + 1 / l["params"] for l in layers.values())
    zeros, total = counted(result.model)
    assert zeros == round(0.6 * total)


def test_nm_structure_on_weights(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", pattern="2:4", progress=False)
    model = result.model
    for name in ("grouped", "pointwise", "fc"):
        weight = getattr(model, name).weight.detach()
        groups = weight.movedim(1, -1).reshape(-1, 4)  # input channels at a fixed kernel position
        assert torch.equal((groups != 0).sum(1), torch.full((len(groups),), 2)), name
    for name in ("stem", "depthwise"):  # 1 and 1 input channel(s) per group: never eligible
        assert (getattr(model, name).weight != 0).all(), name
    assert result.report["achieved_sparsity"] == pytest.approx(result.report["target_sparsity"], abs=0)


def test_nm_pad_fallback_prunes_partial_groups(calib_images):
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 6), nn.ReLU(), nn.Linear(6, 3))
    result = ptsparse.sparsify(model, calib_images, method="magnitude", pattern="2:4", nm_fallback="pad",
                               progress=False)
    last = result.model[3].weight  # 6 inputs: one full group of 4, one partial group of 2 (keeps 2)
    assert ((last[:, :4] != 0).sum(1) == 2).all()
    assert (last[:, 4:] != 0).all()
    skipped = ptsparse.sparsify(model, calib_images, method="magnitude", pattern="2:4", progress=False).model[3].weight
    assert (skipped != 0).all()


def test_channel_pattern_zeros_whole_channels_and_keeps_classes(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", pattern="channel", sparsity=0.4,
                               progress=False)
    for module in result.model.modules():
        if isinstance(module, PRUNABLE):
            rows = module.weight.detach().flatten(1)
            zero_rows = (rows == 0).all(1)
            assert torch.equal((rows == 0).any(1) & ~zero_rows, torch.zeros_like(zero_rows)), \
                "a channel is partly pruned"
    assert (result.model.fc.weight != 0).all(), "the output layer keeps every class"
    zeros, total = counted(result.model)
    assert abs(zeros - 0.4 * total) <= largest_unit_step(tiny_cnn, calib_images)  # coupled channels go together


class ConvClassifier(nn.Module):
    """SqueezeNet's head: the classes come from a 1x1 conv followed by ReLU, pooling and flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 10, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor"])
def test_an_output_layer_behind_activation_and_pooling_keeps_every_class(calib_images, method):
    model = ConvClassifier().eval()
    result = ptsparse.sparsify(model, calib_images, method=method, pattern="channel", sparsity=0.3, progress=False)
    classes = result.model.classifier[1].weight.detach().flatten(1)
    assert (classes != 0).any(1).all(), "a class always scores 0"
    assert (result.model.features[0].weight.detach().flatten(1) == 0).all(1).any()  # the rest is pruned


def test_squeezenet_keeps_its_classifier_conv(calib_images):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = ptsparse.sparsify(model, images, method="taylor", pattern="channel", sparsity=0.3, progress=False)
    classes = result.model.classifier[1].weight.detach().flatten(1)
    assert (classes != 0).any(1).all()


def test_excluded_layers_untouched_and_not_counted(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.9, exclude=["stem", "fc"],
                               progress=False)
    assert torch.equal(result.model.stem.weight, tiny_cnn.stem.weight)
    assert torch.equal(result.model.fc.weight, tiny_cnn.fc.weight)
    assert {l["name"] for l in result.report["layers"]} == {"grouped", "depthwise", "pointwise"}
    assert ptsparse.sparsity_of(result.model, result.config) == pytest.approx(0.9, abs=1e-3)


def test_input_model_is_never_modified(tiny_cnn, calib_images):
    before = copy.deepcopy(tiny_cnn.state_dict())
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.8, progress=False)
    after = tiny_cnn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(parametrize.is_parametrized(m) for m in tiny_cnn.modules())
    assert not tiny_cnn.training
    shared = {p.data_ptr() for p in tiny_cnn.parameters()} & {p.data_ptr() for p in result.model.parameters()}
    assert not shared


def test_result_is_plain_modules_with_masks_baked_in(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.7, progress=False)
    assert not any(parametrize.is_parametrized(m) for m in result.model.modules())
    for target in find_targets(result.model):
        assert torch.equal(target.weight != 0, result.masks[target.name] & (target.weight != 0))
        assert int((~result.masks[target.name]).sum()) <= int((target.weight == 0).sum())


def test_same_seed_same_masks(tiny_cnn, calib_images):
    first = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.9, seed=3, progress=False)
    second = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.9, seed=3, progress=False)
    assert first.masks.keys() == second.masks.keys()
    assert all(torch.equal(first.masks[k], second.masks[k]) for k in first.masks)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values()))


def test_batchnorm_recalibrated_on_calibration_data(tiny_cnn, calib_images):
    on = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.9, progress=False).model
    off = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.9, bn_recalibration=False,
                            progress=False).model
    assert torch.equal(off.bn.running_mean, tiny_cnn.bn.running_mean)
    expected = on.stem(calib_images).mean((0, 2, 3))
    assert torch.allclose(on.bn.running_mean, expected, atol=1e-5)


def test_accepts_dataloader_and_batches(tiny_mlp):
    x = torch.randn(32, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long)),
                                         batch_size=8)
    a = ptsparse.sparsify(tiny_mlp, loader, method="magnitude", sparsity=0.5, progress=False)
    b = ptsparse.sparsify(tiny_mlp, [x[:16], x[16:]], method="magnitude", sparsity=0.5, progress=False)
    assert a.report["calib_size"] == b.report["calib_size"] == 32
    assert a.report["calib_hash"] == b.report["calib_hash"]


def test_save_and_load_round_trip(tiny_cnn, calib_images, tmp_path):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.75, progress=False)
    ptsparse.save(result, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "model.safetensors",
                                                                    "report.json"]
    loaded = ptsparse.load(tmp_path / "run", model=tiny_cnn)
    expected = result.model.state_dict()
    assert {k: v for k, v in loaded.state_dict().items() if not torch.equal(v, expected[k])} == {}
    assert ptsparse.SparsityConfig.load(tmp_path / "run" / "config.yaml") == result.config


@pytest.mark.parametrize("calib, error", [
    (torch.empty(0, 1, 12, 12), CalibrationError),
    ([], CalibrationError),
    (torch.randn(4, 3, 12, 12), CalibrationError),  # wrong number of channels
    (torch.randn(4, 12, 12), CalibrationError),  # missing channel dimension
    ("images/", CalibrationError),
])
def test_bad_calibration_data(tiny_cnn, calib, error):
    with pytest.raises(error):
        ptsparse.sparsify(tiny_cnn, calib, method="magnitude", sparsity=0.5, progress=False)


@pytest.mark.parametrize("overrides, error", [
    ({"sparsity": 1.0}, ConfigError),
    ({"sparsity": -0.1}, ConfigError),
    ({"pattern": "4:2"}, ConfigError),
    ({"method": "nope"}, UnknownOptionError),
    ({"allocation": "nope"}, UnknownOptionError),
    ({"pattern": "blocky"}, ConfigError),
    ({"include": ["does.not.exist"]}, UnknownOptionError),
    ({"layer_types": ["LSTM"]}, UnknownOptionError),
    ({"sparsity": 0.9, "max_sparsity": 0.5}, ConfigError),
    ({"spartisy": 0.9}, ConfigError),
])
def test_bad_configuration(tiny_cnn, calib_images, overrides, error):
    with pytest.raises(error) as info:
        ptsparse.sparsify(tiny_cnn, calib_images, progress=False, **overrides)
    assert "\n" not in str(info.value)


def test_model_with_nothing_to_prune(calib_images):
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ModelError, match="nothing to prune"):
        ptsparse.sparsify(model, calib_images, method="magnitude", progress=False)


def test_distilling_runs_report_the_same_masks_before_recovery(tiny_cnn, calib_images):
    from torch.utils.data import TensorDataset

    labels = tiny_cnn(calib_images).argmax(1).detach()  # the dense model is right on every sample
    eval_data = TensorDataset(calib_images, labels)
    distilled = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude_kd", sparsity=0.8, distill_iterations=30,
                                  batch_size=16, eval_data=eval_data, progress=False)
    one_shot = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.8, eval_data=eval_data,
                                 progress=False)
    assert distilled.report["one_shot_accuracy"] == one_shot.report["sparse_accuracy"]  # ERK magnitude, BN re-estimated
    assert one_shot.report["one_shot_accuracy"] is None
    assert "one-shot masks before recovery" in format_table(distilled.report)
    assert "--distill-iterations (this run: 30 steps)" in more_time_hint(distilled.report)
    assert more_time_hint(one_shot.report) is None
