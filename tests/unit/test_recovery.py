"""Recovery engine: schedule, parameter groups, objectives, distillation with resume, layer-wise reconstruction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptsparse
from ptsparse.data import as_calibration
from ptsparse.errors import CheckpointError
from ptsparse.masking import attach_masks, mask_of
from ptsparse.patterns import Unstructured
from ptsparse.recovery import Gradual, KDLogits, LayerMSE, Static, TrainSchedule, distill, reconstruct_layers
from ptsparse.recovery.gradual import cubic_fraction
from ptsparse.recovery.layerwise import correct_bias, correct_weights
from ptsparse.recovery.thresholds import LearnedThresholds
from ptsparse.recovery.trainer import CHECKPOINT_NAME, batch_at, parameter_groups, warmup_cosine
from ptsparse.targets import find_targets


def test_warmup_then_cosine_to_zero():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_only_on_weights(tiny_cnn):
    decay, no_decay = parameter_groups(tiny_cnn, 3e-4)
    assert decay["weight_decay"] == 3e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tiny_cnn.parameters()))


def test_weight_decay_scope_all_decays_biases_and_norms_but_never_learned_scores(tiny_cnn):
    student = copy.deepcopy(tiny_cnn)
    targets = find_targets(student)
    attach_masks(targets, {t.name: torch.ones_like(t.weight, dtype=torch.bool) for t in targets})
    LearnedThresholds(0.5).prepare(student, targets)
    scores = {id(t.module.parametrizations.weight[0].score) for t in targets}
    decay, no_decay = parameter_groups(student, 3e-4, "all")
    assert {id(p) for p in no_decay["params"]} == scores
    assert any(p.dim() == 1 for p in decay["params"])  # biases and BatchNorm affine parameters


@pytest.mark.parametrize("augment", ["crop", "flip_crop"])
def test_random_crop_shifts_each_image_within_its_padding_and_is_seeded(augment):
    images = torch.arange(4 * 16 * 16, dtype=torch.float32).view(4, 1, 16, 16) + 1
    schedule = TrainSchedule(iterations=4, batch_size=4, augment=augment)
    calibration = as_calibration(images)
    first, again = batch_at(calibration, 1, schedule), batch_at(calibration, 1, schedule)
    assert torch.equal(first, again) and first.shape == images.shape
    plain = batch_at(calibration, 1, TrainSchedule(iterations=4, batch_size=4))
    assert not torch.equal(first, plain)
    for crop, image in zip(first, plain):  # every crop is the image moved by at most 2 pixels (16 / 8), zero-filled
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if any(torch.equal(crop, shifted(candidate, dy, dx)) for candidate in (image, image.flip(-1)))]
        assert shifts


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)] = \
        image[..., max(0, dy): h - max(0, -dy), max(0, dx): w - max(0, -dx)]
    return out


def test_kd_logits_matches_formula_and_is_zero_at_the_teacher():
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    kd = KDLogits(temperature=4.0)
    expected = (F.softmax(teacher / 4, 1) * (F.log_softmax(teacher / 4, 1) - F.log_softmax(student / 4, 1))).sum(1)
    assert kd(student, teacher, {}, {})["loss"] == pytest.approx(float(expected.mean() * 16), rel=1e-5)
    assert float(kd(teacher, teacher, {}, {})["loss"]) == pytest.approx(0.0, abs=1e-6)


def test_layer_mse_sums_layers():
    a, b = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    terms = LayerMSE()(None, None, {"x": a, "y": a}, {"x": b, "y": a})
    assert float(terms["loss"]) == pytest.approx(3.0)  # 3 channels of squared error 1, layer y exact


def masked_student(model: nn.Module, sparsity: float = 0.7):
    student = copy.deepcopy(model)
    targets = find_targets(student)
    for target in targets:
        count = round(sparsity * target.numel)
        attach_masks([target], {target.name: Unstructured().mask(target.weight.detach().abs(), count)})
    return student, targets


class StopAt(Static):
    """Static masks that interrupt the run after a given step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.stop = step

    def after_step(self, state) -> None:
        if state.step == self.stop:
            raise KeyboardInterrupt


def run(model, calib, schedule, dynamics=None, **kwargs):
    student, targets = masked_student(model)
    history = distill(student, copy.deepcopy(model), targets, calib, schedule, KDLogits(), dynamics or Static(),
                      **kwargs)
    return student, targets, history


def test_distill_lowers_the_loss_and_keeps_masks(tiny_cnn, calib_images):
    calib = as_calibration(calib_images)
    schedule = TrainSchedule(iterations=40, batch_size=16, lr=0.05, warmup_iterations=2)
    before, targets = masked_student(tiny_cnn)
    masks = {t.name: mask_of(t.module).clone() for t in targets}
    student, targets, history = run(tiny_cnn, calib, schedule)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    for target in targets:
        assert torch.equal(mask_of(target.module), masks[target.name])
        assert torch.equal(target.weight == 0, ~masks[target.name] | (target.weight == 0))


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_cnn, calib_images, tmp_path):
    calib = as_calibration(calib_images)
    schedule = TrainSchedule(iterations=20, batch_size=16, lr=0.05, warmup_iterations=3, augment="flip",
                             checkpoint_every=5)
    straight, _, straight_history = run(tiny_cnn, calib, schedule)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cnn, calib, schedule, StopAt(13), checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    resumed, _, resumed_history = run(tiny_cnn, calib, schedule, checkpoint_dir=tmp_path, resume=True)
    expected = straight.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())
    assert resumed_history == straight_history


def test_checkpoint_of_another_run_is_refused(tiny_cnn, calib_images, tmp_path):
    calib = as_calibration(calib_images)
    schedule = TrainSchedule(iterations=10, batch_size=16, checkpoint_every=5)
    run(tiny_cnn, calib, schedule, checkpoint_dir=tmp_path)
    other = TrainSchedule(iterations=10, batch_size=16, lr=0.5, checkpoint_every=5)
    with pytest.raises(CheckpointError, match="other settings"):
        run(tiny_cnn, calib, other, checkpoint_dir=tmp_path, resume=True)


def test_weight_correction_follows_pot_formula():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    dense = layer.weight.detach().clone().flatten(1)
    attach_masks(find_targets(layer), {"": Unstructured().mask(layer.weight.detach().abs(), 60)})
    mask = mask_of(layer).flatten(1)
    correct_weights(layer)
    ratio = dense.std(1) / ((dense * mask).std(1) + 1e-9)
    shift = dense.mean(1) - (ratio[:, None] * dense * mask).mean(1)
    stored = layer.parametrizations.weight.original.detach().flatten(1)
    assert torch.allclose(stored, ratio[:, None] * dense + shift[:, None], atol=1e-6)
    assert (layer.weight[~mask_of(layer)] == 0).all()
    assert (ratio > 1).all()  # pruning small weights lowers the spread; correction scales the rest up


def test_bias_correction_matches_dense_mean_output():
    torch.manual_seed(0)
    dense = nn.Linear(16, 4)
    sparse = copy.deepcopy(dense)
    attach_masks(find_targets(sparse), {"": Unstructured().mask(sparse.weight.detach().abs(), 48)})
    x = torch.randn(100, 16) + 1.0
    with torch.no_grad():
        correct_bias(sparse, x, dense(x), batch_size=32)
        assert torch.allclose(sparse(x).mean(0), dense(x).mean(0), atol=1e-5)


def test_layerwise_reconstruction_lowers_output_error():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    x = torch.randn(64, 2, 8, 8)
    calib = as_calibration(x)

    def error(model):
        with torch.no_grad():
            return float((model(x) - dense(x)).pow(2).mean())

    plain, _ = masked_student(dense, 0.8)
    student, targets = masked_student(dense, 0.8)
    before = reconstruct_layers(copy.deepcopy(student), dense, find_targets(copy.deepcopy(student)), calib,
                                iterations=1, lr_weight=0.0, lr_bias=0.0, batch_size=64, weight_correction=False,
                                bias_correction=False)
    after = reconstruct_layers(student, dense, targets, calib, iterations=300, lr_weight=1e-2, lr_bias=1e-2,
                               batch_size=16)
    assert all(after[name] < before[name] for name in after), (before, after)
    assert after["2"] < 0.6 * before["2"]  # the first layer keeps ~4 of 18 weights per filter: little to gain
    assert error(student) < error(plain)
    for target in targets:
        assert int((target.weight == 0).sum()) >= round(0.8 * target.numel)


def test_sparsify_with_distillation_and_layerwise_keeps_exact_sparsity(tiny_cnn, calib_images, tmp_path):
    for overrides in ({"method": "magnitude_kd", "iterations": 8}, {"method": "pot", "layer_iterations": 5}):
        result = ptsparse.sparsify(tiny_cnn, calib_images, sparsity=0.8, progress=False,
                                   checkpoint_dir=tmp_path, **overrides)
        zeros = sum(int((t.weight == 0).sum()) for t in find_targets(result.model))
        total = sum(t.numel for t in find_targets(result.model))
        assert zeros == round(0.8 * total), overrides
        assert result.report["recovery"]["kind"] in ("distill", "layerwise")
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    assert math.isfinite(result.report["recovery"]["layer_losses"]["fc"])


def test_cubic_schedule_starts_at_initial_and_reaches_one_at_the_end():
    assert cubic_fraction(0, 100, 0.0) == 0.0
    assert cubic_fraction(0, 100, 0.2) == pytest.approx(0.2)
    assert cubic_fraction(50, 100, 0.0) == pytest.approx(0.875)
    assert cubic_fraction(100, 100, 0.0) == cubic_fraction(150, 100, 0.0) == 1.0
    fractions = [cubic_fraction(step, 100, 0.0) for step in range(101)]
    assert fractions == sorted(fractions)


class Recorder(Gradual):
    """Gradual pruning that records each layer's pruned count after every step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.counts: list[dict[str, int]] = []

    def after_step(self, state) -> None:
        super().after_step(state)
        self.counts.append({name: int((~mask_of(module)).sum()) for name, module in self.layers})


def test_gradual_starts_dense_tightens_monotonically_and_ends_at_the_allocations_counts(tiny_cnn, calib_images):
    calib = as_calibration(calib_images)
    schedule = TrainSchedule(iterations=40, batch_size=16, lr=0.05, warmup_iterations=2)
    student, targets = masked_student(tiny_cnn)
    final = {t.name: int((~mask_of(t.module)).sum()) for t in targets}
    one_shot = {t.name: mask_of(t.module).clone() for t in targets}
    dynamics = Recorder(end=0.5, update_every=5)
    distill(student, copy.deepcopy(tiny_cnn), targets, calib, schedule, KDLogits(), dynamics)
    for target in targets:
        name = target.name
        history = [counts[name] for counts in dynamics.counts]
        assert history == sorted(history) and history[0] == 0 < history[4] < final[name]  # tightened every 5 steps
        assert history[19] == final[name] and history[-1] == final[name]  # final counts from step 20 on
        assert torch.equal(target.weight == 0, ~mask_of(target.module) | (target.weight == 0))
    # the masks are chosen along the way, not the pattern's one-shot masks
    assert any(not torch.equal(mask_of(t.module), one_shot[t.name]) for t in targets)
    assert 0 < dynamics.summary()["kept_changed"] < 1


def test_gradual_never_regrows_a_pruned_weight(tiny_cnn, calib_images):
    calib = as_calibration(calib_images)
    student, targets = masked_student(tiny_cnn)
    seen: list[dict[str, torch.Tensor]] = []

    class Watch(Gradual):
        def after_step(self, state) -> None:
            super().after_step(state)
            seen.append({name: mask_of(module).clone() for name, module in self.layers})

    distill(student, copy.deepcopy(tiny_cnn), targets, calib, TrainSchedule(iterations=20, batch_size=16), KDLogits(),
            Watch(end=0.8, update_every=2))
    for before, after in zip(seen, seen[1:]):
        assert all(not (after[name] & ~before[name]).any() for name in before)


def test_sparsify_with_gradual_dynamics_meets_the_target_exactly(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude_kd", dynamics="gradual", sparsity=0.8,
                               distill_iterations=10, batch_size=16, gradual_update_every=2)
    config = result.config
    assert ptsparse.sparsity_of(result.model, config) == pytest.approx(0.8, abs=1e-3)
    assert result.report["recovery"]["dynamics"] == "gradual"
