"""OWL allocation: outlier ratios, the lambda-bounded mapping onto the exact target, and any criterion after it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.allocation import OWL, LayerBudget, Uniform, exact_counts, outlier_ratio, owl_sparsities, target_count
from ptsparse.cli import main
from ptsparse.errors import ConfigError, IncompatibleOptionsError
from ptsparse.models import reference_resnet
from ptsparse.targets import find_targets

SHAPES = {"stem": (16, 1, 3, 3), "conv1": (16, 16, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3),
          "fc": (10, 64)}


def budgets(caps: dict[str, float] | None = None) -> list[LayerBudget]:
    caps = caps or {}
    return [LayerBudget(name, shape, caps.get(name, 1.0)) for name, shape in SHAPES.items()]


def random_outliers(seed: int = 0) -> dict[str, float]:
    draws = torch.rand(len(SHAPES), generator=torch.Generator().manual_seed(seed)) * 0.05
    return dict(zip(SHAPES, draws.tolist()))


def pruned(layers: list[LayerBudget], sparsities: dict[str, float]) -> float:
    return sum(layer.numel * sparsities[layer.name] for layer in layers)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32, elementwise_affine=False), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


class TwinBlocks(nn.Module):
    """Two blocks with equal weights; the second's input has feature 3 a hundred times larger (an outlier feature)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.blocks[1].load_state_dict(self.blocks[0].state_dict())
        self.head = nn.Linear(32, 4)
        scale = torch.ones(16)
        scale[3] = 100.0
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.blocks[0](x), self.blocks[1](x * self.scale)], -1))


@pytest.fixture
def twins() -> nn.Module:
    torch.manual_seed(0)
    return TwinBlocks().eval()


@pytest.fixture
def calib_vectors() -> torch.Tensor:
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, calib: torch.Tensor, **keys) -> ptsparse.SparsifyResult:
    keys = {"method": "magnitude", "allocation": "owl", "sparsity": 0.6, "batch_size": 16, "progress": False, **keys}
    return ptsparse.sparsify(model, calib, **keys)


def assert_exact(result: ptsparse.SparsifyResult, sparsity: float) -> None:
    """Global zeros are round(sparsity * total); every layer within one weight of its allocated ratio."""
    targets = find_targets(result.model)
    total = sum(t.weight.numel() for t in targets)
    assert sum(int((t.weight == 0).sum()) for t in targets) == round(sparsity * total)
    for layer in result.report["layers"]:
        assert abs(layer["achieved"] - layer["target"]) * layer["params"] <= 1 + 1e-6, layer["name"]


# outlier ratios ----------------------------------------------------------------------------------------

def test_outlier_ratio_pools_a_groups_entries_by_hand():
    plain, spiked = torch.ones(10), torch.tensor([1.0] * 9 + [100.0])
    assert outlier_ratio([plain], 5.0) == 0.0
    assert outlier_ratio([spiked], 5.0) == pytest.approx(0.1)  # 100 > 5 * 10.9
    assert outlier_ratio([plain, spiked], 5.0) == pytest.approx(0.05)  # 100 > 5 * 5.95: one of twenty
    assert outlier_ratio([spiked], 10.0) == 0.0  # 100 < 10 * 10.9


# the mapping ---------------------------------------------------------------------------------------------

def test_equal_layers_with_a_mid_range_mean_get_the_papers_rescale():
    layers = [LayerBudget(f"l{i}", (10, 10)) for i in range(4)]
    outliers = {"l0": 0.0, "l1": 0.01, "l2": 0.02, "l3": 0.03}
    sparsities, within = owl_sparsities(outliers, layers, 0.5, 0.09)
    assert within
    assert sparsities == pytest.approx({"l0": 0.59, "l1": 0.53, "l2": 0.47, "l3": 0.41}, abs=1e-9)


def test_the_mapping_is_linear_about_the_weighted_mean_and_the_farthest_layer_on_the_edge():
    layers = [LayerBudget("small", (10, 10)), LayerBudget("mid", (10, 20)), LayerBudget("big", (10, 30))]
    outliers = {"small": 0.0, "mid": 0.5, "big": 1.0}  # weighted mean 2/3: distances -2/3, -1/6, 1/3
    sparsities, within = owl_sparsities(outliers, layers, 0.5, 0.08)
    assert within
    assert sparsities == pytest.approx({"small": 0.58, "mid": 0.52, "big": 0.46}, abs=1e-9)
    assert pruned(layers, sparsities) == pytest.approx(0.5 * 600, abs=1e-9)


@pytest.mark.parametrize("max_deviation", [0.02, 0.08, 0.2])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.97])
def test_deviation_is_bounded_and_the_target_met_exactly(sparsity, max_deviation):
    layers = budgets()
    outliers = random_outliers()
    sparsities, within = owl_sparsities(outliers, layers, sparsity, max_deviation)
    assert within
    total = sum(layer.numel for layer in layers)
    assert pruned(layers, sparsities) == pytest.approx(sparsity * total, abs=1e-6)
    for layer in layers:
        assert abs(sparsities[layer.name] - sparsity) <= max_deviation + 1e-9
        assert sparsities[layer.name] < 1.0  # every layer keeps a weight
    ranked = sorted(SHAPES, key=lambda name: outliers[name])
    assert all(sparsities[a] >= sparsities[b] - 1e-12 for a, b in zip(ranked, ranked[1:]))  # more outliers, less
    counts = exact_counts(layers, sparsities, target_count(layers, sparsity))
    assert sum(counts.values()) == round(sparsity * total)
    assert all(abs(counts[l.name] - sparsities[l.name] * l.numel) <= 1 + 1e-6 for l in layers)


@pytest.mark.parametrize("caps", [{}, {"fc": 0.0, "stem": 0.5}])
def test_lambda_zero_is_uniform(caps):
    layers = budgets(caps)
    sparsities, _ = owl_sparsities(random_outliers(), layers, 0.7, 0.0)
    assert sparsities == pytest.approx(Uniform().allocate(layers, 0.7), abs=1e-9)


def test_caps_that_the_band_cannot_meet_push_the_others_past_it():
    layers = budgets({"conv3": 0.5})  # 70% of the weights held at 0.5: the rest must go past 0.68
    sparsities, within = owl_sparsities(random_outliers(), layers, 0.6, 0.08)
    assert not within
    assert sparsities["conv3"] == 0.5
    assert pruned(layers, sparsities) == pytest.approx(0.6 * sum(l.numel for l in layers), abs=1e-6)
    assert all(sparsities[l.name] <= l.cap for l in layers)


# on models -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_a_planted_outlier_feature_gets_its_block_pruned_less(twins, calib_vectors, criterion):
    result = run(twins, calib_vectors, criterion=criterion)
    assert_exact(result, 0.6)
    summary = result.report["allocation_search"]
    layers = summary["layers"]
    assert layers["blocks.1.fc1"]["group"] == layers["blocks.1.fc2"]["group"] == "blocks.1"
    assert layers["head"]["group"] == "head"
    assert layers["blocks.1.fc1"]["outlier_ratio"] > 0.01 > layers["blocks.0.fc1"]["outlier_ratio"]
    targets = {layer["name"]: layer["target"] for layer in result.report["layers"]}
    assert targets["blocks.1.fc1"] == targets["blocks.1.fc2"] < targets["blocks.0.fc1"] == targets["blocks.0.fc2"]
    assert all(abs(s - 0.6) <= 0.08 + 1e-9 for s in targets.values())
    achieved = {layer["name"]: layer["achieved"] for layer in result.report["layers"]}
    assert achieved["blocks.1.fc1"] < achieved["blocks.0.fc1"]


def test_per_layer_groups_single_out_the_layer_that_reads_the_outlier_feature(twins, calib_vectors):
    result = run(twins, calib_vectors, criterion="wanda", owl_group="layer", owl_max_deviation=0.1)
    assert_exact(result, 0.6)
    targets = {layer["name"]: layer["target"] for layer in result.report["layers"]}
    assert targets["blocks.1.fc1"] == pytest.approx(0.5)  # the most outliers: the bottom of the band
    assert all(targets["blocks.1.fc1"] < s for name, s in targets.items() if name != "blocks.1.fc1")
    assert result.report["allocation_search"]["layers"]["blocks.1.fc2"]["group"] == "blocks.1.fc2"


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_reference_cnn_blocks_share_one_sparsity_and_meet_the_target(criterion):
    model = reference_resnet().eval()
    calib = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = run(model, calib, criterion=criterion, sparsity=0.7)
    assert_exact(result, 0.7)
    summary = result.report["allocation_search"]
    assert summary["within_band"] and summary["group"] == "block"
    layers = summary["layers"]
    assert layers["stages.1.0.shortcut.0"]["group"] == "stages.1.0" and layers["stem.0"]["group"] == "stem.0"
    by_group: dict[str, set[float]] = {}
    for name, entry in layers.items():
        by_group.setdefault(entry["group"], set()).add(entry["sparsity"])
        assert abs(entry["sparsity"] - 0.7) <= 0.08 + 1e-9
    assert all(len(sparsities) == 1 for sparsities in by_group.values())
    assert len({entry["outlier_ratio"] for entry in layers.values()}) > 1


def test_lambda_zero_prunes_as_uniform(twins, calib_vectors):
    owl = run(twins, calib_vectors, owl_max_deviation=0.0)
    uniform = run(twins, calib_vectors, allocation="uniform")
    assert all(torch.equal(owl.masks[name], uniform.masks[name]) for name in uniform.masks)


def test_runs_are_deterministic(twins, calib_vectors):
    first, second = (run(twins, calib_vectors, criterion="wanda") for _ in range(2))
    assert all(torch.equal(first.masks[name], second.masks[name]) for name in first.masks)
    assert first.report["allocation_search"] == second.report["allocation_search"]


def test_channel_pattern_with_taylor_meets_the_target_within_a_channel_per_layer(twins, calib_vectors):
    result = run(twins, calib_vectors, criterion="taylor", pattern="channel")
    targets = find_targets(result.model)
    total = sum(t.weight.numel() for t in targets)
    zeros = sum(int((t.weight == 0).sum()) for t in targets)
    assert 0 <= round(0.6 * total) - zeros < max(t.weight[0].numel() for t in targets)
    for layer in result.report["layers"]:
        assert abs(layer["achieved"] - layer["target"]) * layer["params"] < math.prod(layer["shape"][1:])
    targets = {layer["name"]: layer["target"] for layer in result.report["layers"]}
    assert targets["head"] == 0.0  # the output layer keeps its channels
    assert targets["blocks.1.fc1"] < targets["blocks.0.fc1"]


def test_a_model_without_blocks_gets_a_group_per_layer(tiny_mlp):
    calib = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    result = run(tiny_mlp, calib)
    assert {name: entry["group"] for name, entry in result.report["allocation_search"]["layers"].items()} == {
        "1": "1", "3": "3"}
    with pytest.raises(ConfigError, match="matches no module"):
        run(tiny_mlp, calib, blocks=("missing.*",))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_a_tiny_llama_meets_the_target_exactly_with_decoder_layers_as_groups(criterion):
    transformers = pytest.importorskip("transformers")
    from ptsparse.models.zoo import HFCausalLM

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = HFCausalLM(transformers.LlamaForCausalLM(config)).eval()
    tokens = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    result = run(model, tokens, criterion=criterion, batch_size=8)
    assert_exact(result, 0.6)
    layers = result.report["allocation_search"]["layers"]
    assert {entry["group"] for entry in layers.values()} == {"hf.model.layers.0", "hf.model.layers.1"}
    assert len(layers) == 14 and all(abs(entry["sparsity"] - 0.6) <= 0.08 + 1e-9 for entry in layers.values())


# options -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, words", [
    ({"owl_max_deviation": 1.5}, ["owl_max_deviation", "1.5", "[0, 1]"]),
    ({"owl_max_deviation": -0.1}, ["owl_max_deviation", "-0.1"]),
    ({"owl_outlier_threshold": 0.5}, ["owl_outlier_threshold", ">= 1", "0.5"]),
    ({"owl_group": "row"}, ["owl_group", "'row'", "block, layer"]),
])
def test_invalid_options_are_refused_in_one_line(keys, words):
    with pytest.raises(ConfigError) as info:
        ptsparse.SparsityConfig(method="magnitude", allocation="owl", **keys)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message
    with pytest.raises(ConfigError):
        OWL(**{key.removeprefix("owl_"): value for key, value in keys.items()})


def test_n_m_is_refused_in_one_line():
    with pytest.raises(IncompatibleOptionsError) as info:
        ptsparse.SparsityConfig(method="magnitude", allocation="owl", pattern="2:4")
    message = str(info.value)
    assert "allocation 'owl'" in message and "'2:4'" in message and "\n" not in message


def test_listed_with_its_options(capsys):
    assert main(["list", "allocations", "--details"]) == 0
    out = capsys.readouterr().out
    assert "owl: OWL:" in out
    assert all(flag in out for flag in ("--owl-outlier-threshold", "--owl-max-deviation", "--owl-group"))
