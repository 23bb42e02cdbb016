"""FCPTS parts: the bridge, learned-threshold dynamics, the exact projection, block objectives, the preset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.allocation import ERK, LayerBudget, exact_counts, target_count
from ptsparse.blocks import find_blocks
from ptsparse.cli import main
from ptsparse.data import as_calibration
from ptsparse.errors import ConfigError, IncompatibleOptionsError
from ptsparse.masking import attach_masks, mask_of
from ptsparse.models import reference_resnet
from ptsparse.patterns import Unstructured
from ptsparse.recovery import KDBlocks, KDLogits, LearnedThresholds, ThresholdMask, TrainSchedule, TrainState, distill
from ptsparse.recovery.bridge import GaussianKDE, HistogramDensity, layer_sparsity
from ptsparse.recovery.trainer import CHECKPOINT_NAME
from ptsparse.targets import count_zeros, find_targets


def weights(n: int = 5000, seed: int = 0) -> torch.Tensor:
    return 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("estimator", [lambda w: HistogramDensity(w, 100), lambda w: GaussianKDE(w, 65536)],
                         ids=["histogram", "kde"])
@pytest.mark.parametrize("t", [0.013, 0.041, 0.09])
def test_bridge_gradient_matches_finite_difference_of_smoothed_sparsity(estimator, t):
    w = weights()
    density = estimator(w)
    threshold = torch.tensor(t, requires_grad=True)
    sparsity = layer_sparsity(w, threshold, density)
    sparsity.backward()
    eps = 1e-5
    finite = (density.mass_within(t + eps) - density.mass_within(t - eps)) / (2 * eps)
    assert float(threshold.grad) == pytest.approx(finite, rel=2e-3)
    assert float(sparsity.detach()) == pytest.approx(float((w.abs() <= t).float().mean()))  # forward: the exact count
    assert density.mass_within(t) == pytest.approx(float(sparsity.detach()), abs=0.02)  # smoothing stays close to it


def test_histogram_density_integrates_to_one_and_vanishes_outside():
    w = weights()
    density = HistogramDensity(w, 100)
    assert float(density.heights.sum() * density.width) == pytest.approx(1.0)
    assert float(density.pdf(torch.tensor([w.max() + 0.01, w.min() - 0.01])).abs().sum()) == 0.0
    assert density.mass_within(float(w.abs().max())) == pytest.approx(1.0)


def test_kde_subsamples_large_layers_reproducibly():
    w = weights(100_000)
    a = GaussianKDE(w, 1000, torch.Generator().manual_seed(3))
    b = GaussianKDE(w, 1000, torch.Generator().manual_seed(3))
    assert a.samples.numel() == 1000 and torch.equal(a.samples, b.samples)
    assert a.bandwidth == pytest.approx(1.06 * float(a.samples.std()) * 1000 ** -0.2)


def test_threshold_mask_gradients_constraint_only_and_straight_through():
    torch.manual_seed(0)
    for straight_through in (False, True):
        layer = nn.Linear(16, 8)
        mask = ThresholdMask(torch.logit(torch.tensor(0.1)).item(), straight_through=straight_through)
        nn.utils.parametrize.register_parametrization(layer, "weight", mask)
        layer(torch.randn(4, 16)).pow(2).sum().backward()
        original = layer.parametrizations.weight.original
        kept = original.abs() > 0.1
        if straight_through:
            assert mask.score.grad is not None and float(mask.score.grad) != 0.0
            assert (original.grad[~kept] != 0).any()  # pruned weights learn through the STE
        else:
            assert mask.score.grad is None  # only the sparsity penalty reaches the threshold
            assert (original.grad[~kept] == 0).all()


def masked(model: nn.Module, sparsity: float):
    """ERK magnitude masks at ``sparsity`` attached to a copy of ``model``, as ``sparsify`` would."""
    student = copy.deepcopy(model)
    targets = find_targets(student)
    budgets = [LayerBudget(t.name, tuple(t.shape)) for t in targets]
    counts = exact_counts(budgets, ERK().allocate(budgets, sparsity), target_count(budgets, sparsity))
    masks = {t.name: Unstructured().mask(t.weight.detach().abs(), counts[t.name]) for t in targets}
    attach_masks(targets, masks)
    return student, targets, budgets, masks


def state(student, targets, budgets, sparsity, step=0):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    return TrainState(student, targets, optimizer, step, 10, budgets, sparsity)


def test_thresholds_start_at_the_given_masks(tiny_cnn):
    student, targets, _, masks = masked(tiny_cnn, 0.8)
    LearnedThresholds(0.8).prepare(student, targets)
    for target in targets:
        assert torch.equal(target.weight != 0, masks[target.name])


def test_init_floor_starts_every_layer_pruning_so_its_threshold_can_move(tiny_cnn):
    student, targets, _, masks = masked(tiny_cnn, 0.0)  # nothing pruned: every threshold starts at ~1e-13
    dynamics = LearnedThresholds(0.5, init_floor=0.05)
    dynamics.prepare(student, targets)
    for target in targets:
        pruned = int((target.weight == 0).sum())
        assert pruned >= int(0.05 * target.numel)
        assert float(target.module.parametrizations.weight[0].threshold()) > 1e-6
    assert all(share >= 0.05 - 1 / t.numel for share, t in zip(dynamics.initial.values(), targets))


@pytest.mark.parametrize("shift", [-3.0, -0.5, 0.7, 4.0])
def test_projection_meets_the_target_exactly_from_any_start(tiny_cnn, shift):
    student, targets, budgets, _ = masked(tiny_cnn, 0.7)
    dynamics = LearnedThresholds(0.7)
    dynamics.prepare(student, targets)
    generator = torch.Generator().manual_seed(int(shift * 10) + 100)
    with torch.no_grad():
        for target in targets:  # thresholds far from the target, differently per layer
            score = target.module.parametrizations.weight[0].score
            score += shift + torch.randn((), generator=generator)
    dynamics.on_end(state(student, targets, budgets, 0.7))
    zeros, total = count_zeros(targets)
    assert zeros == round(0.7 * total)
    for target in targets:  # boolean masks again, pruning the smallest magnitudes of each layer
        mask = mask_of(target.module)
        magnitudes = target.module.parametrizations.weight.original.detach().abs()
        if (~mask).any() and mask.any():
            assert magnitudes[~mask].max() <= magnitudes[mask].min()
    assert dynamics.summary()["learned_allocation"].keys() == {t.name for t in targets}


def test_projection_honours_layer_caps(tiny_cnn):
    student, targets, budgets, _ = masked(tiny_cnn, 0.6)
    budgets = [LayerBudget(b.name, b.shape, 0.1 if b.name == "fc" else 1.0) for b in budgets]
    dynamics = LearnedThresholds(0.6)
    dynamics.prepare(student, targets)
    with torch.no_grad():
        for target in targets:
            target.module.parametrizations.weight[0].score.fill_(0.0)  # threshold 0.5 prunes nearly everything
    dynamics.on_end(state(student, targets, budgets, 0.6))
    zeros, total = count_zeros(targets)
    assert zeros == round(0.6 * total)
    fc = next(t for t in targets if t.name == "fc")
    assert int((fc.weight == 0).sum()) <= int(0.1 * fc.numel)


@pytest.mark.parametrize("penalty", ["abs", "pow2"])
@pytest.mark.parametrize("direction", [+1, -1])
def test_thresholds_move_toward_the_target(tiny_cnn, penalty, direction):
    """Masks at 0.5 with a target of 0.8 (too dense): thresholds rise; the reverse: they fall."""
    start, goal = (0.5, 0.8) if direction > 0 else (0.8, 0.5)
    student, targets, budgets, _ = masked(tiny_cnn, start)
    dynamics = LearnedThresholds(goal, penalty=penalty)
    dynamics.prepare(student, targets)
    scores = [t.module.parametrizations.weight[0].score for t in targets]
    optimizer = torch.optim.SGD(scores, lr=1.0)
    before = [float(s.detach()) for s in scores]
    terms = dynamics.loss_terms(state(student, targets, budgets, goal))
    assert float(terms["sparsity"]) == pytest.approx(start, abs=1e-3)
    terms["loss"].backward()
    optimizer.step()
    moved = [(float(s.detach()) - b) * direction for s, b in zip(scores, before)]
    assert all(m >= 0 for m in moved) and sum(m > 0 for m in moved) >= len(moved) // 2


def test_short_fcpts_run_lowers_the_distillation_loss_and_is_exact(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="fcpts", sparsity=0.8, iterations=40, batch_size=16,
                               lr=0.05, progress=False)
    history = result.report["recovery"]["history"]
    assert history[-1]["kd"] < 0.6 * history[0]["kd"]
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(0.8 * total)
    recovery = result.report["recovery"]
    assert recovery["dynamics"] == "learned_thresholds" and 0.0 < recovery["raw_sparsity"] < 1.0
    assert sum(result.report["layers"][i]["params"] * v for i, v in
               enumerate(recovery["learned_allocation"].values())) == pytest.approx(0.8 * total, abs=1)


def test_the_loss_moves_the_learned_allocation_away_from_its_start(tiny_cnn, calib_images):
    """With the straight-through score gradient the distillation loss reaches the thresholds: the per-layer
    sparsities leave the ERK start and end elsewhere than where the |S - S*| penalty alone (the papers'
    ``constraint_only``) takes them, while the total stays exact."""
    def allocation(score_grad: str) -> tuple[dict, dict]:
        result = ptsparse.sparsify(tiny_cnn, calib_images, method="fcpts", sparsity=0.8, distill_iterations=40,
                                   batch_size=16, distill_lr=0.05, progress=False,
                                   learned_thresholds_score_grad=score_grad)
        recovery = result.report["recovery"]
        return recovery["initial_allocation"], recovery["learned_allocation"]

    start, through_loss = allocation("ste")
    _, penalty_only = allocation("constraint_only")
    assert max(abs(through_loss[n] - start[n]) for n in start) > 0.02
    assert max(abs(through_loss[n] - penalty_only[n]) for n in start) > 0.02


def test_learned_thresholds_resume_equals_uninterrupted(tiny_cnn, calib_images, tmp_path):
    class StopAt(LearnedThresholds):
        def after_step(self, state) -> None:
            if state.step == 7:
                raise KeyboardInterrupt

    calib = as_calibration(calib_images)
    schedule = TrainSchedule(iterations=12, batch_size=16, lr=0.05, warmup_iterations=2, checkpoint_every=5)

    def run(dynamics, **kwargs):
        student, targets, budgets, _ = masked(tiny_cnn, 0.8)
        distill(student, copy.deepcopy(tiny_cnn), targets, calib, schedule, KDLogits(), dynamics, budgets=budgets,
                sparsity=0.8, **kwargs)
        return student

    straight = run(LearnedThresholds(0.8, density="kde"))
    with pytest.raises(KeyboardInterrupt):
        run(StopAt(0.8, density="kde"), checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    resumed = run(LearnedThresholds(0.8, density="kde"), checkpoint_dir=tmp_path, resume=True)
    expected = straight.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())


def test_blocks_are_found_in_residual_networks_and_can_be_named():
    model = reference_resnet()
    targets = find_targets(model)
    assert find_blocks(model, targets) == [f"stages.{s}.{b}" for s in range(3) for b in range(3)]
    assert find_blocks(model, targets, ["stages.2.*"]) == ["stages.2.0", "stages.2.1", "stages.2.2"]
    with pytest.raises(ConfigError, match="matches no module"):
        find_blocks(model, targets, ["layer9.*"])
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="name them with `blocks`"):
        find_blocks(mlp, find_targets(mlp))


def test_kd_blocks_adds_block_mse_to_the_logit_term():
    objective = KDBlocks(temperature=4.0)
    logits = torch.randn(4, 10)
    a, b = torch.ones(4, 3, 2, 2), torch.zeros(4, 3, 2, 2)
    terms = objective(logits, logits, {"x": a, "y": a}, {"x": b, "y": a})
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["block_mse"]) == pytest.approx(3.0) and float(terms["loss"]) == pytest.approx(3.0)


def test_kd_blocks_normalized_by_the_teacher_weighs_blocks_by_relative_error():
    logits = torch.randn(4, 10)
    teacher = {"small": torch.full((4, 3, 2, 2), 0.1), "large": torch.full((4, 3, 2, 2), 100.0)}
    student = {name: 1.1 * value for name, value in teacher.items()}  # 10% off in both blocks
    plain = KDBlocks()(logits, logits, student, teacher)["block_mse"]
    relative = KDBlocks(normalize="teacher")(logits, logits, student, teacher)["block_mse"]
    assert float(relative) == pytest.approx(2 * 0.01, rel=1e-4)
    assert float(plain) == pytest.approx(3 * (0.01 ** 2 + 10.0 ** 2), rel=1e-4)  # dominated by the large block


def test_kd_blocks_on_a_model_without_blocks_errors_or_falls_back_to_logits(tiny_mlp, caplog):
    mlp_inputs = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="name them with `blocks`"):
        ptsparse.sparsify(tiny_mlp, mlp_inputs, method="magnitude_kd", objective="kd_blocks", distill_iterations=2,
                          batch_size=16, progress=False)
    result = ptsparse.sparsify(tiny_mlp, mlp_inputs, method="magnitude_kd", objective="kd_blocks",
                               kd_blocks_no_blocks="logits", distill_iterations=2, batch_size=16, progress=False)
    history = result.report["recovery"]["history"]
    assert history[0]["block_mse"] == 0.0 and history[0]["loss"] == history[0]["kd"]
    assert "no blocks found" in caplog.text


def test_recommended_picks_the_relative_block_loss_and_runs_on_models_without_blocks(tiny_mlp):
    config = ptsparse.SparsityConfig.from_dict({"method": "recommended"})
    assert (config.allocation, config.criterion, config.recovery, config.objective, config.dynamics) == (
        "erk", "magnitude", "distill", "kd_blocks", "gradual")
    assert config.settings_of(KDBlocks).normalize == "teacher"
    for pattern in ("2:4", "channel"):  # masks that gradual magnitude pruning cannot tighten stay fixed
        assert ptsparse.SparsityConfig.from_dict({"method": "recommended", "pattern": pattern}).dynamics == "static"
    inputs = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    result = ptsparse.sparsify(tiny_mlp, inputs, method="recommended", sparsity=0.8, distill_iterations=3,
                               batch_size=16, progress=False)
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(0.8 * total)


def test_fcpts_with_block_loss_runs_on_named_blocks(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="fcpts", sparsity=0.7, iterations=6, batch_size=16,
                               objective="kd_blocks", blocks=["grouped", "pointwise"], progress=False)
    assert "block_mse" in result.report["recovery"]["history"][0]
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(0.7 * total)


@pytest.mark.parametrize("pattern", ["2:4", "channel"])
def test_fcpts_refuses_patterns_thresholds_cannot_express(pattern):
    with pytest.raises(IncompatibleOptionsError, match=f"learned_thresholds.*{pattern}"):
        ptsparse.SparsityConfig.from_dict({"method": "fcpts", "pattern": pattern})


def test_fcpts_options_are_validated_and_reach_the_cli(capsys):
    with pytest.raises(ConfigError, match="density 'gauss' is not allowed"):
        ptsparse.SparsityConfig.from_dict({"method": "fcpts", "density": "gauss"})
    with pytest.raises(IncompatibleOptionsError, match="needs recovery 'distill'"):
        ptsparse.SparsityConfig.from_dict({"method": "magnitude", "dynamics": "learned_thresholds"})
    assert main(["sparsify", "--method", "fcpts", "--pattern", "2:4", "--no-eval"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ptsparse: error:") and "\n" not in error
    config = ptsparse.SparsityConfig.from_dict({"method": "fcpts", "score_grad": "ste", "penalty": "pow2"})
    assert (config.dynamics, config.score_grad, config.penalty, config.density) == (
        "learned_thresholds", "ste", "pow2", "histogram")
