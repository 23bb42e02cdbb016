"""Channel masks: a pruned output channel's bias and BatchNorm are masked with its filter, by every criterion,
through recovery, so channel removal drops every pruned channel."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import ptsparse
from ptsparse.masking import WeightMask, attach_channel_masks, attach_masks, bake, weight_mask
from ptsparse.targets import find_targets

CONVS = {"conv1": "bn1", "conv2": "bn2", "conv3": None}  # layer -> the BatchNorm after it


class BiasedCNN(nn.Module):
    """Convolutions with biases, two followed by a BatchNorm with non-trivial affine parameters and statistics;
    no coupled channels, so every pruned channel can be removed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for norm in (self.bn1, self.bn2):
                norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(norm.num_features, generator=generator))
                norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
                norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.silu(self.bn2(self.conv2(x)))  # no ReLU: a zero bias still gets gradient
        return self.fc(self.conv3(x).mean((2, 3)))


@pytest.fixture
def biased_cnn() -> nn.Module:
    torch.manual_seed(0)
    return BiasedCNN().eval()


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def kept_channels(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().flatten(1).ne(0).any(1)


def assert_pruned_channels_silent(model: nn.Module) -> None:
    """Every pruned channel (some in each conv) has its filter, bias and BatchNorm affine parameters exactly 0."""
    for conv, norm in CONVS.items():
        pruned = ~kept_channels(model, conv)
        assert 0 < int(pruned.sum()) < len(pruned), conv
        assert not model.get_submodule(conv).bias[pruned].any(), conv
        if norm is not None:
            bn = model.get_submodule(norm)
            assert not bn.weight[pruned].any() and not bn.bias[pruned].any(), norm


def assert_every_pruned_channel_removed(model: nn.Module, inputs: torch.Tensor) -> None:
    pytest.importorskip("torch_pruning")
    from ptsparse.export.channels import remove_channels

    smaller, report = remove_channels(model, inputs[:4])
    for conv in CONVS:
        assert smaller.get_submodule(conv).out_channels == int(kept_channels(model, conv).sum()), conv
    assert report["zeroed_channels_kept"] == 0
    assert torch.allclose(smaller(inputs), model(inputs), rtol=1e-4, atol=1e-5)


def sparsify(model: nn.Module, inputs: torch.Tensor, criterion: str, **overrides) -> nn.Module:
    if criterion == "taylor":
        pytest.importorskip("torch_pruning")
    options = dict(method="magnitude", pattern="channel", allocation="uniform", sparsity=0.5, batch_size=16,
                   progress=False)
    return ptsparse.sparsify(model, inputs, criterion=criterion, **{**options, **overrides}).model


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_one_shot_channel_pruning_silences_and_removes_every_pruned_channel(biased_cnn, inputs, criterion):
    model = sparsify(biased_cnn, inputs, criterion)
    assert_pruned_channels_silent(model)
    assert_every_pruned_channel_removed(model, inputs)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_pruned_channels_stay_silent_through_distillation(biased_cnn, inputs, criterion):
    model = sparsify(biased_cnn, inputs, criterion, method="magnitude_kd", distill={"iterations": 6, "lr": 0.1})
    assert_pruned_channels_silent(model)
    assert_every_pruned_channel_removed(model, inputs)


def test_pruned_channels_stay_silent_through_layerwise_reconstruction(biased_cnn, inputs):
    model = sparsify(biased_cnn, inputs, "magnitude", recovery="layerwise", layerwise={"iterations": 4})
    assert_pruned_channels_silent(model)
    assert_every_pruned_channel_removed(model, inputs)


def test_unstructured_and_n_m_masks_leave_biases_and_norms_alone(biased_cnn, inputs):
    for pattern in ("unstructured", "2:4"):
        model = sparsify(biased_cnn, inputs, "magnitude", pattern=pattern)
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                assert torch.equal(module.weight, biased_cnn.get_submodule(name).weight), (pattern, name)
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                assert torch.equal(module.bias, biased_cnn.get_submodule(name).bias), (pattern, name)


def test_channel_masks_follow_the_weight_mask_and_bake_to_plain_zeros(biased_cnn):
    target = find_targets(biased_cnn, include=["conv1"])[0]
    mask = torch.ones(target.shape, dtype=torch.bool)
    mask[[1, 5]] = False
    attach_masks([target], {"conv1": mask})
    attach_channel_masks(target, biased_cnn.bn1)
    attach_channel_masks(target, biased_cnn.bn1)  # masked already: left as it is
    for owner, name in ((biased_cnn.conv1, "bias"), (biased_cnn.bn1, "weight"), (biased_cnn.bn1, "bias")):
        assert len(getattr(owner.parametrizations, name)) == 1
        assert isinstance(weight_mask(owner, name), WeightMask)
        assert weight_mask(owner, name).mask.tolist() == [i not in (1, 5) for i in range(8)]
    stored = biased_cnn.bn1.parametrizations.bias.original.detach().clone()
    bake(biased_cnn)
    assert not any(parametrize.is_parametrized(m) for m in biased_cnn.modules())
    assert type(biased_cnn.bn1.bias) is nn.Parameter
    pruned = biased_cnn.bn1.bias[[1, 5]]
    assert not pruned.any() and not pruned.signbit().any()  # +0.0, not -0.0
    assert torch.equal(biased_cnn.bn1.bias[[0, 2, 3, 4, 6, 7]], stored[[0, 2, 3, 4, 6, 7]])


def test_channels_regrown_by_iee_get_their_bias_and_norm_back(biased_cnn, inputs, monkeypatch):
    from ptsparse.recovery.iee import ExploitExplore

    runs = []
    on_end = ExploitExplore.on_end
    monkeypatch.setattr(ExploitExplore, "on_end", lambda self, state: (runs.append(self), on_end(self, state))[1])
    model = sparsify(biased_cnn, inputs, "magnitude", method="iee", distill={"iterations": 13}, iee_exploit_steps=2,
                     iee_improve_steps=2, iee_explore_steps=2, iee_alpha=0.5, iee_end=1.0)
    assert_pruned_channels_silent(model)
    assert_every_pruned_channel_removed(model, inputs)
    dynamics = runs[0]
    regrown = {conv: torch.stack([grown[conv] for grown in dynamics.grown]).any(0) & dynamics.units.active[conv]
               for conv in CONVS}  # pruned at some point, then grown back and kept to the end
    assert any(rows.any() for rows in regrown.values())
    for conv, norm in CONVS.items():
        rows = regrown[conv]
        assert model.get_submodule(conv).bias[rows].all(), conv
        if norm is not None:
            assert model.get_submodule(norm).weight[rows].all(), norm
