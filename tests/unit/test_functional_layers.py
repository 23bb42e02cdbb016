"""Linear layers that their parent applies through F.linear (torchvision's Swin attention): seen as calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptsparse
from ptsparse.allocation.knapsack import ChannelCosts
from ptsparse.graph.calls import layers_called_through
from ptsparse.graph.cost import count_macs


class FunctionalAttention(nn.Module):
    """Applies its children's weights as Swin's attention does: ``F.linear`` with ``self.qkv.weight``, the keys'
    bias zeroed on a copy as in Swin V2."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.qkv.bias.clone()
        bias[self.proj.in_features:2 * self.proj.in_features] = 0
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return F.linear(q.sigmoid() * k + v, self.proj.weight, self.proj.bias)


def test_a_functional_call_runs_as_a_call_of_the_layer_with_the_same_result() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), FunctionalAttention())
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(i[0].shape))))
    x = torch.randn(2, 5, 4)
    expected = model(x)
    assert [name for name, _ in seen] == ["0"]  # the hooks on qkv and proj never run
    seen.clear()
    with layers_called_through(model):
        output = model(x)
    assert seen == [("0", (2, 5, 4)), ("1.qkv", (2, 5, 8)), ("1.proj", (2, 5, 8))]
    torch.testing.assert_close(output, expected)  # the copied bias is applied as given
    seen.clear()
    model(x)
    assert [name for name, _ in seen] == ["0"]  # back to plain calls on exit


def tiny_swin(v2: bool = False) -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10, **extra).eval()


@pytest.mark.parametrize("v2", [False, True])
def test_swin_macs_count_the_attention_projections(v2: bool) -> None:
    pytest.importorskip("torchvision")
    model = tiny_swin(v2)
    # 32 x 32 inputs: 8 x 8 tokens of width 16, then 4 x 4 of width 32; MLPs 4x wide.
    block = (lambda tokens, c: tokens * (c * 3 * c + c * c + 2 * c * 4 * c))
    expected = 64 * 16 * 48 + 2 * block(64, 16) + 16 * 64 * 32 + 2 * block(16, 32) + 32 * 10
    if v2:  # each block's position-bias MLP (2 -> 512 -> heads) on the 7 x 7 relative offsets
        expected += sum(49 * (2 * 512 + 512 * heads) for heads in (2, 2, 4, 4))
    example = torch.randn(2, 3, 32, 32)
    assert count_macs(model, example)["macs"] == expected
    targets = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert ChannelCosts.trace(model, targets, example).dense_cost == expected


def test_wanda_scores_a_functionally_applied_layer_on_its_inputs() -> None:
    torch.manual_seed(0)
    attention = FunctionalAttention()
    with torch.no_grad():
        attention.qkv.weight.copy_(torch.randn(24, 8).sign())  # equal magnitudes: the inputs decide
    model = nn.Sequential(attention, nn.Linear(8, 4))
    scales = torch.tensor([1.0, 8, 2, 7, 3, 6, 4, 5])
    calib = torch.randn(64, 3, 8) * scales
    result = ptsparse.sparsify(model, calib, method="wanda", sparsity=0.5, progress=False)
    kept = result.model[0].qkv.weight.ne(0)
    assert torch.equal(kept, torch.tensor([False, True, False, True, False, True, False, True]).expand(24, 8))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_swin_attention_is_pruned_on_its_inputs(method: str) -> None:
    pytest.importorskip("torchvision")
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = ptsparse.sparsify(tiny_swin(), calib, method=method, sparsity=0.5, progress=False)
    attention = {name: m.weight.detach() for name, m in result.model.named_modules()
                 if name.endswith(("attn.qkv", "attn.proj"))}
    assert len(attention) == 8
    for name, weight in attention.items():
        zero = weight == 0
        assert zero.float().mean() == 0.5, name
        # scored on no inputs, Wanda's ties cut whole input columns and SparseGPT whole rows
        assert not zero.all(0).any() and not zero.all(1).any(), name


class UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux, self.head = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).relu())  # aux never runs


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_that_never_runs_stays_dense_under_a_criterion_of_its_inputs(method: str, caplog) -> None:
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="ptsparse"):
        result = ptsparse.sparsify(UnusedBranch(), torch.randn(64, 16), method=method, sparsity=0.5, progress=False)
    aux = result.model.aux.weight
    assert aux.count_nonzero() == aux.numel()  # scored on no inputs, ties would choose its mask
    assert "1 layers stay dense" in caplog.text and "aux" in caplog.text
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)  # met on the other layers


def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # zero-initialised
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_multihead_attention_out_proj_is_pruned_on_its_inputs(method: str) -> None:
    pytest.importorskip("torchvision")
    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = ptsparse.sparsify(tiny_vit(), calib, method=method, sparsity=0.5, progress=False)
    for layer in result.model.encoder.layers:
        zero = layer.self_attention.out_proj.weight == 0
        assert zero.float().mean() == 0.5
        # nn.MultiheadAttention computes with out_proj's weight itself: unseen, ties cut whole columns or rows
        assert not zero.all(0).any() and not zero.all(1).any()


def test_multihead_attention_macs_count_its_projections() -> None:
    pytest.importorskip("torchvision")
    model = tiny_vit()
    tokens = 2 * 2 + 1  # the patches and the class token
    layer = tokens * (4 * 32 * 32 + 2 * 32 * 64)  # q, k, v and out; the MLP
    expected = 4 * 32 * 3 * 8 * 8 + 2 * layer + 32 * 10
    example = torch.randn(2, 3, 16, 16)
    assert count_macs(model, example)["macs"] == expected
    targets = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert ChannelCosts.trace(model, targets, example).dense_cost == expected


def test_layers_that_tie_one_weight_are_each_counted_once() -> None:
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    assert count_macs(nn.Sequential(first, second), torch.randn(2, 8))["macs"] == 2 * 8 * 8
