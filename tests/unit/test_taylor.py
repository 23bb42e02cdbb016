"""First-order Taylor channel importance: the BatchNorm gate form, the fallback, and its pattern rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import ptsparse
from ptsparse.data import as_calibration
from ptsparse.errors import IncompatibleOptionsError
from ptsparse.criteria import Taylor
from ptsparse.norms import following_norms
from ptsparse.targets import find_targets


def test_following_norms_are_found_by_tracing(tiny_cnn, calib_images):
    norms = following_norms(tiny_cnn, find_targets(tiny_cnn), calib_images[:2])
    assert norms == {"stem": tiny_cnn.bn, "pointwise": tiny_cnn.bn2}


class FreedOutput(nn.Module):
    """The conv's output is reduced to a scalar and freed; the BatchNorm reads a new tensor with as many channels,
    which CPython may place at the freed tensor's address (same ``id``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.conv(x).mean()
        return self.fc(self.bn(x * scale).mean((2, 3)))


def test_a_norm_reading_a_new_tensor_is_never_paired_with_a_freed_output():
    model = FreedOutput()
    for _ in range(20):
        assert following_norms(model, find_targets(model), torch.randn(2, 4, 8, 8)) == {}


def test_scores_equal_the_gate_formula_by_hand(tiny_cnn, calib_images):
    targets = find_targets(tiny_cnn)
    calibration = as_calibration(calib_images)
    scores = Taylor(batch_size=len(calib_images)).scores(tiny_cnn, targets, calibration)  # one batch

    logits = tiny_cnn(calib_images)
    F.cross_entropy(logits, logits.detach().argmax(1)).backward()
    bn = tiny_cnn.bn
    gate = bn.weight * bn.weight.grad + bn.bias * bn.bias.grad
    assert torch.allclose(scores["stem"][:, 0, 0, 0], gate.detach().pow(2), rtol=1e-4, atol=1e-12)
    fc = tiny_cnn.fc  # no BatchNorm after it: sum of w * dL/dw over the row, plus b * dL/db
    plain = (fc.weight * fc.weight.grad).sum(1) + fc.bias * fc.bias.grad
    assert torch.allclose(scores["fc"][:, 0], plain.detach().pow(2), rtol=1e-4, atol=1e-12)
    assert all(scores[t.name].shape == t.shape for t in targets)


def test_a_unit_sums_taylor_scores_as_they_are(tiny_cnn, calib_images):
    pytest.importorskip("torch_pruning")
    from ptsparse.coupled import CoupledUnits

    targets = find_targets(tiny_cnn)
    scores = Taylor(batch_size=len(calib_images)).scores(tiny_cnn, targets, as_calibration(calib_images))
    units = CoupledUnits.trace(tiny_cnn, targets, calib_images[:2], {})
    planned = units.score(scores, Taylor.comparable_scores)
    # the grouped conv (2 groups) ties stem channel c to c + 4: their unit scores the mean of the two
    tied = scores["stem"][:, 0, 0, 0].view(2, 4).mean(0).repeat(2)
    assert torch.equal(planned["stem"][:, 0, 0, 0], tied)
    # pointwise adds into grouped's output, which depthwise reads: one unit, its channels tied in pairs (c, c + 8)
    # by the grouped conv; a pair scores the sum over the three of the mean of its two rows
    stream = ["grouped", "depthwise", "pointwise"]
    pairs = sum(scores[name][:, 0, 0, 0].view(2, 8).mean(0) for name in stream).repeat(2)
    assert all(torch.allclose(planned[name][:, 0, 0, 0], pairs) for name in stream)


def test_scores_leave_the_model_as_it_was(tiny_cnn, calib_images):
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    Taylor().scores(tiny_cnn, find_targets(tiny_cnn), as_calibration(calib_images))
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    assert not tiny_cnn.training
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_taylor_preset_prunes_whole_channels(tiny_cnn, calib_images):
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="taylor", sparsity=0.5, progress=False)
    for target in find_targets(result.model):
        rows = target.weight.flatten(1)
        assert torch.equal((rows == 0).all(1), (rows == 0).any(1)), target.name
    # The grouped conv (2 groups) prunes channels in tied pairs, so each 8- or 16-channel layer prunes the nearest
    # whole pairs of its allocation (0.576, raised to make up for the protected fc): half its channels.
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=0.07)


def test_taylor_needs_the_channel_pattern():
    with pytest.raises(IncompatibleOptionsError, match="'unstructured'"):
        ptsparse.SparsityConfig(method="magnitude", criterion="taylor", pattern="unstructured")
