"""Channel pruning on architectures beyond plain convolution chains (issue 17): grouped convolutions (ResNeXt,
RegNet), an operation torch-pruning cannot trace (ShuffleNet's channel shuffle), a bounded coupling analysis
on a Swin block (its relative position bias; Swin v2's logit scale and position bias MLP), MaxVit's attention
(traced through a stand-in), a ViT's nn.MultiheadAttention, and output checks that float32 rounding alone would
fail (inception_v3)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.errors import ConfigError, ExportError

pytest.importorskip("torch_pruning")

from ptsparse.export.channels import remove_channels  # noqa: E402


class GroupedBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1, grouped 3x3 (4 groups), 1x1, added to the stem's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.reduce, self.reduce_bn = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.grouped, self.grouped_bn = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.expand, self.expand_bn = nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.reduce_bn(self.reduce(x)))
        y = torch.relu(self.grouped_bn(self.grouped(y)))
        return self.fc(torch.relu(x + self.expand_bn(self.expand(y))).mean((2, 3)))


def test_grouped_convolution_prunes_the_same_offsets_in_every_group_and_exports() -> None:
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 8, 8)
    result = ptsparse.sparsify(GroupedBlock().eval(), calib, method="taylor", pattern="channel", sparsity=0.3,
                               progress=False)
    pruned = result.model.grouped.weight.flatten(1).eq(0).all(1).view(4, 8)  # (group, offset)
    assert pruned.any() and bool((pruned == pruned[0]).all())  # the same offsets in all 4 groups
    smaller, report = remove_channels(result.model, calib[:4])
    assert smaller.grouped.groups == 4 and smaller.grouped.in_channels < 32 and smaller.grouped.out_channels < 32
    assert smaller.grouped.out_channels % 4 == 0 and smaller.grouped.in_channels % 4 == 0
    with torch.no_grad():
        expected = result.model.eval()(calib)
        assert torch.allclose(smaller(calib), expected, atol=1e-5 * float(expected.abs().max()))
    assert report["max_relative_difference"] < 1e-5


def test_untraceable_model_is_refused_in_one_line_naming_where_before_scoring(monkeypatch) -> None:
    torchvision = pytest.importorskip("torchvision")
    from ptsparse.criteria.taylor import Taylor

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()  # its channel shuffle stops torch-pruning
    monkeypatch.setattr(Taylor, "_gate", staticmethod(lambda *a: pytest.fail("gradients computed before the refusal")))
    with pytest.raises(ExportError) as caught:
        ptsparse.sparsify(model, torch.randn(4, 3, 16, 16), method="taylor", pattern="channel", sparsity=0.3,
                          progress=False)
    message = str(caught.value)
    assert "\n" not in message and "cannot trace the model at the operation after 'stage" in message


SWIN_GROUPS = """
import torch
from torchvision.models.swin_transformer import SwinTransformer
from ptsparse.graph.coupling import channel_groups
model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                        num_classes=10).eval()
print(len(channel_groups(model, torch.randn(2, 3, 32, 32))))
"""


def bounded_run(script: str) -> subprocess.CompletedProcess:
    """Runs ``script`` in a Python child limited to 5 GB of address space (importing torch maps ~3 GB)."""
    limit = 5 * 2**30

    def bounded() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-c", script], preexec_fn=bounded, capture_output=True, text=True,
                          timeout=120)


def test_swin_coupling_analysis_stays_bounded() -> None:
    pytest.importorskip("torchvision")
    done = bounded_run(SWIN_GROUPS)  # the unbounded grouping exhausts 6 GB
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    assert int(done.stdout.split()[-1]) > 0


SWIN_V2_ROUND_TRIP = """
import tempfile, warnings
from pathlib import Path
import torch
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
import ptsparse
from ptsparse.export import export_model
from ptsparse.graph.coupling import score_terms

def tiny():
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, num_classes=10).eval()

model, calib = tiny(), torch.randn(16, 3, 32, 32)
names = {id(p): n.split(".attn.")[-1] for n, p in model.named_parameters()}
print(sorted({names[id(p)] for p in score_terms(model, calib[:2])}))
warnings.simplefilter("ignore")
# the MLPs' hidden channels are all that can go (the residual stream feeds LayerNorms, q/k/v run through F.linear)
result = ptsparse.sparsify(model, calib, method="taylor", pattern="channel", sparsity=0.2, progress=False)
with tempfile.TemporaryDirectory() as directory:
    report = export_model(result.model, "channels", Path(directory) / "swin.safetensors", input_shape=(3, 32, 32))
    reloaded = ptsparse.load(Path(directory) / "swin.safetensors", model=tiny())
with torch.no_grad():
    expected = result.model.eval()(calib)
    difference = float((reloaded(calib) - expected).abs().max() / expected.abs().max())
print(report["channels_removed"] - report["zeroed_channels_kept"], reloaded.features[1][0].mlp[0].out_features,
      difference)
"""


def test_swin_v2_score_terms_are_left_out_so_its_coupling_stays_bounded_and_round_trips() -> None:
    pytest.importorskip("torchvision")
    done = bounded_run(SWIN_V2_ROUND_TRIP)  # with its logit scale and position bias MLP traced: MemoryError
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    terms, result = done.stdout.strip().splitlines()[-2:]
    assert terms == "['cpb_mlp.0.bias', 'cpb_mlp.0.weight', 'cpb_mlp.2.weight', 'logit_scale']"
    removed, hidden, difference = result.split()
    assert int(removed) > 0 and int(hidden) < 64 and float(difference) < 1e-5


def tiny_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=4, block_channels=[16, 32], block_layers=[1, 1],
                  head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()


def test_maxvit_attention_is_traced_through_its_stand_in_and_round_trips(tmp_path) -> None:
    pytest.importorskip("torchvision")
    from ptsparse.export import export_model

    torch.manual_seed(0)
    calib = torch.randn(16, 3, 32, 32)
    result = ptsparse.sparsify(tiny_maxvit(), calib, method="taylor", pattern="channel", sparsity=0.3, progress=False)
    report = export_model(result.model, "channels", tmp_path / "maxvit.safetensors", input_shape=(3, 32, 32))
    reloaded = ptsparse.load(tmp_path / "maxvit.safetensors", model=tiny_maxvit())
    block = reloaded.blocks[0].layers[0].layers
    assert block.MBconv.layers.conv_a[0].out_channels < 64 and block.window_attention.mlp_layer[1].out_features < 64
    attention = block.window_attention.attn_layer[1]  # its forward reshapes to its input width: the heads stay
    assert (attention.n_heads, attention.to_qkv.out_features, attention.merge.in_features) == (2, 48, 16)
    assert "forward" not in vars(attention)  # the stand-in lasted the trace only
    with torch.no_grad():
        expected = result.model.eval()(calib)
        assert torch.allclose(reloaded(calib), expected, atol=1e-5 * float(expected.abs().max()))
    assert report["max_relative_difference"] < 1e-5
    # to_qkv roots no group (its rows cannot be removed), so it stays dense: no zeroed channel is left behind
    qkv = [m for n, m in result.model.named_modules() if n.endswith("to_qkv")]
    assert qkv and not any(m.weight.eq(0).all(1).any() for m in qkv)
    assert report["zeroed_channels_kept"] == 0 and result.report["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)


def test_attention_whose_channels_torch_pruning_loses_is_refused_in_one_line_before_scoring(monkeypatch) -> None:
    pytest.importorskip("torchvision")
    from ptsparse.criteria.taylor import Taylor
    from ptsparse.graph import coupling

    # without its stand-in, torch-pruning maps the 48 rows of MaxVit's to_qkv through its attention onto 50 channels
    monkeypatch.setattr(coupling, "OPAQUE_ATTENTION", ())
    monkeypatch.setattr(Taylor, "_gate", staticmethod(lambda *a: pytest.fail("gradients computed before the refusal")))
    with pytest.raises(ExportError) as caught:
        ptsparse.sparsify(tiny_maxvit(), torch.randn(4, 3, 32, 32), method="taylor", pattern="channel", sparsity=0.3,
                          progress=False)
    message = str(caught.value)
    assert "\n" not in message and "cannot trace the model at layer 'blocks." in message and "to_qkv'" in message


class Cancelling(nn.Module):
    """Logits that are small differences of large activations (every channel near 1e4), as deep random-weight
    networks give (inception_v3): float32 rounding alone moves them by more than 1e-4 of their scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            self.bn.bias.fill_(1e4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_channel_removal_judges_float32_rounding_in_float64() -> None:
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 8, 8)
    model = ptsparse.sparsify(Cancelling().eval(), calib, method="taylor", pattern="channel", sparsity=0.3,
                              progress=False).model.eval()
    with torch.no_grad():  # the logits cancel down to the samples' deviations from the mean activation
        model.fc.bias.copy_(-model.fc.weight @ model.features(calib).double().mean(0).float())
    smaller, report = remove_channels(model, calib)
    assert smaller.conv.out_channels < 64 and report["max_relative_difference"] < 1e-10
    with torch.no_grad():
        expected = model(calib)
        rounding = float((smaller(calib) - expected).abs().max() / expected.abs().max())
    assert rounding > 1e-4  # what the float32 comparison refused


def test_vision_transformer_round_trips_with_its_multihead_attention_whole(tmp_path) -> None:
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    from ptsparse.export import export_model

    def vit() -> nn.Module:
        return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                                 num_classes=10).eval()

    torch.manual_seed(0)
    model = vit()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: every output would be 0
    calib = torch.randn(16, 3, 32, 32)
    # the MLPs' hidden channels are what can go (0.115 of the weights, each MLP keeping one): the residual stream
    # feeds LayerNorms
    with pytest.raises(ConfigError, match="sparsity 0.3 is infeasible: the layer caps allow at most 0.114754"):
        ptsparse.sparsify(model, calib, method="taylor", pattern="channel", sparsity=0.3, progress=False)
    result = ptsparse.sparsify(model, calib, method="taylor", pattern="channel", sparsity=0.1, progress=False)
    report = export_model(result.model, "channels", tmp_path / "vit.safetensors", input_shape=(3, 32, 32))
    reloaded = ptsparse.load(tmp_path / "vit.safetensors", model=vit())
    assert reloaded.encoder.layers[0].mlp[0].out_features < 64 and report["channels_removed"] > 0
    assert report["zeroed_channels_kept"] == 0  # nothing pruned that stays computed
    attention = reloaded.encoder.layers[0].self_attention  # packed in_proj_weight: no head layout, kept whole
    assert (attention.embed_dim, attention.num_heads, tuple(attention.in_proj_weight.shape)) == (32, 4, (96, 32))
    with torch.no_grad():
        expected = result.model.eval()(calib)
        assert float(expected.abs().max()) > 0.1
        assert torch.allclose(reloaded(calib), expected, atol=1e-5 * float(expected.abs().max()))
