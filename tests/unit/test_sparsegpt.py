"""SparseGPT (``baselines.md`` §8) and the ``hessian`` statistic: exact counts, N:M layout, error below magnitude."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptsparse
from ptsparse.data import as_calibration
from ptsparse.recovery import recalibrate_batchnorm
from ptsparse.criteria import CRITERIA, SparseGPT, gather_statistics
from ptsparse.criteria.sparsegpt import inverse_factor
from ptsparse.data import as_calibration
from ptsparse.errors import CalibrationError, IncompatibleOptionsError
from ptsparse.patterns import NM, Channel, Unstructured
from ptsparse.targets import Target, find_targets


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def seeded(layer: nn.Module, seed: int = 0) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(randn(*layer.weight.shape, seed=seed))
    return layer.eval()


def correlated(*shape: int, dim: int = -1, seed: int = 1) -> torch.Tensor:
    """Random inputs whose features along ``dim`` are strongly correlated."""
    x = randn(*shape, seed=seed)
    mixing = randn(shape[dim], shape[dim], seed=seed + 1) + 2.0 * torch.eye(shape[dim])
    return (x.movedim(dim, -1) @ mixing).movedim(-1, dim)


def rows_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input vectors ``(rows, groups, c)`` by hand: rows of a Linear input, F.unfold patches of a Conv2d."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, layer.in_features)
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, layer.groups, layer.weight[0].numel())


def output_error(layer: nn.Module, x: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
    """``||(W - W_new) X||_F^2`` over every input vector of the layer."""
    rows = rows_of(layer, x).double()
    delta = (before - after).double().reshape(rows.shape[1], -1, rows.shape[2])
    return float(torch.einsum("ngc,grc->ngr", rows, delta).square().sum())


def hessian_stats(layer: nn.Module, x: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    return gather_statistics(layer, Target("layer", layer), as_calibration(x), ["hessian"], batch_size)


def prune(layer: nn.Module, x: torch.Tensor, count: int, pattern=Unstructured(), **settings):
    """Runs SparseGPT on ``layer``; returns (criterion, mask, weight before, weight after)."""
    stats = hessian_stats(layer, x)
    before = layer.weight.detach().clone()
    criterion = SparseGPT(**settings)
    mask = criterion.prune_layer(Target("layer", layer), stats, count, pattern)
    return criterion, mask, before, layer.weight.detach().clone()


LAYERS = {
    "linear": (lambda: seeded(nn.Linear(24, 10)), lambda: correlated(30, 4, 24)),
    "conv_stride2": (lambda: seeded(nn.Conv2d(8, 6, 3, stride=2, padding=1)), lambda: correlated(10, 8, 9, 9, dim=1)),
    "grouped": (lambda: seeded(nn.Conv2d(8, 6, 3, padding=1, groups=2)), lambda: correlated(10, 8, 7, 7, dim=1)),
}


# the hessian statistic -------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), randn(12, 4, 9, 11, seed=1)),
    (nn.Linear(7, 3), randn(10, 4, 7, seed=1)),
])
def test_hessian_is_twice_the_mean_outer_product(layer, x):
    stats = hessian_stats(seeded(layer), x, batch_size=5)  # batches of 5, 5 and 2 samples
    rows = rows_of(layer, x).transpose(0, 1)  # (groups, n, c)
    expected = 2 * rows.transpose(1, 2) @ rows / rows.shape[1]
    assert stats["hessian"].dtype == torch.float32 and stats["hessian"].shape == expected.shape
    assert torch.allclose(stats["hessian"], expected, rtol=1e-4, atol=1e-5)
    assert int(stats["hessian_count"]) == rows.shape[1]


def test_hessian_of_conv1d_matches_unfold_with_height_one():
    conv = seeded(nn.Conv1d(3, 5, 4, stride=2, padding=2, dilation=2))
    x = randn(6, 3, 17, seed=1)
    patches = F.unfold(x.unsqueeze(2), (1, 4), dilation=(1, 2), padding=(0, 2), stride=(1, 2))
    rows = patches.transpose(1, 2).reshape(-1, 12)
    stats = hessian_stats(conv, x, batch_size=4)
    assert torch.allclose(stats["hessian"][0], 2 * rows.T @ rows / len(rows), rtol=1e-4, atol=1e-5)


# the layer step ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4)], ids=["unstructured", "2:4"])
def test_error_below_magnitude_and_recorded(name, pattern):
    make_layer, make_inputs = LAYERS[name]
    layer, x = make_layer(), make_inputs()
    count = pattern.prune_count(layer.weight.shape) if isinstance(pattern, NM) else layer.weight.numel() // 2 + 1
    criterion, mask, before, after = prune(layer, x, count, pattern, blocksize=16)
    magnitude = before * pattern.mask(before.abs(), count)
    sparsegpt_error = output_error(layer, x, before, after)
    assert sparsegpt_error < 0.9 * output_error(layer, x, before, magnitude)
    assert criterion.errors["layer"] == pytest.approx(sparsegpt_error, rel=1e-4)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_unstructured_prunes_exactly_count_with_exact_zeros(name, fraction):
    make_layer, make_inputs = LAYERS[name]
    layer, x = make_layer(), make_inputs()
    count = round(fraction * layer.weight.numel()) - (1 if 0 < fraction < 1 else 0)
    _, mask, before, after = prune(layer, x, count, blocksize=8)
    assert mask.shape == before.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == count
    assert (after[~mask] == 0).all()
    assert int((after == 0).sum()) == count
    if count == 0:
        assert torch.equal(after, before)


def test_two_four_keeps_two_of_every_four_input_channels_at_each_kernel_position():
    layer, x = seeded(nn.Conv2d(16, 6, 3, padding=1, groups=2)), correlated(10, 16, 6, 6, dim=1)
    _, mask, _, after = prune(layer, x, NM(2, 4).prune_count(layer.weight.shape), NM(2, 4), blocksize=16)
    for out in range(6):
        for kh in range(3):
            for kw in range(3):
                for start in range(0, 8, 4):
                    assert int(mask[out, start:start + 4, kh, kw].sum()) == 2
                    assert int((after[out, start:start + 4, kh, kw] != 0).sum()) == 2
    assert (after[~mask] == 0).all()
    assert int((~mask).sum()) == 6 * 8 * 9 // 2


def test_nm_pad_fallback_and_ineligible_layers():
    layer, x = seeded(nn.Conv2d(6, 4, 3)), correlated(8, 6, 6, 6, dim=1)
    pattern = NM(2, 4, fallback="pad")  # per position: a group of 4 (keeps 2) and a partial one of 2 (keeps 2)
    _, mask, _, after = prune(layer, x, pattern.prune_count(layer.weight.shape), pattern)
    assert (mask[:, :4].sum(1) == 2).all() and mask[:, 4:].all()
    assert (after[~mask] == 0).all()
    layer = seeded(nn.Conv2d(6, 4, 3))
    criterion, mask, before, after = prune(layer, x, 0, NM(2, 4))  # skip: 6 channels are no multiple of 4
    assert mask.all() and torch.equal(after, before) and criterion.errors["layer"] == 0.0
    with pytest.raises(ValueError, match="N:M prunes 144"):
        prune(seeded(nn.Conv2d(8, 4, 3)), correlated(8, 8, 6, 6, dim=1), 143, NM(2, 4))


def test_first_column_update_is_the_least_squares_optimum():
    # Pruning column 0 of a single row: the sweep's update there is full OBS, i.e. the optimal refit.
    layer = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-3, 1.0, -0.8, 0.6, 1.2, -0.9]]))
    x = correlated(200, 6)
    _, mask, before, after = prune(layer, x, 1, dampening=1e-9)
    assert mask.tolist() == [[False] + [True] * 5]
    target = x.double() @ before.double().T
    refit = torch.linalg.lstsq(x[:, 1:].double(), target).solution.T
    assert torch.allclose(after[:, 1:].double(), refit, rtol=1e-3, atol=1e-5)


def test_dead_inputs_get_zero_weights_and_no_nans():
    layer = seeded(nn.Linear(8, 4))
    x = correlated(40, 8)
    x[:, [2, 5]] = 0
    _, mask, _, after = prune(layer, x, 16)
    assert torch.isfinite(after).all()
    assert (after[:, [2, 5]] == 0).all() and not mask[:, [2, 5]].any()  # ranked lowest: pruned first
    assert int((~mask).sum()) == 16


def test_dampening_is_raised_until_the_factorisation_succeeds():
    indefinite = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]])  # eigenvalues -1 and 3
    factor = inverse_factor(indefinite)
    assert torch.isfinite(factor).all()
    assert torch.allclose(factor[1], torch.linalg.cholesky(torch.linalg.inv(
        indefinite[1] + 0.025 * torch.eye(2)), upper=True))  # the healthy group keeps 0.01 x mean(diag)
    with pytest.raises(CalibrationError, match="layer: .*non-finite"):
        SparseGPT().prune_layer(Target("layer", nn.Linear(2, 3)),
                                {"hessian": torch.full((1, 2, 2), float("nan")), "hessian_count": torch.tensor(4)},
                                2, Unstructured())


def test_channel_pattern_is_refused():
    with pytest.raises(IncompatibleOptionsError, match="sparsegpt does not support pattern 'channel'"):
        SparseGPT().prune_layer(Target("fc", nn.Linear(4, 4)), {}, 4, Channel())
    with pytest.raises(IncompatibleOptionsError, match="'sparsegpt' does not support pattern 'channel'"):
        ptsparse.SparsityConfig(method="magnitude", criterion="sparsegpt", pattern="channel")  # refused before any work
    assert CRITERIA.get("sparsegpt") is SparseGPT


def test_same_inputs_same_result():
    results = [prune(*[make() for make in LAYERS["grouped"]], 150, blocksize=8) for _ in range(2)]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][3], results[1][3])


# end to end ---------------------------------------------------------------------------------------------

def output_mse(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).square().mean())


@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_sparsify_with_sparsegpt_is_exact_and_beats_magnitude(tiny_cnn, tiny_mlp, calib_images, which):
    model, x = (tiny_cnn, calib_images) if which == "cnn" else (tiny_mlp, correlated(128, 64).view(128, 1, 8, 8))
    dense = copy.deepcopy(model)
    recalibrate_batchnorm(dense, as_calibration(x))  # a dense model whose BatchNorm statistics fit x
    runs = {criterion: ptsparse.sparsify(dense, x, method="magnitude", criterion=criterion, allocation="uniform",
                                         sparsity=0.5, progress=False)
            for criterion in ("sparsegpt", "magnitude")}
    result = runs["sparsegpt"]
    targets = find_targets(result.model)
    total = sum(t.numel for t in targets)
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(0.5 * total)
    assert sum(int((t.weight == 0).sum()) for t in targets) == round(0.5 * total)
    assert output_mse(result.model, dense, x) < 0.9 * output_mse(runs["magnitude"].model, dense, x)


def test_sparsify_with_sparsegpt_two_four(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", criterion="sparsegpt", pattern="2:4",
                               progress=False)
    for name in ("grouped", "pointwise", "fc"):
        weight = getattr(result.model, name).weight.detach()
        assert ((weight.movedim(1, -1).reshape(-1, 4) != 0).sum(1) == 2).all(), name
    assert (result.model.depthwise.weight != 0).all()


def test_more_dead_inputs_than_the_prune_count_add_no_zeros():
    layer = seeded(nn.Linear(8, 4))
    x = correlated(40, 8)
    x[:, [1, 2, 5, 6]] = 0  # 16 dead weights, 8 to prune
    _, mask, before, after = prune(layer, x, 8)
    assert int((~mask).sum()) == 8 and int((after == 0).sum()) == 8
    kept_dead = mask[:, [1, 2, 5, 6]]
    assert torch.equal(after[:, [1, 2, 5, 6]][kept_dead], before[:, [1, 2, 5, 6]][kept_dead])
