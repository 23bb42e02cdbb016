"""Knapsack allocation: the channel cost model, the grouped-knapsack solver, and the allocation end to end."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.allocation import AllocationContext, ChannelCosts, Knapsack, LayerBudget, knapsack, solve_knapsack
from ptsparse.data import as_calibration
from ptsparse.errors import ConfigError
from ptsparse.export.channels import remove_channels
from ptsparse.graph.cost import count_macs
from ptsparse.models import reference_resnet
from ptsparse.norms import following_norms
from ptsparse.targets import find_targets


def reference_inputs(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = reference_resnet().eval()
    return model, ChannelCosts.trace(model, find_targets(model), reference_inputs(2))


class DepthwiseNet(nn.Module):
    """Stem, a depthwise conv coupled to it, a pointwise conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.depthwise(torch.relu(self.bn(self.stem(x))))))
        return self.fc(torch.relu(self.pointwise(x)).flatten(1))


def zero_units(model: nn.Module, costs: ChannelCosts, kept: list[int], example: torch.Tensor, seed: int) -> nn.Module:
    """A copy of ``model`` where unit ``u`` keeps ``kept[u]`` random channels (the others' rows, biases and
    BatchNorms zeroed, as the taylor criterion leaves them)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    norms = following_norms(model, find_targets(model), example)
    with torch.no_grad():
        for unit, k in zip(costs.units, kept):
            dropped = torch.randperm(unit.size, generator=generator)[k:]
            for name, channels in unit.members.items():
                rows = torch.tensor(channels)[dropped]
                layer = model.get_submodule(name)
                layer.weight[rows] = 0
                if layer.bias is not None:
                    layer.bias[rows] = 0
                if name in norms:
                    norms[name].weight[rows] = 0
                    norms[name].bias[rows] = 0
    return model


def test_cost_equals_the_macs_of_the_channel_removed_reference_model(reference):
    model, costs = reference
    example = reference_inputs(4)
    assert costs.cost(costs.sizes) == costs.dense_cost == count_macs(model, reference_inputs(1))["macs"]
    assert costs.units[-1].members == {"fc": tuple(range(10))}  # an uncoupled target is a unit of its own
    generator = torch.Generator().manual_seed(0)
    for seed in range(3):
        # The output layer keeps its classes (channel removal never removes them).
        kept = [int(torch.randint(1, size + 1, (1,), generator=generator)) for size in costs.sizes[:-1]] + [10]
        _, report = remove_channels(zero_units(model, costs, kept, example, seed), example)
        assert report["macs_after"] == costs.cost(kept) < costs.dense_cost


def test_every_target_is_in_exactly_one_unit_in_execution_order(reference):
    model, costs = reference
    members = [name for unit in costs.units for name in unit.members]
    assert sorted(members) == sorted(t.name for t in find_targets(model))
    assert costs.sizes == [unit.size for unit in costs.units]
    assert next(iter(costs.units[0].members)) == "stem.0"
    stream = next(unit for unit in costs.units if "stages.1.0.shortcut.0" in unit.members)
    assert set(stream.members) == {"stages.1.0.shortcut.0", "stages.1.0.conv2", "stages.1.1.conv2", "stages.1.2.conv2"}


def test_depthwise_conv_follows_its_producer_and_costs_one_input_per_channel():
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    example = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    costs = ChannelCosts.trace(model, find_targets(model), example)
    assert [set(unit.members) for unit in costs.units] == [{"stem", "depthwise"}, {"pointwise"}, {"fc"}]
    assert costs.dense_cost == count_macs(model, example)["macs"]
    for kept in ([3, 12, 10], [8, 5, 10], [1, 2, 10]):
        _, report = remove_channels(zero_units(model, costs, kept, example, 0), example)
        assert report["macs_after"] == costs.cost(kept)


def test_curve_is_the_cost_with_one_unit_varied(reference):
    _, costs = reference
    kept = [max(size // 2, 1) for size in costs.sizes]
    for unit in (0, 5, len(costs.sizes) - 1):
        curve = costs.curve(unit, kept)
        assert len(curve) == costs.sizes[unit] + 1
        for k in (0, 1, costs.sizes[unit]):
            assert curve[k].item() == costs.cost(kept[:unit] + [k] + kept[unit + 1:])


class TableCosts:
    """A hand-made cost: ``base + sum_u table[u][k_u] + coupling * sum_u k_u * k_(u+1)``."""

    def __init__(self, tables: list[torch.Tensor], coupling: float = 0.0) -> None:
        self.tables, self.coupling = tables, coupling

    def cost(self, kept) -> float:
        pairs = sum(a * b for a, b in zip(kept, kept[1:]))
        return 1.0 + sum(float(t[k]) for t, k in zip(self.tables, kept)) + self.coupling * pairs

    def curve(self, unit, kept) -> torch.Tensor:
        return torch.tensor([self.cost(list(kept[:unit]) + [k] + list(kept[unit + 1:]))
                             for k in range(len(self.tables[unit]))], dtype=torch.float64)


def random_instance(seed: int, coupling: float):
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 6, (3,), generator=generator).tolist()
    values = [torch.cat([torch.zeros(1), torch.rand(n, generator=generator).sort(descending=True).values.cumsum(0)])
              for n in sizes]
    tables = [torch.cat([torch.zeros(1), torch.rand(n, generator=generator).cumsum(0)]) for n in sizes]
    costs = TableCosts(tables, coupling)
    low = [int(torch.randint(0, 2, (1,), generator=generator)) for _ in sizes]
    capacity = costs.cost(low) + float(torch.rand(1, generator=generator)) * (costs.cost(sizes) - costs.cost(low))
    return values, costs, capacity, low, sizes


def brute_force(values, costs, capacity, low, high) -> float:
    return max(sum(float(v[k]) for v, k in zip(values, kept))
               for kept in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(low, high)))
               if costs.cost(kept) <= capacity)


def solve_and_compare(seed: int, coupling: float) -> float:
    """Solves a random instance; checks bounds and budget; returns its value over the brute-force optimum."""
    values, costs, capacity, low, high = random_instance(seed, coupling)
    kept = solve_knapsack(values, costs, capacity, low, high)
    assert all(lo <= k <= hi for k, lo, hi in zip(kept, low, high))
    assert costs.cost(kept) <= capacity
    return sum(float(v[k]) for v, k in zip(values, kept)) / brute_force(values, costs, capacity, low, high)


def test_solver_matches_brute_force_on_separable_costs():
    for seed in range(40):
        assert solve_and_compare(seed, 0.0) == pytest.approx(1.0, rel=1e-9), seed


def test_solver_is_near_brute_force_on_coupled_costs():
    # Linearising a c_out * c_in coupling is exact along each unit only: near-optimal, usually optimal.
    ratios = [solve_and_compare(seed, 0.05) for seed in range(40)]
    assert min(ratios) >= 0.85
    assert sum(ratio >= 1 - 1e-9 for ratio in ratios) >= 36


def test_solver_meets_the_true_budget_of_the_reference_model(reference):
    _, costs = reference
    generator = torch.Generator().manual_seed(0)
    values = [torch.cat([torch.zeros(1), torch.rand(n, generator=generator).sort(descending=True).values.cumsum(0)])
              for n in costs.sizes]
    low = [1] * (len(costs.sizes) - 1) + [costs.sizes[-1]]
    for fraction in (0.9, 0.5, 0.2):
        kept = solve_knapsack(values, costs, fraction * costs.dense_cost, low, costs.sizes)
        assert costs.cost(kept) <= fraction * costs.dense_cost
        assert costs.cost(kept) >= (fraction - 0.02) * costs.dense_cost  # the budget is used, not wasted
        assert kept[-1] == costs.sizes[-1] and min(kept) >= 1


def test_infeasible_budget_names_the_minimum_cost():
    values, costs, _, low, high = random_instance(0, 0.0)
    with pytest.raises(ConfigError, match=r"cost budget 0\.5 is infeasible: the minimum reachable cost is 1\b"):
        solve_knapsack(values, costs, 0.5, [0] * len(high), high)


def test_allocation_keeps_capped_units_and_gives_whole_channels(reference):
    model, costs = reference
    targets = find_targets(model)
    capped = {"fc": 0.0, "stages.0.0.conv1": 0.25}
    budgets = [LayerBudget(t.name, tuple(t.shape), capped.get(t.name, 1.0), t.shape.numel() // t.shape[0])
               for t in targets]
    scores = {t.name: torch.rand(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(targets)}
    context = AllocationContext(model, targets, as_calibration(reference_inputs(8)))
    allocation = Knapsack()
    ratios = allocation.allocate(budgets, 0.6, scores, context)
    summary = allocation.summary()
    assert summary["cost_after"] <= 0.4 * summary["dense_cost"] and summary["reduction"] >= 0.6
    assert summary["kept"]["fc"] == 10 and summary["kept"]["stages.0.0.conv1"] >= 12
    by_name = {b.name: b for b in budgets}
    for unit, size in zip(allocation.costs.units, allocation.costs.sizes):
        pruned = {round(ratios[n] * by_name[n].numel / by_name[n].unit, 9) for n in unit.members}
        assert len(pruned) == 1 and float(pruned.pop()).is_integer()  # whole channels, the same in every member
    assert ratios["fc"] == 0.0
    with pytest.raises(ConfigError, match=r"knapsack sparsity 0\.999 \(macs\): cost budget \d+ is infeasible: "
                                          r"the minimum reachable cost is \d+; at most 0\.99\d+ of the macs can be "
                                          r"removed"):
        allocation.allocate(budgets, 0.999, scores, context)


def test_sparsify_with_knapsack_removes_at_least_the_asked_macs():
    torch.manual_seed(0)
    model = reference_resnet().eval()
    calib = reference_inputs(128)
    result = ptsparse.sparsify(model, calib, method="taylor", allocation="knapsack", sparsity=0.5,
                               calib_size=128, bn_recalibration=False, progress=False)
    report = result.report
    assert report["allocation_search"]["reduction"] >= 0.5
    assert report["target_sparsity"] == pytest.approx(report["achieved_sparsity"], abs=1e-9)
    targets = {t.name: t for t in find_targets(result.model)}
    for target in targets.values():
        rows = target.weight.flatten(1)
        assert torch.equal((rows == 0).all(1), (rows == 0).any(1)), target.name
    costs = ChannelCosts.trace(model, list(targets), calib[:2])
    for unit in costs.units:  # coupled members prune the same unit channels
        dead = {name: targets[name].weight.flatten(1).eq(0).all(1)[list(channels)] for name, channels in
                unit.members.items()}
        first = next(iter(dead.values()))
        assert all(torch.equal(first, d) for d in dead.values()), unit.members
    _, removal = remove_channels(result.model, calib[:8])
    assert removal["mac_reduction"] >= 0.5
    assert removal["macs_after"] == report["allocation_search"]["cost_after"]


def test_channels_tied_by_a_grouped_convolution_are_pruned_as_many_as_the_knapsack_keeps_out(tiny_cnn, calib_images):
    """A unit channel of tied rows (the same offset in each of a grouped convolution's 2 groups) is 2 rows of each
    member: the allocation counted 1, so half the planned channels were pruned (0.28 of the MACs for 0.5)."""
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="taylor", allocation="knapsack", sparsity=0.5,
                               batch_size=16, progress=False)
    _, removal = remove_channels(result.model, calib_images[:4])
    assert removal["mac_reduction"] >= 0.5
    assert removal["macs_after"] == result.report["allocation_search"]["cost_after"]


def test_latency_table_interpolates_exactly(reference, monkeypatch):
    """With layer times bilinear in (kept out, kept in), as MACs are, the interpolated cost is exact."""
    model, macs = reference

    def fake_time(module, shape, *args) -> dict[str, float]:
        return {"median_ms": count_macs(module, torch.zeros(1, *shape))["macs"] / 1e6}

    monkeypatch.setattr(knapsack, "measure_latency", fake_time)
    costs = ChannelCosts.trace(model, find_targets(model), reference_inputs(2), cost="latency", points=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        kept = [int(torch.randint(1, size + 1, (1,), generator=generator)) for size in costs.sizes]
        assert costs.cost(kept) == pytest.approx(macs.cost(kept) / 1e6, rel=1e-9)


def allocation_inputs(model: nn.Module) -> tuple[list[LayerBudget], dict[str, torch.Tensor], AllocationContext]:
    """What the knapsack's ``allocate`` takes for the reference model: budgets (the classifier capped at 0), random
    scores, and the context of a run at batch 16."""
    targets = find_targets(model)
    budgets = [LayerBudget(t.name, tuple(t.shape), 0.0 if t.name == "fc" else 1.0, t.shape.numel() // t.shape[0])
               for t in targets]
    scores = {t.name: torch.rand(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(targets)}
    return budgets, scores, AllocationContext(model, targets, as_calibration(reference_inputs(8)), batch_size=16)


def test_latency_table_is_timed_at_the_latency_batch_else_the_run_batch(reference, monkeypatch):
    model, _ = reference
    batches = []

    def fake_time(module, shape, batch_size, *args) -> dict[str, float]:
        batches.append(batch_size)
        return {"median_ms": count_macs(module, torch.zeros(1, *shape))["macs"] / 1e6}

    monkeypatch.setattr(knapsack, "measure_latency", fake_time)
    budgets, scores, context = allocation_inputs(model)
    for latency_batch, expected in ((None, 16), (4, 4)):
        batches.clear()
        allocation = Knapsack("latency", latency_batch)
        allocation.allocate(budgets, 0.5, scores, context)
        assert batches and set(batches) == {expected}
        assert allocation.summary()["latency_batch"] == expected


def test_latency_batch_is_a_positive_integer_option_that_iee_follows_too():
    from ptsparse.recovery.iee import ExploitExplore

    config = ptsparse.SparsityConfig(method="iee", pattern="channel", batch_size=64, knapsack_cost="latency",
                                     knapsack_latency_batch=8)
    assert config.settings_of(Knapsack).latency_batch == 8
    assert ExploitExplore.from_config(config).batch_size == 8
    assert ExploitExplore.from_config(ptsparse.SparsityConfig(method="iee", pattern="channel")).batch_size == 64
    for bad in (0, 2.5, "32"):
        with pytest.raises(ConfigError, match=f"knapsack_latency_batch must be a positive integer, got {bad!r}"):
            ptsparse.SparsityConfig(knapsack_latency_batch=bad)


def test_measured_latency_falls_with_fewer_channels():
    torch.manual_seed(0)
    model = reference_resnet().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine, threads of tiny kernels wait at barriers for descheduled peers
    try:
        costs = ChannelCosts.trace(model, find_targets(model), reference_inputs(2), cost="latency", batch_size=32,
                                   points=2, warmup=1, repeats=5)
    finally:
        torch.set_num_threads(threads)
    fewest = [1] * (len(costs.sizes) - 1) + [costs.sizes[-1]]
    assert costs.kind == "latency" and costs.dense_cost == costs.cost(costs.sizes)
    assert costs.dense_cost > costs.cost(fewest) > 0


@pytest.mark.parametrize("rounds", [0, 3])
def test_latency_plan_is_timed_end_to_end_and_corrected_to_its_budget(reference, monkeypatch, rounds):
    """A layer times as its MACs; a whole model also pays a fixed 30% of the dense MACs that no layer table
    holds (normalisation, activations), so the table's plan removes too little of the measured latency."""
    model, _ = reference
    dense_macs = count_macs(model, reference_inputs(1))["macs"]
    timed_models = []

    def fake_time(module, shape, *args, **kwargs) -> dict[str, float]:
        macs = count_macs(module, torch.zeros(1, *shape))["macs"]
        whole = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()) > 1
        timed_models.append(whole)
        return {"median_ms": (macs + 0.3 * dense_macs * whole) / 1e6}

    monkeypatch.setattr(knapsack, "measure_latency", fake_time)
    budgets, scores, context = allocation_inputs(model)
    allocation = Knapsack("latency", latency_rounds=rounds)
    ratios = allocation.allocate(budgets, 0.5, scores, context)
    report = allocation.summary()
    if rounds == 0:  # the table alone: half its sum removed, 0.38 of the measured latency
        assert not any(timed_models) and "measured" not in report
        assert report["reduction"] == pytest.approx(0.5, abs=0.01)
        return
    measured = report["measured"]
    assert measured["dense_ms"] == pytest.approx(1.3 * dense_macs / 1e6)
    assert 1 < len(measured["rounds_ms"]) <= 3 and measured["rounds_ms"][0] > 0.55 * measured["dense_ms"]
    assert measured["reduction"] == pytest.approx(0.5, abs=0.02)
    # the ratios are those of the plan that was timed: its widths' MACs, plus the fixed part
    kept = [k for k in report["kept"].values()]
    assert measured["after_ms"] == pytest.approx(
        (allocation.costs.cost(list(kept)) * 1e6 + 0.3 * dense_macs) / 1e6, rel=1e-6)
    assert ratios


def test_knapsack_with_channel_multiple_keeps_widths_in_steps_and_meets_the_budget():
    model = reference_resnet()
    result = ptsparse.sparsify(model, reference_inputs(32), method="taylor", allocation="knapsack", sparsity=0.5,
                               channel_multiple=8, batch_size=16, progress=False)
    smaller, removal = remove_channels(result.model, reference_inputs(4))
    assert 0.5 <= removal["mac_reduction"] < 0.55
    assert result.report["removed"]["macs"] == pytest.approx(removal["mac_reduction"])
    widths = [m.out_channels for m in smaller.modules() if isinstance(m, nn.Conv2d)]
    assert all(width % 8 == 0 for width in widths) and min(widths) >= 8


def test_solver_steps_move_a_unit_by_whole_steps_from_its_full_width(reference):
    model, costs = reference
    values = [torch.cat([torch.zeros(1), torch.linspace(1, 0.1, size).cumsum(0)]).double() for size in costs.sizes]
    low = [1] * len(costs.sizes)
    steps = [8 if size % 8 == 0 else 1 for size in costs.sizes]
    kept = solve_knapsack(values, costs, 0.4 * costs.dense_cost, low, costs.sizes, steps=steps)
    assert costs.cost(kept) <= 0.4 * costs.dense_cost
    assert all((size - k) % step == 0 and k >= step for size, k, step in zip(costs.sizes, kept, steps))
    assert kept != costs.sizes


def test_corrected_capacity_interpolates_between_the_plans_either_side_of_the_budget():
    from ptsparse.allocation.knapsack import _corrected_capacity

    # measured = 100 + table: the first plan in proportion, then on the line through the last two
    assert _corrected_capacity([(200.0, 300.0)], 150.0) == pytest.approx(100.0)
    assert _corrected_capacity([(200.0, 300.0), (100.0, 200.0)], 150.0) == pytest.approx(50.0)
    # once plans lie on both sides, the closest of each side (40 -> 120, 70 -> 175), not the last two (both above)
    points = [(100.0, 210.0), (40.0, 120.0), (70.0, 175.0), (80.0, 185.0)]
    assert _corrected_capacity(points, 160.0) == pytest.approx(70.0 - 15.0 * 30.0 / 55.0)
