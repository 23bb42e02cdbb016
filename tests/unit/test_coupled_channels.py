"""Coupled channels under every channel criterion (issue 17, items 5 and 6): magnitude and Wanda, like Taylor, prune
the channels that layers share (a residual stream, a depthwise convolution and its input) together, planned per
unit, so the channel export removes every pruned channel and the target is met within one step of a unit."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.coupled import CoupledUnits
from ptsparse.graph.coupling import ChannelGroup
from ptsparse.models import load_reference

from ..conftest import largest_unit_step

pytest.importorskip("torch_pruning")

from ptsparse.export.channels import remove_channels  # noqa: E402

CRITERIA = ["magnitude", "wanda"]


def run(model: nn.Module, calib: torch.Tensor, criterion: str, allocation: str = "uniform"):
    return ptsparse.sparsify(model, calib, method=criterion, pattern="channel", allocation=allocation, sparsity=0.3,
                             batch_size=16, progress=False)


def assert_every_pruned_channel_removed(model: nn.Module, calib: torch.Tensor, result) -> None:
    error = abs(result.report["achieved_sparsity"] - result.report["target_sparsity"])
    assert error <= largest_unit_step(model, calib) / result.report["counted_params"]
    smaller, report = remove_channels(result.model, calib[:4])
    assert report["channels_removed"] > 0 and report["zeroed_channels_kept"] == 0
    with torch.no_grad():
        expected = result.model.eval()(calib)
        assert torch.allclose(smaller(calib), expected, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("allocation", ["uniform", "erk"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_reference_export_removes_every_pruned_channel(criterion, allocation):
    model, calib = load_reference(), torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = run(model, calib, criterion, allocation)  # ERK gives a residual stream's members different ratios
    assert_every_pruned_channel_removed(model, calib, result)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v2"])
def test_torchvision_export_removes_every_pruned_channel(architecture, criterion):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, architecture)(num_classes=10).eval()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_every_pruned_channel_removed(model, calib, run(model, calib, criterion))


def test_a_unit_weighs_its_members_alike_whatever_their_scale():
    group = ChannelGroup(3, {"small": (0, 1, 2), "large": (2, 1, 0)})  # "large" holds unit channel 0 in its row 2
    small = torch.tensor([1.0, 2.0, 6.0])[:, None].expand(3, 4)
    large = 1e6 * torch.tensor([1.0, 3.0, 2.0])[:, None].expand(3, 4)  # unit channels 2, 1, 0: 2e6, 3e6, 1e6
    units = CoupledUnits([group])
    planned = units.score({"small": small, "large": large}, comparable=False)
    # each member's channel scores divided by their mean (3 and 2e6), summed: unit channel 0 scores lowest, where
    # the raw sums would follow "large" alone (channel 2 lowest)
    unit = torch.tensor([1 / 3 + 1, 2 / 3 + 3 / 2, 2 + 1 / 2])
    assert torch.allclose(planned["small"][:, 0], unit * 3)  # each member's rows: the unit's score on its scale
    assert torch.allclose(planned["large"][:, 0], unit.flip(0) * 2e6)
    keep = units.mask("large", torch.Size([3, 4]), 4)  # one channel: unit channel 0, row 2 of "large"
    assert keep[:, 0].tolist() == [True, True, False] and units.mask("small", torch.Size([3, 4]), 4)[:, 0].tolist() \
        == [False, True, True]


def test_a_model_torch_pruning_cannot_trace_is_pruned_layer_by_layer_with_a_warning(caplog):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()  # its channel shuffle stops torch-pruning
    with caplog.at_level(logging.WARNING, logger="ptsparse.coupled"):
        result = ptsparse.sparsify(model, torch.randn(4, 3, 16, 16), method="magnitude", pattern="channel",
                                   sparsity=0.3, progress=False)
    assert result.report["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert any("pruned layer by layer" in record.getMessage() for record in caplog.records)
