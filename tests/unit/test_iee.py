"""IEE exploit/explore dynamics: what moves in each phase, counts, BatchNorm, MRU growth, resume, the preset."""

from __future__ import annotations

import copy

import pytest
import torch

import ptsparse
from ptsparse.data import as_calibration
from ptsparse.masking import attach_masks, mask_of
from ptsparse.patterns import Unstructured
from ptsparse.recovery import ExploitExplore, KDLogits, TrainSchedule, distill
from ptsparse.norms import norm_statistics
from ptsparse.recovery.iee import Cycles
from ptsparse.targets import count_zeros, find_targets


def test_cycles_schedule_phases_and_decay():
    cycles = Cycles(exploit=4, improve=3, explore=2, end=30)
    assert cycles.count == 3
    phases = [cycles.phase(step)[0] for step in range(9)]
    assert phases == ["exploit"] * 4 + ["improve"] * 3 + ["explore"] * 2
    assert cycles.phase(27) == ("settle", 3)
    assert cycles.swap_fraction(0, 0.2) == pytest.approx(0.2)
    fractions = [cycles.swap_fraction(c, 0.2) for c in range(cycles.count)]
    assert all(a > b > 0 for a, b in zip(fractions, fractions[1:]))


class Recorder(ExploitExplore):
    """Records, around every step, what the test checks."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.records = []

    def optimizer_step(self, state):
        phase, cycle = self.cycles(state).phase(state.step)
        before = {name: self.units.weight(name).detach().clone() for name in self.units.modules}
        others = {n: p.detach().clone() for n, p in state.model.named_parameters() if not n.endswith("original")}
        active = {name: mask.clone() for name, mask in self.units.active.items()}
        forward = {name: mask_of(module).clone() for name, module in self.units.modules.items()}
        super().optimizer_step(state)
        after = {name: self.units.weight(name).detach().clone() for name in self.units.modules}
        others_after = {n: p.detach().clone() for n, p in state.model.named_parameters() if not n.endswith("original")}
        self.records.append({"phase": phase, "cycle": cycle, "before": before, "after": after, "active": active,
                             "forward": forward, "others": others, "others_after": others_after,
                             "statistics": norm_statistics(state.model)})

    def after_step(self, state):
        explorer_before = self.explorer
        super().after_step(state)
        if explorer_before is not None and self.explorer is None:  # exploration just ended with a grow
            self.records[-1]["grown"] = {n: m.clone() for n, m in self.grown[-1].items()}
            self.records[-1]["statistics_after_grow"] = norm_statistics(state.model)
            self.records[-1]["weights_after_grow"] = {n: self.units.weight(n).detach().clone() for n in self.units.modules}


def run_iee(model, calib, sparsity=0.7, iterations=30, **kwargs):
    student = copy.deepcopy(model).train()
    targets = find_targets(student)
    masks = {t.name: Unstructured().mask(t.weight.detach().abs(), round(sparsity * t.numel)) for t in targets}
    attach_masks(targets, {name: mask.clone() for name, mask in masks.items()})
    settings = dict(exploit_steps=4, improve_steps=3, explore_steps=3, alpha=0.3, end=0.9)
    dynamics = Recorder(**{**settings, **kwargs})
    schedule = TrainSchedule(iterations=iterations, batch_size=16, lr=0.1, warmup_iterations=1, weight_decay=1e-3)
    distill(student, copy.deepcopy(model), targets, as_calibration(calib), schedule, KDLogits(), dynamics)
    return student, targets, masks, dynamics


def test_exploration_trains_only_the_pruned_weights(tiny_cnn, calib_images):
    _, _, _, dynamics = run_iee(tiny_cnn, calib_images)
    explore = [r for r in dynamics.records if r["phase"] == "explore"]
    assert explore
    for record in explore:
        for name, active in record["active"].items():
            assert torch.equal(record["after"][name][active], record["before"][name][active])
            assert record["forward"][name].all()  # dense forward: every pruned weight is reactivated
        assert all(torch.equal(record["others"][n], record["others_after"][n]) for n in record["others"])
    assert any(not torch.equal(r["after"][n][~r["active"][n]], r["before"][n][~r["active"][n]])
               for r in explore for n in r["active"])


def test_exploitation_never_moves_pruned_weights(tiny_cnn, calib_images):
    _, _, _, dynamics = run_iee(tiny_cnn, calib_images)
    exploit = [r for r in dynamics.records if r["phase"] in ("exploit", "improve")]
    for record in exploit:
        for name, active in record["active"].items():
            assert torch.equal(record["forward"][name], active)
            assert torch.equal(record["after"][name][~active], record["before"][name][~active])


def test_layer_counts_are_constant_and_the_masks_move(tiny_cnn, calib_images):
    student, targets, masks, dynamics = run_iee(tiny_cnn, calib_images)
    kept = {name: int(mask.sum()) for name, mask in masks.items()}
    cycle_ends = [r for r in dynamics.records if "grown" in r]
    assert len(cycle_ends) == 2
    for record in dynamics.records:
        counts = {name: int(mask.sum()) for name, mask in record["active"].items()}
        if record["phase"] == "exploit" or record["phase"] == "settle":
            assert counts == kept
        else:  # between prune and grow each layer is short by exactly its swap
            assert all(counts[n] <= kept[n] for n in kept)
    assert {name: int(mask_of(t.module).sum()) for t in targets for name in [t.name]} == kept
    assert any(not torch.equal(mask_of(t.module), masks[t.name]) for t in targets)
    summary = dynamics.summary()
    assert len(summary["iee_cycles"]) == 2
    first = summary["iee_cycles"][0]
    assert first["swapped"] == first["grown"] > 0
    assert 0 < first["iou"] < 1
    assert 0 <= first["survival_next"] <= 1 and 0 <= first["survival_end"] <= 1
    for target in targets:  # plain masks after the run
        assert not target.module.parametrizations.weight[0].straight_through


def test_batchnorm_statistics_are_restored_after_exploration(tiny_cnn, calib_images):
    _, _, _, dynamics = run_iee(tiny_cnn, calib_images)
    records = dynamics.records
    for index, record in enumerate(records):
        if "grown" in record:
            start = next(i for i in range(index, -1, -1) if records[i]["phase"] != "explore") + 1
            before = records[start - 1]["statistics"]  # the last step before exploration (after its forward)
            after = record["statistics_after_grow"]
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert any(not torch.equal(before[k], record["statistics"][k]) for k in before if "running_mean" in k)


def test_regrown_weights_keep_their_explored_values(tiny_cnn, calib_images):
    student, targets, _, dynamics = run_iee(tiny_cnn, calib_images, iterations=12, end=1.0)
    record = next(r for r in dynamics.records if "grown" in r)
    start = next(r for r in dynamics.records if r["phase"] == "explore")
    for name, grown in record["grown"].items():
        explored = record["after"][name][grown]
        stored = record["weights_after_grow"][name][grown]
        pre_exploration = start["before"][name][grown]
        assert torch.equal(stored, explored)  # MRU: no reset to the values before exploration
        assert not torch.equal(explored, pre_exploration)


def test_taylor_and_no_reactivation_variants_keep_counts(tiny_cnn, calib_images):
    for kwargs in ({"criterion": "taylor"}, {"reactivate": False}, {"criterion": "taylor", "reactivate": False}):
        student, targets, masks, dynamics = run_iee(tiny_cnn, calib_images, **kwargs)
        assert {t.name: int(mask_of(t.module).sum()) for t in targets} == {n: int(m.sum()) for n, m in masks.items()}
        assert dynamics.summary()["iee_cycles"][0]["swapped"] > 0
        if not kwargs.get("reactivate", True):
            assert all(r["phase"] != "explore" or all(f.sum() < f.numel() for f in r["forward"].values())
                       for r in dynamics.records)  # no dense forward without reactivation


def test_interrupted_iee_run_resumes_bit_identically(tiny_cnn, calib_images, tmp_path):
    settings = dict(method="iee", sparsity=0.7, iterations=24, batch_size=16, iee_exploit_steps=4,
                    iee_improve_steps=3, iee_explore_steps=3, iee_alpha=0.3, iee_end=0.9, checkpoint_every=2,
                    progress=False)
    full = ptsparse.sparsify(tiny_cnn, calib_images, **settings)
    # stop in the middle of the second exploration (steps 17-19), then resume
    partial = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(tiny_cnn, calib_images, settings, partial, stop_at=18)
    resumed = ptsparse.sparsify(tiny_cnn, calib_images, checkpoint_dir=partial, resume=True, **settings)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert full.report["recovery"]["iee_cycles"] == resumed.report["recovery"]["iee_cycles"]


def _interrupt_after(model, calib, settings, directory, stop_at):
    original = ExploitExplore.after_step

    def stop(self, state):
        original(self, state)
        if state.step == stop_at:
            raise KeyboardInterrupt

    ExploitExplore.after_step = stop
    try:
        ptsparse.sparsify(model, calib, checkpoint_dir=directory, **settings)
    finally:
        ExploitExplore.after_step = original


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_iee_preset_is_exact_and_reports_cycles(tiny_cnn, calib_images, sparsity):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="iee", sparsity=sparsity, iterations=40,
                               batch_size=16, iee_exploit_steps=4, iee_improve_steps=3, iee_explore_steps=3,
                               progress=False)
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(sparsity * total)
    recovery = result.report["recovery"]
    assert recovery["dynamics"] == "iee" and len(recovery["iee_cycles"]) == 2
    assert recovery["iee_dense_steps"] == 6
    assert result.config.allocation == "erk" and result.config.objective == "kd_logits"


def test_iee_on_the_fcpts_allocation_keeps_the_learned_layer_sparsities(tiny_cnn, calib_images):
    settings = dict(sparsity=0.8, iterations=20, batch_size=16, progress=False)
    learned = ptsparse.sparsify(tiny_cnn, calib_images, method="fcpts", **settings)
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="iee", allocation="fcpts", iee_exploit_steps=3,
                               iee_improve_steps=2, iee_explore_steps=2, **settings)
    assert {l["name"]: l["achieved"] for l in result.report["layers"]} == \
        {l["name"]: l["achieved"] for l in learned.report["layers"]}
    assert result.report["allocation_search"]["learned"] == {l["name"]: l["achieved"] for l in learned.report["layers"]}
    assert result.report["recovery"]["iee_cycles"]


def test_iee_refuses_n_m_and_bad_settings():
    with pytest.raises(ptsparse.errors.IncompatibleOptionsError, match="dynamics 'iee' does not support pattern '2:4'"):
        ptsparse.config.resolve_config(method="iee", pattern="2:4")
    with pytest.raises(ptsparse.errors.ConfigError, match="iee_criterion 'gradient' is not allowed"):
        ptsparse.config.resolve_config(method="iee", iee_criterion="gradient")
    with pytest.raises(ptsparse.errors.ConfigError, match="iee_alpha 1.5 is not allowed"):
        ptsparse.config.resolve_config(method="iee", iee_alpha=1.5)
    with pytest.raises(ptsparse.errors.ConfigError, match="iee_explore_steps must be a positive integer"):
        ptsparse.config.resolve_config(method="iee", iee_explore_steps=0)


def test_channel_iee_swaps_whole_channels_within_the_flops_budget(monkeypatch):
    pytest.importorskip("torch_pruning")
    from ptsparse.export.channels import remove_channels

    torch.manual_seed(0)
    model = ptsparse.models.reference_resnet().eval()
    calib = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    costs, frozen_ok = [], []
    step, after = ExploitExplore.optimizer_step, ExploitExplore.after_step

    def record_step(self, state):
        phase = self.cycles(state).phase(state.step)[0]
        rows = [(entry, entry.rows(self.units.active[self.units.keys[entry.unit]])) for entry in self.units.entries]
        before = [entry.stored.detach()[keep].clone() for entry, keep in rows]
        step(self, state)
        if phase == "explore":
            frozen_ok.append(all(torch.equal(entry.stored.detach()[keep], old) for (entry, keep), old in zip(rows, before)))

    def record_after(self, state):
        after(self, state)
        counts = [int(self.units.active[key].sum()) for key in self.units.keys]
        costs.append((self.units.costs.cost(counts), self.units.budget))

    monkeypatch.setattr(ExploitExplore, "optimizer_step", record_step)
    monkeypatch.setattr(ExploitExplore, "after_step", record_after)
    result = ptsparse.sparsify(model, calib, method="iee", pattern="channel", sparsity=0.5, iterations=30,
                               batch_size=16, iee_exploit_steps=3, iee_improve_steps=3, iee_explore_steps=3,
                               iee_alpha=0.3, calib_size=64, progress=False)
    budget = costs[-1][1]
    assert budget is not None and all(cost <= budget * (1 + 1e-9) for cost, _ in costs)
    assert frozen_ok and all(frozen_ok)  # active filters, biases and BatchNorm never move while exploring
    cycles = result.report["recovery"]["iee_cycles"]
    assert len(cycles) == 2 and cycles[0]["swapped"] > 0 and 0 < cycles[0]["iou"] <= 1
    assert result.report["recovery"]["iee_reduction"] >= 0.5
    for name, mask in result.masks.items():  # whole output channels only
        rows = mask.flatten(1)
        assert bool((rows.all(1) | ~rows.any(1)).all()), name
    x = calib[:4]
    smaller, report = remove_channels(result.model, x)
    assert report["mac_reduction"] >= 0.5
    assert torch.allclose(smaller(x), result.model(x), atol=1e-4)


def test_interrupted_channel_iee_run_resumes_bit_identically(tmp_path):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = ptsparse.models.reference_resnet().eval()
    calib = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    settings = dict(method="iee", pattern="channel", sparsity=0.5, iterations=24, batch_size=16, iee_exploit_steps=4,
                    iee_improve_steps=3, iee_explore_steps=3, iee_alpha=0.3, iee_end=0.9, checkpoint_every=2,
                    calib_size=48, progress=False)
    full = ptsparse.sparsify(model, calib, **settings)
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(model, calib, settings, tmp_path / "run", stop_at=18)
    resumed = ptsparse.sparsify(model, calib, checkpoint_dir=tmp_path / "run", resume=True, **settings)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert full.report["recovery"]["iee_cycles"] == resumed.report["recovery"]["iee_cycles"]


def test_the_preview_changes_which_weights_are_regrown(tiny_cnn, calib_images):
    """The same run with and without reactivation prunes the same weights in its first cycle and then regrows
    different ones: exploring the pruned weights is what decides the regrowth, not their stored values."""
    runs = [run_iee(tiny_cnn, calib_images, iterations=12, end=1.0, reactivate=flag)[3] for flag in (True, False)]
    grown = [dynamics.grown[0] for dynamics in runs]
    explored = next(r for r in runs[0].records if r["phase"] == "explore")["active"]
    plain = next(r for r in runs[1].records if r["phase"] == "explore")["active"]
    assert all(torch.equal(explored[n], plain[n]) for n in explored)  # same prune
    changed = sum(int((grown[0][n] != grown[1][n]).sum()) for n in grown[0])
    assert changed > 0


def test_a_stronger_preview_moves_the_explored_weights_further(tiny_cnn, calib_images):
    def explored_change(scale: float) -> float:
        dynamics = run_iee(tiny_cnn, calib_images, iterations=12, end=1.0, explore_lr_scale=scale)[3]
        explore = [r for r in dynamics.records if r["phase"] == "explore"]
        return sum(float((r["after"][n] - r["before"][n]).abs().sum()) for r in explore for n in r["active"])

    assert explored_change(5.0) > 2 * explored_change(1.0)


def test_channel_iee_on_tied_channels_starts_from_the_knapsack_plan_and_keeps_its_macs_budget(tiny_cnn, calib_images):
    """Channel IEE's budget is the MACs of the knapsack's plan, not a weight count: its masks start as the plan
    (every tied row of a planned unit channel pruned: the grouped conv's 2 groups tie stem rows c and c + 4), its
    prune and grow knapsacks may move channels between units but never exceed that cost, and the channel export
    removes exactly the MACs its cost model reports. Before the knapsack counted a tie's 2 rows, half the planned
    stem channels were pruned and the budget was 127744 MACs for the plan's 104416."""
    pytest.importorskip("torch_pruning")
    from ptsparse.export.channels import remove_channels

    result = ptsparse.sparsify(tiny_cnn, calib_images, method="iee", pattern="channel", sparsity=0.3,
                               distill_iterations=20, batch_size=16, iee_exploit_steps=2, iee_improve_steps=2,
                               iee_explore_steps=2, iee_alpha=0.3, progress=False)
    plan, recovery = result.report["allocation_search"], result.report["recovery"]
    assert plan["reduction"] >= 0.3 and recovery["iee_budget"] == plan["cost_after"]
    assert recovery["iee_cost_after"] <= recovery["iee_budget"]
    assert sum(cycle["swapped"] for cycle in recovery["iee_cycles"]) > 0
    _, removal = remove_channels(result.model, calib_images[:4])
    assert removal["zeroed_channels_kept"] == 0
    assert removal["mac_reduction"] == pytest.approx(recovery["iee_reduction"], abs=1e-9)
