"""Target discovery (types, globs, errors), masks as parametrizations, baking, and zero counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ptsparse.errors import ConfigError, ModelError, UnknownOptionError
from ptsparse.masking import WeightMask, attach_masks, bake, mask_of, masks_of
from ptsparse.targets import Target, count_zeros, find_targets


class Zoo(nn.Module):
    """One of each prunable layer type, plus layers that are never targets."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)          # has a weight, not a target type
        self.seq = nn.Conv1d(8, 8, 3)
        self.conv = nn.Conv2d(4, 8, 3)
        self.grouped = nn.Conv2d(8, 16, 3, groups=4)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.vol = nn.Conv3d(2, 4, (1, 3, 3))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 5))


ALL = ["seq", "conv", "grouped", "dw", "vol", "head.1"]


@pytest.fixture
def zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo()


def names(targets: list[Target]) -> list[str]:
    return [t.name for t in targets]


# find_targets ---------------------------------------------------------------------------------------

def test_finds_every_prunable_type_in_module_order(zoo):
    targets = find_targets(zoo)
    assert names(targets) == ALL
    assert all(t.module is zoo.get_submodule(t.name) for t in targets)
    assert [type(t.module) for t in targets] == [nn.Conv1d, nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Conv3d, nn.Linear]


def test_target_shapes_and_fan_in(zoo):
    by_name = {t.name: t for t in find_targets(zoo)}
    assert by_name["grouped"].shape == (16, 2, 3, 3) and by_name["grouped"].fan_in == 18
    assert by_name["dw"].shape == (16, 1, 3, 3) and by_name["dw"].fan_in == 9
    assert by_name["vol"].numel == 4 * 2 * 9 and by_name["vol"].fan_in == 18
    assert by_name["head.1"].fan_in == 16 and by_name["head.1"].numel == 80
    assert by_name["seq"].fan_in == 24


@pytest.mark.parametrize("types, expected", [
    (["Conv2d"], ["conv", "grouped", "dw"]),
    (["Linear"], ["head.1"]),
    (["Conv1d", "Conv3d"], ["seq", "vol"]),
    ("Linear Conv1d Conv2d Conv3d".split(), ALL),
])
def test_layer_types_filter(zoo, types, expected):
    assert names(find_targets(zoo, layer_types=types)) == expected


def test_include_and_exclude_globs(zoo):
    assert names(find_targets(zoo, include=["conv", "grouped"])) == ["conv", "grouped"]
    assert names(find_targets(zoo, include=["head.*"])) == ["head.1"]
    assert names(find_targets(zoo, exclude=["dw", "head.*"])) == ["seq", "conv", "grouped", "vol"]
    assert names(find_targets(zoo, layer_types=["Conv2d"], include=["*"], exclude=["d?"])) == ["conv", "grouped"]


def test_globs_are_case_sensitive_and_anchored(zoo):
    with pytest.raises(UnknownOptionError):
        find_targets(zoo, include=["CONV"])
    with pytest.raises(UnknownOptionError):
        find_targets(zoo, include=["onv"])


@pytest.mark.parametrize("kwargs, bad", [
    ({"include": ["does.not.exist"]}, "does.not.exist"),
    ({"exclude": ["fc*"]}, "fc*"),
    ({"include": ["conv", "typo"]}, "typo"),
    ({"layer_types": ["Linear"], "include": ["conv"]}, "conv"),  # exists, but not of the chosen type
])
def test_glob_matching_nothing_raises(zoo, kwargs, bad):
    with pytest.raises(UnknownOptionError) as info:
        find_targets(zoo, **kwargs)
    message = str(info.value)
    assert repr(bad) in message
    assert "seq" in message or "head.1" in message  # lists the layers that exist
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("bad", ["Conv4d", "LSTM", "linear"])
def test_unknown_layer_type_raises(zoo, bad):
    with pytest.raises(UnknownOptionError, match=repr(bad)):
        find_targets(zoo, layer_types=["Conv2d", bad])


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Flatten(), nn.ReLU()),
    nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4), nn.Embedding(3, 4)),
])
def test_model_without_prunable_layers_raises_model_error(model):
    with pytest.raises(ModelError, match="nothing to prune"):
        find_targets(model)


def test_no_layer_of_the_chosen_types_raises_model_error():
    with pytest.raises(ModelError):
        find_targets(nn.Sequential(nn.Linear(3, 3)), layer_types=["Conv3d"])


def test_excluding_every_layer_raises_model_error(zoo):
    with pytest.raises(ModelError, match="nothing to prune"):
        find_targets(zoo, include=["conv"], exclude=["conv"])


# masks ----------------------------------------------------------------------------------------------

def random_mask(shape, density: float = 0.5, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def test_attached_mask_makes_linear_compute_with_masked_weight():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    dense = layer.weight.detach().clone()
    mask = random_mask((4, 6))
    [target] = find_targets(nn.Sequential(layer))
    attach_masks([target], {target.name: mask})
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), F.linear(x, dense * mask, layer.bias))
    assert torch.equal(layer.weight, dense * mask)
    assert torch.equal(layer.parametrizations.weight.original, dense)  # stored weight untouched
    assert torch.equal(mask_of(layer), mask)


def test_gradients_reach_stored_weight_and_vanish_where_masked():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, groups=1)
    dense = layer.weight.detach().clone()
    mask = random_mask(layer.weight.shape, seed=1)
    [target] = find_targets(nn.Sequential(layer))
    attach_masks([target], {target.name: mask})
    x = torch.randn(2, 3, 5, 5)
    layer(x).square().sum().backward()

    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and grad.shape == dense.shape
    assert torch.all(grad[~mask] == 0)
    effective = (dense * mask).requires_grad_()
    F.conv2d(x, effective, layer.bias).square().sum().backward()
    assert torch.allclose(grad, effective.grad * mask, atol=1e-6)
    assert grad[mask].abs().sum() > 0


def test_masked_training_step_keeps_masked_entries_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5))
    [target] = find_targets(model)
    mask = random_mask((5, 5), seed=2)
    attach_masks([target], {"0": mask})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    optimizer.step()
    assert torch.all(model[0].weight[~mask] == 0)


def test_attach_masks_rejects_missing_or_misshapen_masks(zoo):
    targets = find_targets(zoo, include=["conv"])
    with pytest.raises(ValueError, match="conv"):
        attach_masks(targets, {})
    with pytest.raises(ValueError, match="conv"):
        attach_masks(targets, {"conv": torch.ones(8, 4, 3, 2, dtype=torch.bool)})
    assert not parametrize.is_parametrized(zoo.conv)


def test_attach_converts_mask_to_bool():
    layer = nn.Linear(2, 2)
    [target] = find_targets(nn.Sequential(layer))
    attach_masks([target], {"0": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
    assert mask_of(layer).dtype == torch.bool
    assert isinstance(layer.parametrizations.weight[0], WeightMask)


def test_masks_of_returns_copies_and_falls_back_to_nonzero_pattern(zoo):
    targets = find_targets(zoo, include=["conv", "head.1"])
    mask = random_mask(zoo.conv.weight.shape)
    attach_masks(targets[:1], {"conv": mask})
    with torch.no_grad():
        zoo.head[1].weight[0, :3] = 0
    masks = masks_of(targets)
    assert torch.equal(masks["conv"], mask)
    assert masks["head.1"].dtype == torch.bool
    assert torch.equal(masks["head.1"], zoo.head[1].weight != 0)
    masks["conv"].fill_(False)
    assert torch.equal(mask_of(zoo.conv), mask)
    assert mask_of(zoo.head[1]) is None


def test_bake_leaves_plain_parameters_with_exact_zeros(zoo):
    targets = find_targets(zoo)
    dense = {t.name: t.weight.detach().clone() for t in targets}
    masks = {t.name: random_mask(t.shape, seed=i) for i, t in enumerate(targets)}
    attach_masks(targets, masks)
    bake(zoo)
    for target in targets:
        module = target.module
        assert not parametrize.is_parametrized(module)
        assert not hasattr(module, "parametrizations")
        assert type(module.weight) is nn.Parameter and module.weight.requires_grad
        assert torch.equal(module.weight, dense[target.name] * masks[target.name])
        assert torch.all(module.weight[~masks[target.name]] == 0)
        assert mask_of(module) is None
    assert all("parametrizations" not in key for key in zoo.state_dict())
    assert "conv.weight" in zoo.state_dict()


def test_bake_is_a_no_op_without_masks(zoo):
    targets = find_targets(zoo)
    before = {t.name: t.weight.detach().clone() for t in targets}
    bake(zoo)
    assert all(torch.equal(t.weight, before[t.name]) for t in targets)


# count_zeros ----------------------------------------------------------------------------------------

def test_count_zeros_is_exact_over_weights_only(zoo):
    targets = find_targets(zoo)
    total = sum(t.weight.numel() for t in targets)
    with torch.no_grad():
        for t in targets:
            t.weight.copy_(torch.rand_like(t.weight) + 0.1)  # no zeros
        zoo.conv.weight[0, 0] = 0          # 9 zeros
        zoo.head[1].weight[2, 5] = 0       # 1 zero
        zoo.conv.bias.zero_()              # biases are not counted
        zoo.embed.weight.zero_()           # nor non-target layers
    assert count_zeros(targets) == (10, total)


def test_count_zeros_sees_attached_masks(zoo):
    targets = find_targets(zoo, include=["grouped", "head.1"])
    with torch.no_grad():
        for t in targets:
            t.weight.copy_(torch.rand_like(t.weight) + 0.1)
        zoo.grouped.weight[0, 0, 0, 0] = 0
    mask = torch.ones(zoo.head[1].weight.shape, dtype=torch.bool)
    mask[:, :7] = False  # 35 masked
    attach_masks(targets[1:], {"head.1": mask})
    assert count_zeros(targets) == (36, 16 * 2 * 9 + 80)
    assert count_zeros([targets[1]]) == (35, 80)
    assert count_zeros([]) == (0, 0)
