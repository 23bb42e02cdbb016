"""UniPTS parts: base-decayed objective, reducing-regrowing search, dynamic sparse training, the preset."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ptsparse
from ptsparse.allocation import AllocationContext, LayerBudget, ReducingRegrowingSearch, exact_counts, target_count
from ptsparse.allocation.unipts_search import FitnessEvaluator, decode
from ptsparse.data import as_calibration
from ptsparse.errors import ConfigError, IncompatibleOptionsError
from ptsparse.masking import attach_masks, mask_of
from ptsparse.patterns import Unstructured
from ptsparse.recovery import BaseDecayed, DynamicSparseTraining, KDLogits, TrainSchedule, distill
from ptsparse.targets import count_zeros, find_targets


def test_base_decayed_tau_follows_its_schedule():
    objective = BaseDecayed(tau0=8.0, gamma=0.99, epochs=100)
    assert objective.tau(0.0) == pytest.approx(8.0)
    assert objective.tau(0.5) == pytest.approx(8.0 * 0.99**50)  # 4.84, the spec's epoch-50 value
    assert objective.tau(0.99) == pytest.approx(2.96, abs=0.01)  # the last epoch of 100
    assert objective.tau(1.0) == pytest.approx(8.0 * 0.99**100)
    taus = [objective.tau(p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(taus, taus[1:]))


@pytest.mark.parametrize("progress", [0.0, 0.4, 1.0])
def test_base_decayed_gradient_is_scaled_kd(progress):
    """dL/dz_student = (T^2 / tau) (q - p) / B, with q at the student's temperature."""
    student = torch.randn(6, 10, requires_grad=True)
    teacher = torch.randn(6, 10)
    objective = BaseDecayed(temperature=4.0, student_temperature=1.0)
    objective(student, teacher, {}, {}, progress=progress)["loss"].backward()
    p, q = F.softmax(teacher / 4, -1), F.softmax(student.detach(), -1)
    expected = 16 / objective.tau(progress) * (q - p) / 6
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_base_decayed_without_decay_is_plain_kd():
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    plain = BaseDecayed(temperature=4.0, student_temperature=4.0, tau0=1.0, gamma=1.0)
    assert float(plain(student, teacher, {}, {})["loss"]) == pytest.approx(
        float(KDLogits(4.0)(student, teacher, {}, {})["loss"]), rel=1e-5)


def budgets_of(model):
    return [LayerBudget(t.name, tuple(t.shape)) for t in find_targets(model)]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_decoding_meets_the_target_and_respects_full_density(sparsity):
    layers = budgets_of(ptsparse.models.reference_resnet())
    total = sum(l.numel for l in layers)
    generator = torch.Generator().manual_seed(0)
    for genome in [torch.zeros(len(layers)), *[3 * torch.rand(len(layers), generator=generator) for _ in range(5)]]:
        ratios = decode(genome, layers, sparsity, 0.05)
        assert all(0.0 <= r <= 1.0 for r in ratios.values())
        assert sum(l.numel * ratios[l.name] for l in layers) == pytest.approx(sparsity * total, rel=1e-9)
        assert max(ratios.values()) <= min(1.0, sparsity + 0.05) + 1e-9  # no layer sparser than P + delta


def test_every_search_candidate_meets_the_global_target_exactly(tiny_cnn, calib_images, monkeypatch):
    seen = []
    original = FitnessEvaluator.__call__

    def record(self, counts):
        seen.append(dict(counts))
        return original(self, counts)

    monkeypatch.setattr(FitnessEvaluator, "__call__", record)
    targets = find_targets(tiny_cnn)
    layers = budgets_of(tiny_cnn)
    search = ReducingRegrowingSearch(population=6, generations=3, parents=3, elites=1, bn_samples=16, fit_samples=16)
    context = AllocationContext(tiny_cnn, targets, as_calibration(calib_images), batch_size=16)
    ratios = search.allocate(layers, 0.7, context=context)
    wanted = target_count(layers, 0.7)
    assert len(seen) == search.summary()["evaluations"] >= 6
    assert all(sum(counts.values()) == wanted for counts in seen)
    assert sum(round(ratios[l.name] * l.numel) for l in layers) == wanted


def test_search_returns_its_best_ever_candidate_rescored_independently(tiny_cnn, monkeypatch):
    """The answer is the best allocation the search scored (not the last generation's), its fitness recomputed on
    the same held-out slice by a fresh evaluator equals the reported best, and the best never drops between
    generations (elites carried over unchanged)."""
    scored = []
    original = FitnessEvaluator.__call__

    def record(self, counts):
        result = original(self, counts)
        scored.append((dict(counts), result[0]))
        return result

    monkeypatch.setattr(FitnessEvaluator, "__call__", record)
    calib = as_calibration(torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(5)))
    targets = find_targets(tiny_cnn)
    layers = budgets_of(tiny_cnn)
    context = AllocationContext(tiny_cnn, targets, calib, batch_size=32)
    search = ReducingRegrowingSearch(population=8, generations=4, parents=4, elites=2, bn_samples=32,
                                     fit_samples=32, seed=1)
    before = {name: value.clone() for name, value in tiny_cnn.state_dict().items()}
    ratios = search.allocate(layers, 0.8, context=context)
    assert all(torch.equal(value, before[name]) for name, value in tiny_cnn.state_dict().items())  # dense untouched
    found = {l.name: round(ratios[l.name] * l.numel) for l in layers}
    report = search.summary()
    history = report["best_per_generation"]
    assert len(history) == 4 + 1 and all(a <= b for a, b in zip(history, history[1:]))
    best = max(fitness for _, fitness in scored)
    assert report["best_fitness"] == history[-1] == best
    assert found in [counts for counts, fitness in scored if fitness == best]
    monkeypatch.undo()
    evaluate = FitnessEvaluator(context, bn_samples=32, fit_samples=32, seed=1)  # the same held-out slice
    assert evaluate(found)[0] == pytest.approx(best, rel=1e-6)
    assert len(evaluate.bn_slice) == len(evaluate.fit_slice) == 32
    assert not set(evaluate.bn_slice.inputs[:, 0, 0, 0].tolist()) & set(evaluate.fit_slice.inputs[:, 0, 0, 0].tolist())


def test_search_steers_regrowth_toward_what_its_fitness_rewards(tiny_cnn, calib_images, monkeypatch):
    """A stub fitness rewarding one layer for keeping weights: the search must hand that layer more of the regrown
    weights than any allocation of its start (ERK, uniform regrowth, the random genomes) and than any genome in the
    initial box [0, 1)^L could (only mutation leaves it), and the two runs, each favouring a different layer, must
    end with opposite preferences."""
    favoured, scored = {}, []

    def stub(self, counts):
        self.evaluations += 1
        scored.append(dict(counts))
        return -float(counts[favoured["layer"]]), 0.0  # fewer pruned weights there is better

    monkeypatch.setattr(FitnessEvaluator, "__call__", stub)
    layers = budgets_of(tiny_cnn)
    context = AllocationContext(tiny_cnn, find_targets(tiny_cnn), as_calibration(calib_images), batch_size=16)
    wanted = target_count(layers, 0.8)
    found = {}
    for layer in ("grouped", "stem"):
        favoured["layer"], scored[:] = layer, []
        search = ReducingRegrowingSearch(delta=0.05, population=16, generations=8, parents=6, elites=2,
                                         bn_samples=16, fit_samples=16, seed=0)
        ratios = search.allocate(layers, 0.8, context=context)
        counts = {l.name: round(ratios[l.name] * l.numel) for l in layers}
        start = scored[: 16 + 1]  # scored before the first generation: ERK and the initial population
        assert counts[layer] < min(candidate[layer] for candidate in start)
        corner = torch.tensor([1.0 if l.name == layer else 0.0 for l in layers])  # the best genome of [0, 1)^L
        assert counts[layer] < exact_counts(layers, decode(corner, layers, 0.8, 0.05), wanted)[layer]
        assert search.summary()["best_fitness"] == -counts[layer]
        assert sum(counts.values()) == wanted
        found[layer] = counts
    assert found["grouped"]["grouped"] < found["stem"]["grouped"]
    assert found["stem"]["stem"] < found["grouped"]["stem"]


def test_labelled_fitness_needs_labels(tiny_cnn, calib_images):
    context = AllocationContext(tiny_cnn, find_targets(tiny_cnn), as_calibration(calib_images))
    with pytest.raises(ConfigError, match="top1_labels.*labelled"):
        FitnessEvaluator(context, fitness="top1_labels")


class CountingDST(DynamicSparseTraining):
    """Records each layer's kept count and mask after every step."""

    def __init__(self) -> None:
        super().__init__(update_every=1, pruned_decay=5e-5)
        self.counts, self.masks = [], []

    def after_step(self, state) -> None:
        super().after_step(state)
        self.counts.append({name: int(mask_of(m).sum()) for name, m in self.layers})
        self.masks.append({name: mask_of(m).clone() for name, m in self.layers})


def test_dst_keeps_layer_counts_while_changing_which_weights_are_kept(tiny_cnn, calib_images):
    student = copy.deepcopy(tiny_cnn)
    targets = find_targets(student)
    masks = {t.name: Unstructured().mask(t.weight.detach().abs(), round(0.7 * t.numel)) for t in targets}
    attach_masks(targets, {name: mask.clone() for name, mask in masks.items()})
    dynamics = CountingDST()
    schedule = TrainSchedule(iterations=25, batch_size=16, lr=0.2, warmup_iterations=1)
    distill(student, copy.deepcopy(tiny_cnn), targets, as_calibration(calib_images), schedule, KDLogits(), dynamics)
    expected = {name: int(mask.sum()) for name, mask in masks.items()}
    assert all(counts == expected for counts in dynamics.counts)
    assert any(not torch.equal(dynamics.masks[-1][name], masks[name]) for name in masks)
    assert dynamics.summary()["kept_changed"] > 0
    for target in targets:  # after the run: plain masks whose pruned weights read as zero
        assert not target.module.parametrizations.weight[0].straight_through
        assert int((target.weight == 0).sum()) >= target.numel - expected[target.name]


def test_dst_gives_pruned_weights_gradient_and_decay():
    layer = torch.nn.Linear(8, 4)
    targets = find_targets(layer)
    mask = Unstructured().mask(layer.weight.detach().abs(), 16)
    attach_masks(targets, {"": mask})
    dynamics = DynamicSparseTraining(pruned_decay=0.5)
    dynamics.prepare(layer, targets)
    layer(torch.randn(3, 8)).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert (grad[~mask] != 0).any()  # straight-through: pruned weights learn
    terms = dynamics.loss_terms(None)
    stored = layer.parametrizations.weight.original.detach()
    assert float(terms["loss"].detach()) == pytest.approx(0.25 * float(stored[~mask].pow(2).sum()))


def test_unipts_run_is_exact_and_reports_the_search(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="unipts", sparsity=0.8, iterations=12, batch_size=16,
                               search_population=6, search_generations=2, search_parents=3, search_bn_samples=16,
                               search_fit_samples=16, progress=False)
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(0.8 * total)
    search = result.report["allocation_search"]
    best = search["best_per_generation"]  # the initial population, then one entry per generation, never dropping
    assert len(best) == 2 + 1 and best == sorted(best) and best[-1] == search["best_fitness"]
    assert search["wall_time_s"] > 0
    history = result.report["recovery"]["history"]
    assert history[0]["tau"] == pytest.approx(8.0) and history[-1]["tau"] < history[0]["tau"]
    assert result.report["recovery"]["dynamics"] == "dst"


def test_rescoring_picks_among_erk_and_the_best_candidates_after_distillation(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="unipts", sparsity=0.8, distill_iterations=4,
                               batch_size=16, unipts_search_population=6, unipts_search_generations=2,
                               unipts_search_parents=3, unipts_search_bn_samples=16, unipts_search_fit_samples=16,
                               unipts_search_rescore_top=2, unipts_search_rescore_steps=5, progress=False)
    search = result.report["allocation_search"]
    rescored = search["rescored"]
    assert rescored[0]["label"] == "erk" and 2 <= len(rescored) <= 3
    best = max(rescored, key=lambda r: r["after_distillation"])
    assert search["best"] == best["label"]
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(0.8 * total)


def test_distillation_before_scoring_helps_and_leaves_the_next_candidate_untouched(tiny_cnn, calib_images):
    from ptsparse.allocation import AllocationContext

    student = copy.deepcopy(tiny_cnn)
    targets = find_targets(student)
    context = AllocationContext(student, targets, as_calibration(calib_images), batch_size=16, device="cpu")
    evaluate = FitnessEvaluator(context, bn_samples=16, fit_samples=16)
    counts = {t.name: int(0.8 * t.numel) for t in targets}
    one_shot = evaluate(counts)
    assert evaluate.after_distillation(counts, steps=20, lr=0.05)[0] > one_shot[0]
    assert evaluate(counts) == one_shot  # every candidate starts from the dense weights again


def test_unipts_parts_switch_off_and_refuse_channel_patterns():
    config = ptsparse.SparsityConfig.from_dict({"method": "unipts", "allocation": "erk", "objective": "kd_logits",
                                                "dynamics": "static"})
    assert (config.allocation, config.objective, config.dynamics, config.recovery) == (
        "erk", "kd_logits", "static", "distill")
    with pytest.raises(IncompatibleOptionsError, match="unipts_search.*channel"):
        ptsparse.SparsityConfig.from_dict({"method": "unipts", "pattern": "channel"})
    with pytest.raises(IncompatibleOptionsError, match="dst.*2:4"):
        ptsparse.SparsityConfig.from_dict({"method": "unipts", "allocation": "erk", "pattern": "2:4"})
    with pytest.raises(ConfigError, match="search_fitness 'best'"):
        ptsparse.SparsityConfig.from_dict({"method": "unipts", "search_fitness": "best"})


def test_search_honours_layer_caps(tiny_cnn, calib_images):
    layers = [LayerBudget(l.name, l.shape, 0.2 if l.name == "fc" else 1.0) for l in budgets_of(tiny_cnn)]
    context = AllocationContext(tiny_cnn, find_targets(tiny_cnn), as_calibration(calib_images), batch_size=16)
    search = ReducingRegrowingSearch(population=4, generations=1, parents=2, elites=1, bn_samples=16, fit_samples=16)
    ratios = search.allocate(layers, 0.7, context=context)
    assert ratios["fc"] <= 0.2 + 1e-9
    assert sum(round(ratios[l.name] * l.numel) for l in layers) == target_count(layers, 0.7)
