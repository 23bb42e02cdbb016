"""Allocations (uniform, ERK, global) and exact integer counts that meet the global target."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ptsparse.allocation import ALLOCATIONS, ERK, Global, LayerBudget, Uniform, erk_scores, exact_counts, target_count
from ptsparse.errors import ConfigError
from ptsparse.patterns import Unstructured

SHAPES = {
    "stem": (16, 1, 3, 3),      # 144, small first conv
    "conv1": (16, 16, 3, 3),    # 2,304
    "conv2": (32, 16, 3, 3),    # 4,608
    "conv3": (64, 32, 3, 3),    # 18,432
    "fc": (10, 64),             # 640, classifier
}
SPARSITIES = [0.0, 0.5, 0.9, 0.98]


def budgets(caps: dict[str, float] | None = None, channel_units: bool = False) -> list[LayerBudget]:
    caps = caps or {}
    return [LayerBudget(name, shape, caps.get(name, 1.0), math.prod(shape[1:]) if channel_units else 1)
            for name, shape in SHAPES.items()]


def magnitude_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator).abs() for name, shape in SHAPES.items()}


ALLOCATORS = {
    "uniform": Uniform(),
    "erk": ERK(1.0),
    "erk-0.5": ERK(0.5),
    "global-none": Global("none"),
    "global-l1": Global("l1"),
    "global-l2": Global("l2"),
}


def allocate(key: str, layers: list[LayerBudget], sparsity: float) -> dict[str, float]:
    return ALLOCATORS[key].allocate(layers, sparsity, magnitude_scores())


def check_exact(layers: list[LayerBudget], ratios: dict[str, float], sparsity: float) -> dict[str, int]:
    total = sum(l.numel for l in layers)
    wanted = target_count(layers, sparsity)
    assert wanted == round(sparsity * total)
    counts = exact_counts(layers, ratios, wanted)
    assert set(counts) == {l.name for l in layers}
    assert sum(counts.values()) == wanted
    for layer in layers:
        count = counts[layer.name]
        assert 0 <= count <= layer.max_prune, layer.name
        assert abs(count - ratios[layer.name] * layer.numel) <= 1 + 1e-6, layer.name
    return counts


def test_registry_lists_the_allocations():
    assert ALLOCATIONS.names() == ["erk", "fcpts", "global", "knapsack", "owl", "uniform", "unipts_search"]
    assert ALLOCATIONS.get("erk") is ERK and ALLOCATIONS.get("global") is Global
    assert ALLOCATIONS.get("uniform") is Uniform


def test_layer_budget_numel_and_max_prune():
    layer = LayerBudget("c", (16, 16, 3, 3), cap=0.5)
    assert layer.numel == 2304 and layer.max_prune == 1152
    assert LayerBudget("c", (10, 64), cap=0.0).max_prune == 0
    assert LayerBudget("c", (10, 64), cap=0.55, unit=64).max_prune == 320  # 352 rounded down to 5 rows
    assert LayerBudget("c", (3, 3), cap=1 / 3).max_prune == 3  # float error does not lose a weight


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("key", list(ALLOCATORS))
def test_counts_meet_the_target_exactly(key, sparsity):
    layers = budgets()
    ratios = allocate(key, layers, sparsity)
    assert set(ratios) == set(SHAPES)
    assert all(0.0 <= r <= 1.0 for r in ratios.values())
    counts = check_exact(layers, ratios, sparsity)
    if sparsity == 0.0:
        assert all(c == 0 for c in counts.values())


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("key", list(ALLOCATORS))
def test_caps_are_honoured_and_target_still_met(key, sparsity):
    layers = budgets({"fc": 0.0, "stem": 0.5})
    ratios = allocate(key, layers, sparsity)
    assert ratios["fc"] == 0.0
    assert ratios["stem"] <= 0.5 + 1e-9
    counts = check_exact(layers, ratios, sparsity)
    assert counts["fc"] == 0
    assert counts["stem"] <= 72


@pytest.mark.parametrize("key", list(ALLOCATORS))
def test_a_cap_of_one_half_binds_for_every_allocation(key):
    layers = budgets({"conv3": 0.5})
    ratios = allocate(key, layers, 0.6)
    counts = check_exact(layers, ratios, 0.6)
    assert counts["conv3"] <= 9216
    # conv3 is 70% of all weights; with it held at 50%, the rest must be pruned harder than 60%
    others = sum(counts[n] for n in SHAPES if n != "conv3")
    assert others >= round(0.6 * 26128) - 9216


def test_uniform_gives_every_layer_the_target():
    ratios = Uniform().allocate(budgets(), 0.7)
    assert ratios == pytest.approx({name: 0.7 for name in SHAPES}, abs=1e-9)


def test_uniform_water_fills_around_a_dense_layer():
    layers = budgets({"fc": 0.0})
    total = sum(l.numel for l in layers)
    ratios = Uniform().allocate(layers, 0.5)
    level = 0.5 * total / (total - 640)
    assert ratios["fc"] == 0.0
    assert all(ratios[n] == pytest.approx(level, abs=1e-9) for n in SHAPES if n != "fc")


def test_infeasible_caps_raise_config_error():
    layers = budgets({"fc": 0.0, "stem": 0.5, "conv3": 0.5})
    with pytest.raises(ConfigError, match="0.9"):
        target_count(layers, 0.9)
    with pytest.raises(ConfigError, match="infeasible"):
        Global().allocate(layers, 0.9, magnitude_scores())
    everything_dense = budgets({n: 0.0 for n in SHAPES})
    with pytest.raises(ConfigError):
        target_count(everything_dense, 0.1)
    assert target_count(everything_dense, 0.0) == 0


def test_target_at_the_caps_exactly_is_feasible():
    layers = budgets({n: 0.5 for n in SHAPES})
    counts = check_exact(layers, Uniform().allocate(layers, 0.5), 0.5)
    assert counts == {l.name: l.numel // 2 for l in layers}


# ERK ------------------------------------------------------------------------------------------------

def test_erk_raw_scores_include_kernel_dims():
    scores = erk_scores(budgets())
    assert scores["stem"] == pytest.approx((16 + 1 + 3 + 3) / 144)
    assert scores["fc"] == pytest.approx((10 + 64) / 640)
    assert erk_scores(budgets(), power=0.5)["conv3"] == pytest.approx(math.sqrt((64 + 32 + 6) / 18432))


@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_erk_keeps_small_layers_denser(power, sparsity):
    ratios = ERK(power).allocate(budgets(), sparsity)
    for small in ("stem", "fc"):
        for big in ("conv2", "conv3"):
            assert ratios[small] < ratios[big], (small, big)
    assert ratios["conv1"] < ratios["conv3"]


def test_erk_densities_are_proportional_to_raw_scores_when_unclipped():
    layers = budgets()
    ratios = ERK(1.0).allocate(layers, 0.98)
    raw = erk_scores(layers)
    eps = [(1 - ratios[n]) / raw[n] for n in SHAPES]
    assert max(eps) == pytest.approx(min(eps), rel=1e-6)


def test_erk_clips_layers_that_would_exceed_density_one():
    ratios = ERK(1.0).allocate(budgets(), 0.5)
    assert ratios["stem"] == 0.0  # eps * r_stem > 1: kept dense
    total = sum(math.prod(s) for s in SHAPES.values())
    assert sum(ratios[n] * math.prod(s) for n, s in SHAPES.items()) == pytest.approx(0.5 * total, abs=1e-6)


@pytest.mark.parametrize("sparsity, caps", [(s, None) for s in SPARSITIES]
                         + [(s, {"fc": 0.0, "stem": 0.5}) for s in (0.0, 0.5, 0.9)])
def test_erk_power_zero_equals_uniform(sparsity, caps):
    layers = budgets(caps)
    erk, uniform = ERK(0.0).allocate(layers, sparsity), Uniform().allocate(layers, sparsity)
    assert erk == pytest.approx(uniform, abs=1e-9)
    wanted = target_count(layers, sparsity)
    from_erk, from_uniform = exact_counts(layers, erk, wanted), exact_counts(layers, uniform, wanted)
    # Equal fractional remainders may be ordered differently by float noise: counts agree within one weight.
    assert sum(from_erk.values()) == sum(from_uniform.values()) == wanted
    assert all(abs(from_erk[n] - from_uniform[n]) <= 1 for n in SHAPES)


def test_erk_rejects_negative_power():
    with pytest.raises(ConfigError, match="-1"):
        ERK(-1.0)


# global ---------------------------------------------------------------------------------------------

def globally_lowest(scores: dict[str, torch.Tensor], names: list[str], count: int) -> set[tuple[str, int]]:
    flat = torch.cat([scores[n].flatten() for n in names])
    owners = [(n, i) for n in names for i in range(scores[n].numel())]
    return {owners[j] for j in torch.argsort(flat)[:count].tolist()}


def pruned_positions(layers, scores, counts) -> set[tuple[str, int]]:
    result = set()
    for layer in layers:
        mask = Unstructured().mask(scores[layer.name], counts[layer.name])
        result |= {(layer.name, i) for i in (~mask).flatten().nonzero().flatten().tolist()}
    return result


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.98])
def test_global_magnitude_equals_one_global_threshold(sparsity):
    layers, scores = budgets(), magnitude_scores(seed=3)
    ratios = Global("none").allocate(layers, sparsity, scores)
    counts = check_exact(layers, ratios, sparsity)
    assert all(counts[l.name] == round(ratios[l.name] * l.numel) for l in layers)  # ratios are exact shares
    wanted = target_count(layers, sparsity)
    assert pruned_positions(layers, scores, counts) == globally_lowest(scores, list(SHAPES), wanted)


@pytest.mark.parametrize("normalize, norm", [("l1", lambda s: s.abs().sum()), ("l2", lambda s: s.norm())])
def test_global_normalized_ranks_scores_divided_by_layer_norm(normalize, norm):
    layers, scores = budgets(), magnitude_scores(seed=4)
    ratios = Global(normalize).allocate(layers, 0.8, scores)
    counts = check_exact(layers, ratios, 0.8)
    normalized = {n: s / norm(s) for n, s in scores.items()}
    expected = globally_lowest(normalized, list(SHAPES), target_count(layers, 0.8))
    assert pruned_positions(layers, normalized, counts) == expected


def test_global_l2_prunes_large_layers_more():
    ratios = Global("l2").allocate(budgets(), 0.8, magnitude_scores())
    assert ratios["conv3"] > ratios["conv2"] > ratios["conv1"] > ratios["stem"]


def test_global_cap_fixes_a_layer_and_the_rest_make_up():
    layers, scores = budgets({"stem": 0.5, "fc": 0.0}), magnitude_scores(seed=5)
    scores["stem"] = scores["stem"] * 1e-6  # uncapped, the whole stem would be pruned first
    scores["fc"] = scores["fc"] * 1e-6
    ratios = Global().allocate(layers, 0.6, scores)
    counts = check_exact(layers, ratios, 0.6)
    assert counts["stem"] == 72 and counts["fc"] == 0
    rest = [n for n in SHAPES if n not in ("stem", "fc")]
    pruned = pruned_positions([l for l in layers if l.name in rest], scores, counts)
    assert pruned == globally_lowest(scores, rest, target_count(layers, 0.6) - 72)


def test_global_needs_scores_and_a_known_normalization():
    with pytest.raises(ConfigError, match="scores"):
        Global().allocate(budgets(), 0.5, None)
    with pytest.raises(ConfigError, match="'l3'"):
        Global("l3")


def test_global_ties_are_deterministic():
    layers = budgets()
    scores = {n: torch.ones(s) for n, s in SHAPES.items()}
    first = Global().allocate(layers, 0.5, scores)
    assert first == Global().allocate(layers, 0.5, scores)
    check_exact(layers, first, 0.5)


# channel units ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("key", ["uniform", "erk", "global-none", "global-l2"])
def test_channel_units_give_whole_channels(key, sparsity):
    layers = budgets({"fc": 0.0}, channel_units=True)
    wanted = target_count(layers, sparsity)
    ratios = allocate(key, layers, sparsity)
    counts = exact_counts(layers, ratios, wanted)
    for layer in layers:
        assert counts[layer.name] % layer.unit == 0, layer.name
        assert counts[layer.name] <= layer.max_prune
        assert abs(counts[layer.name] - ratios[layer.name] * layer.numel) < layer.unit, layer.name
    assert counts["fc"] == 0
    placed = sum(counts.values())
    # every layer within one channel of its ideal; the total short by less than one channel
    assert placed <= wanted and wanted - placed < max(l.unit for l in layers)


def test_exact_counts_gives_remainders_to_largest_fractions():
    layers = [LayerBudget("a", (10,)), LayerBudget("b", (10,)), LayerBudget("c", (10,))]
    counts = exact_counts(layers, {"a": 0.25, "b": 0.27, "c": 0.28}, 8)  # ideals 2.5, 2.7, 2.8
    assert counts == {"a": 2, "b": 3, "c": 3}


def test_exact_counts_respects_caps_when_placing_remainders():
    layers = [LayerBudget("a", (10,), cap=0.2), LayerBudget("b", (10,))]
    counts = exact_counts(layers, {"a": 0.29, "b": 0.21}, 5)
    assert counts == {"a": 2, "b": 3}


def test_layer_budget_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        budgets()[0].cap = 0.3
