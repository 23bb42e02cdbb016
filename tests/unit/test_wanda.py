"""Wanda (``baselines.md`` §7) and the ``input_norms`` statistic, checked against hand-unfolded inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptsparse
from ptsparse.criteria import CRITERIA, Magnitude, Wanda, gather_statistics
from ptsparse.criteria.statistics import input_vectors
from ptsparse.data import as_calibration
from ptsparse.errors import ConfigError
from ptsparse.patterns import NM, Channel, Unstructured
from ptsparse.targets import Target, find_targets


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def seeded(layer: nn.Module, seed: int = 0) -> nn.Module:
    """``layer`` with weights drawn from ``seed`` (no global RNG)."""
    with torch.no_grad():
        layer.weight.copy_(randn(*layer.weight.shape, seed=seed))
    return layer.eval()


def unfolded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input vectors ``(rows, groups, c)`` of a zero-padded Conv2d, by F.unfold."""
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return patches.transpose(1, 2).reshape(-1, conv.groups, conv.weight[0].numel())


def statistics(layer: nn.Module, x: torch.Tensor, batch_size: int = 5) -> dict[str, torch.Tensor]:
    return gather_statistics(layer, Target("layer", layer), as_calibration(x), ["input_norms"], batch_size)


# the input_norms statistic ----------------------------------------------------------------------------

def test_input_norms_of_strided_dilated_grouped_conv2d_match_unfold():
    conv = seeded(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2))
    x = randn(12, 4, 9, 11, seed=1)
    stats = statistics(conv, x)  # batches of 5, 5 and 2 samples
    rows = unfolded(conv, x)
    assert stats["input_sq_norms"].shape == (2, 18)
    assert torch.allclose(stats["input_sq_norms"], rows.square().sum(0), rtol=1e-5)
    assert int(stats["input_count"]) == len(rows) == 12 * 4 * 5


def test_input_norms_of_linear_with_3d_inputs():
    linear = seeded(nn.Linear(7, 3))
    x = randn(10, 4, 7, seed=1)
    stats = statistics(linear, x)
    assert torch.allclose(stats["input_sq_norms"], x.reshape(-1, 7).square().sum(0, keepdim=True), rtol=1e-5)
    assert int(stats["input_count"]) == 40


def test_input_norms_of_conv1d_match_unfold_with_height_one():
    conv = seeded(nn.Conv1d(3, 5, 4, stride=2, padding=2, dilation=2))
    x = randn(6, 3, 17, seed=1)
    stats = statistics(conv, x)
    patches = F.unfold(x.unsqueeze(2), (1, 4), dilation=(1, 2), padding=(0, 2), stride=(1, 2))
    rows = patches.transpose(1, 2).reshape(-1, 12)
    assert torch.allclose(stats["input_sq_norms"], rows.square().sum(0, keepdim=True), rtol=1e-5)
    assert int(stats["input_count"]) == len(rows)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_input_norms_pad_same_in_the_layers_padding_mode(mode):
    conv = seeded(nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode=mode))
    x = randn(4, 2, 6, 7, seed=1)
    padded = F.pad(x, (1, 1, 0, 1), mode=mode)  # "same" with an even kernel puts the extra row last
    rows = F.unfold(padded, (2, 3)).transpose(1, 2).reshape(-1, 12)
    outputs = (conv(x) - conv.bias.view(1, 3, 1, 1)).permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(rows @ conv.weight.detach().reshape(3, 12).T, outputs, atol=1e-5)
    assert torch.allclose(statistics(conv, x)["input_sq_norms"], rows.square().sum(0, keepdim=True), rtol=1e-5)


def test_input_vectors_reproduce_conv3d_outputs():
    conv = seeded(nn.Conv3d(4, 6, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), groups=2, bias=False))
    x = randn(2, 4, 5, 7, 6, seed=1)
    rows = input_vectors(conv, x)  # (rows, groups, c)
    outputs = torch.einsum("ngc,grc->ngr", rows, conv.weight.reshape(2, 3, 36)).reshape(len(rows), 6)
    expected = conv(x).permute(0, 2, 3, 4, 1).reshape(-1, 6)
    assert torch.allclose(outputs, expected, atol=1e-5)
    assert torch.allclose(statistics(conv, x)["input_sq_norms"], rows.square().sum(0), rtol=1e-5)


def test_unknown_layer_type_is_a_config_error_naming_the_layer():
    model = nn.Sequential(nn.Embedding(4, 3))
    target = Target("0", model[0])
    with pytest.raises(ConfigError, match="layer 0: .*Embedding"):
        gather_statistics(model, target, as_calibration(torch.zeros(2, 1, dtype=torch.long)), ["input_norms"])


# scores ------------------------------------------------------------------------------------------------

def test_score_is_weight_magnitude_times_input_norm_for_a_grouped_conv():
    conv = seeded(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2))
    x = randn(12, 4, 9, 11, seed=1)
    target = Target("conv", conv)
    scores = Wanda(batch_size=5).scores(conv, [target], as_calibration(x))["conv"]
    norms = unfolded(conv, x).square().sum(0).sqrt()  # (groups, c)
    expected = torch.empty(6, 18)
    for row in range(6):  # rows 0-2 read group 0's inputs, rows 3-5 group 1's
        expected[row] = conv.weight[row].detach().flatten().abs() * norms[row // 3]
    assert scores.shape == conv.weight.shape
    assert torch.allclose(scores.flatten(1), expected, rtol=1e-5)
    stats = statistics(conv, x)
    mask = Wanda().prune_layer(target, stats, 40, Unstructured())
    assert torch.equal(mask, Wanda(compare="row").prune_layer(target, stats, 40, Unstructured()))


def equal_norm_inputs(samples: int, features: int) -> torch.Tensor:
    """Random signs: every input column has squared norm ``samples`` exactly."""
    return torch.randint(0, 2, (samples, features), generator=torch.Generator().manual_seed(1)).float() * 2 - 1


def per_row_magnitude(weight: torch.Tensor, per_row: list[int]) -> torch.Tensor:
    keep = torch.ones_like(weight, dtype=torch.bool)
    for row, count in enumerate(per_row):
        keep[row, torch.argsort(weight[row].abs(), stable=True)[:count]] = False
    return keep


def test_equal_input_norms_give_magnitude_per_layer_and_per_row():
    linear = seeded(nn.Linear(12, 5))
    target = Target("fc", linear)
    stats = statistics(linear, equal_norm_inputs(32, 12))
    assert torch.equal(stats["input_sq_norms"], torch.full((1, 12), 32.0))
    magnitude = Magnitude().prune_layer(target, {}, 23, Unstructured())
    assert torch.equal(Wanda(compare="layer").prune_layer(target, stats, 23, Unstructured()), magnitude)
    by_row = Wanda(compare="row").prune_layer(target, stats, 23, Unstructured())
    assert torch.equal(by_row, per_row_magnitude(linear.weight.detach(), [5, 5, 5, 4, 4]))


@pytest.mark.parametrize("count", [0, 1, 23, 30, 59, 60])
def test_row_comparison_prunes_floor_or_ceil_per_row_and_exact_total(count):
    linear = seeded(nn.Linear(12, 5))
    x = randn(40, 12, seed=1) * torch.linspace(0.1, 3.0, 12)  # unequal column norms
    stats = statistics(linear, x)
    mask = Wanda().prune_layer(Target("fc", linear), stats, count, Unstructured())
    per_row = (~mask).sum(1).tolist()
    assert sum(per_row) == count
    assert per_row == [count // 5 + (1 if row < count % 5 else 0) for row in range(5)]
    scores = linear.weight.detach().abs() * stats["input_sq_norms"].sqrt()
    for row in range(5):  # the pruned weights of a row are its lowest scores
        assert set((~mask[row]).nonzero().flatten().tolist()) == set(
            torch.argsort(scores[row])[: per_row[row]].tolist())


def test_nm_and_channel_masks_come_from_the_pattern():
    conv = seeded(nn.Conv2d(8, 4, 3, padding=1))
    x = randn(6, 8, 5, 5, seed=1)
    stats = statistics(conv, x)
    target = Target("conv", conv)
    scores = conv.weight.detach().abs() * stats["input_sq_norms"].sqrt().view(1, 8, 3, 3)
    assert torch.equal(Wanda().prune_layer(target, stats, 144, NM(2, 4)), NM(2, 4).mask(scores))
    assert torch.equal(Wanda().prune_layer(target, stats, 144, Channel()), Channel().mask(scores, 144))


def test_compare_must_be_row_or_layer():
    with pytest.raises(ConfigError, match="wanda_compare 'column'"):
        Wanda(compare="column")
    assert CRITERIA.get("wanda") is Wanda
    assert Wanda.from_config(ptsparse.SparsityConfig(method="magnitude")).compare == "row"


# end to end ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allocation", ["erk", "global"])
def test_sparsify_with_wanda_hits_the_exact_count(tiny_cnn, calib_images, allocation):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", criterion="wanda", allocation=allocation,
                               sparsity=0.5,
                               progress=False)
    total = sum(t.numel for t in find_targets(result.model))
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(0.5 * total)
    assert sum(int((t.weight == 0).sum()) for t in find_targets(result.model)) == round(0.5 * total)
    assert result.report["criterion"] == "wanda"


def test_statistics_passes_stop_after_the_layer_and_match_full_passes(tiny_cnn, calib_images):
    from ptsparse.criteria.statistics import gather_statistics
    from ptsparse.data import as_calibration
    from ptsparse.targets import find_targets

    stem = next(t for t in find_targets(tiny_cnn) if t.name == "stem")
    calibration = as_calibration(calib_images)
    classifier_calls = []
    handle = tiny_cnn.fc.register_forward_hook(lambda m, i, o: classifier_calls.append(len(i[0])))
    try:
        early = gather_statistics(tiny_cnn, stem, calibration, ["input_norms", "hessian"], batch_size=16)
        assert classifier_calls == [16]  # the first batch runs in full; the other two stop after the stem
        whole = gather_statistics(tiny_cnn, stem, calibration, ["input_norms", "hessian"], batch_size=48)
    finally:
        handle.remove()
    assert early["input_count"] == whole["input_count"]
    assert torch.allclose(early["input_sq_norms"], whole["input_sq_norms"], rtol=1e-5)
    assert torch.allclose(early["hessian"], whole["hessian"], rtol=1e-4, atol=1e-6)
