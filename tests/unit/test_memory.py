"""Memory savers: cached block inputs for layer-by-layer criteria, gradient checkpointing and bf16 distillation."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.criteria import CRITERIA, prune_model
from ptsparse.criteria.block_inputs import BlockInputs, find_chains
from ptsparse.data import as_calibration
from ptsparse.errors import ConfigError, IncompatibleOptionsError
from ptsparse.models import load_reference
from ptsparse.offload import Offload
from ptsparse.patterns import NM, Unstructured
from ptsparse.report import format_table
from ptsparse.targets import find_targets

from ..conftest import RecordingOffload


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference():
    return load_reference().eval()


def pruned(model: nn.Module, x: torch.Tensor, criterion: str, pattern=Unstructured(), offload=None, **options):
    """Masks and state of a copy of ``model`` pruned by ``criterion`` (60% per layer, or N:M); ``offload``: an
    :class:`Offload` class, whose ``of`` the copy is offloaded by (its list of runs is returned third)."""
    model = copy.deepcopy(model)
    targets = find_targets(model)
    if isinstance(pattern, NM):
        counts = {t.name: pattern.prune_count(t.shape) if pattern.eligible(t.shape) else 0 for t in targets}
    else:
        counts = {t.name: int(0.6 * t.numel) for t in targets}
    moves = offload.of(model, targets, "cpu") if offload is not None else None
    masks = prune_model(model, targets, counts, pattern, CRITERIA.get(criterion)(), as_calibration(x),
                        batch_size=16, offload=moves, **options)
    return masks, {k: v.detach().clone() for k, v in model.state_dict().items()}, moves


def assert_same(a, b) -> None:
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


# cached block inputs ------------------------------------------------------------------------------------

def test_reference_model_is_one_chain_of_its_blocks(reference):
    chains = find_chains(reference, find_targets(reference), as_calibration(randn(8, 1, 28, 28)))
    assert [c.names for c in chains] == [[f"stages.{s}.{b}" for s in range(3) for b in range(3)]]
    assert chains[0].index_of("stages.1.2.conv1") == 5 and chains[0].index_of("stem.0") is None


@pytest.mark.parametrize("criterion, pattern", [("wanda", Unstructured()), ("sparsegpt", Unstructured()),
                                                ("sparsegpt", NM(2, 4))])
def test_cached_block_inputs_give_the_masks_and_weights_of_full_passes(reference, criterion, pattern):
    x = randn(40, 1, 28, 28)
    cached = pruned(reference, x, criterion, pattern)
    assert_same(cached, pruned(reference, x, criterion, pattern, cache_block_inputs=False))
    assert_same(cached, pruned(reference, x, criterion, pattern, offload=Offload))


def test_block_passes_run_the_block_not_the_network(reference):
    stem_calls = []
    model = copy.deepcopy(reference)
    model.stem.register_forward_hook(lambda *args: stem_calls.append(1))
    targets = find_targets(model)
    prune_model(model, targets, {t.name: t.numel // 2 for t in targets}, Unstructured(), CRITERIA.get("wanda")(),
                as_calibration(randn(32, 1, 28, 28)), batch_size=16)
    # the stem conv's pass (its second batch stops inside the stem), the chain check, the capture of the
    # first block's inputs (2 batches), the classifier's pass (2); none for the 18 layers inside blocks
    assert len(stem_calls) == 1 + 1 + 2 + 2


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SkipFromFarBack(nn.Module):
    """Blocks where the third one also reads the first block's output: the chain breaks there."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoLayers() for _ in range(4))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        a = self.blocks[0](x)
        b = self.blocks[1](a)
        c = self.blocks[2](b + a)
        return self.head(self.blocks[3](c))


def test_a_block_fed_from_further_back_starts_a_new_chain():
    torch.manual_seed(0)
    model = SkipFromFarBack().eval()
    x = randn(24, 6)
    chains = find_chains(model, find_targets(model), as_calibration(x), batch_size=8)
    assert [c.names for c in chains] == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"]]
    assert_same(pruned(model, x, "sparsegpt"), pruned(model, x, "sparsegpt", cache_block_inputs=False))


class MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, scale, *, mask=None):
        return self.fc2(torch.relu(self.fc1(x))) * scale + (mask if mask is not None else 0)


class WithExtras(nn.Module):
    """Blocks that take extra inputs computed before the first block (like an attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MaskedBlock() for _ in range(3))
        self.embed = nn.Linear(4, 4)

    def forward(self, x):
        scale, mask = x.abs().mean(1, keepdim=True), (x > 0).float()
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, scale, mask=mask)
        return h


def test_extra_block_inputs_follow_each_batch():
    torch.manual_seed(0)
    model = WithExtras().eval()
    x = randn(30, 4)
    chains = find_chains(model, find_targets(model), as_calibration(x), batch_size=8)
    assert [c.names for c in chains] == [["layers.0", "layers.1", "layers.2"]]
    assert_same(pruned(model, x, "wanda"), pruned(model, x, "wanda", cache_block_inputs=False))
    inputs = BlockInputs.capture(model, chains[0], as_calibration(x), batch_size=8)
    inputs.advance(2)
    assert inputs.position == 2 and inputs.module is model.layers[2]


class RotaryBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, position_embeddings):
        cos, sin = position_embeddings
        return self.fc2(torch.relu(self.fc1(x * cos + x.flip(-1) * sin)))


class WithNestedExtras(nn.Module):
    """Blocks whose extra input is a tuple of tensors computed once per batch (Llama's rotary embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(RotaryBlock() for _ in range(3))

    def forward(self, x):
        rotary = (x.cos(), x.sin())
        for layer in self.layers:
            x = layer(x, position_embeddings=rotary)
        return x


def test_tensors_nested_in_extra_block_inputs_follow_each_batch():
    torch.manual_seed(0)
    model = WithNestedExtras().eval()
    x = randn(30, 4)
    chains = find_chains(model, find_targets(model), as_calibration(x), batch_size=8)
    assert [c.names for c in chains] == [["layers.0", "layers.1", "layers.2"]]
    assert_same(pruned(model, x, "sparsegpt"), pruned(model, x, "sparsegpt", cache_block_inputs=False))


def test_a_model_without_blocks_keeps_full_passes():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = randn(20, 5)
    assert find_chains(model, find_targets(model), as_calibration(x)) == []
    assert_same(pruned(model, x, "sparsegpt"), pruned(model, x, "sparsegpt", cache_block_inputs=False))


def test_wanda_and_sparsegpt_meet_the_target_with_offload(reference):
    for method in ("wanda", "sparsegpt"):
        result = ptsparse.sparsify(reference, randn(32, 1, 28, 28), method=method, sparsity=0.7, offload=True,
                                   progress=False)
        assert result.report["achieved_sparsity"] == pytest.approx(0.7, abs=1e-4)
        plain = ptsparse.sparsify(reference, randn(32, 1, 28, 28), method=method, sparsity=0.7, progress=False)
        assert all(torch.equal(result.masks[name], plain.masks[name]) for name in plain.masks)
        assert result.report["peak_device_memory_mb"] is None  # on the CPU: the peak RSS counts its tensors


# offload: one block on the device at a time ------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_offload_puts_one_block_on_the_device_at_a_time_and_gives_the_same_masks(reference, criterion):
    x = randn(40, 1, 28, 28)
    masks, state, moves = pruned(reference, x, criterion, offload=RecordingOffload)
    assert_same(pruned(reference, x, criterion), (masks, state))
    blocks = [f"stages.{s}.{b}" for s in range(3) for b in range(3)]
    assert sorted({name for name, _, _ in moves.runs}) == blocks
    assert all(on_device == [name] for name, on_device, _ in moves.runs)  # the running block, alone
    # passes on cached inputs leave the stem in CPU memory; whole-model passes (chain check, stem and classifier
    # statistics) bring it
    assert {stem for _, _, stem in moves.runs} == {False, True}
    assert not moves.on_device and moves.resident is None  # everything back in CPU memory


def test_the_summary_gives_peak_device_memory_where_the_device_has_its_own(tiny_mlp):
    result = ptsparse.sparsify(tiny_mlp, randn(16, 1, 8, 8), method="magnitude", progress=False)
    assert result.report["peak_device_memory_mb"] is None
    assert "MiB (tensors included: the device is the CPU)  seed 0" in format_table(result.report)
    on_gpu = {**result.report, "device": "cuda:0", "peak_device_memory_mb": 1234.4}
    assert re.search(r"peak RSS \d+ MiB  peak cuda:0 memory 1234 MiB  seed 0  calibration 16 samples",
                     format_table(on_gpu))
    older = {key: value for key, value in on_gpu.items() if key != "peak_device_memory_mb"}  # an earlier report
    assert re.search(r"peak RSS \d+ MiB  seed 0", format_table(older))


def test_offload_refuses_parts_that_need_the_whole_model_on_the_device():
    with pytest.raises(IncompatibleOptionsError, match="offload runs the model one block at a time, forward passes "
                                                       "only; recovery 'distill' needs the whole model on the device: "
                                                       "use recovery 'none', or drop offload"):
        ptsparse.SparsityConfig(method="magnitude_kd", offload=True)
    with pytest.raises(IncompatibleOptionsError, match="criterion 'taylor' needs the whole model"):
        ptsparse.SparsityConfig(method="taylor", offload=True)
    with pytest.raises(IncompatibleOptionsError, match="allocation 'unipts_search' needs the whole model"):
        ptsparse.SparsityConfig(method="wanda", allocation="unipts_search", offload=True)
    for method in ("magnitude", "wanda", "sparsegpt"):
        assert ptsparse.SparsityConfig(method=method, allocation="owl", offload=True).offload


# recovery: gradient checkpointing and bf16 ---------------------------------------------------------------

DISTILL = dict(method="magnitude_kd", sparsity=0.8, distill_iterations=4, batch_size=16, progress=False)


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing(reference):
    x = randn(32, 1, 28, 28)
    calls = []
    model = copy.deepcopy(reference)
    model.stages[1][0].conv1.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    plain = ptsparse.sparsify(model, x, objective="kd_blocks", **DISTILL)
    plain_calls = len(calls)
    calls.clear()
    recomputed = ptsparse.sparsify(model, x, objective="kd_blocks", distill_grad_checkpointing=True, **DISTILL)
    assert len(calls) == plain_calls + DISTILL["distill_iterations"]  # one recomputation per training step
    state, other = plain.model.state_dict(), recomputed.model.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)  # BatchNorm running statistics included


def test_bf16_distillation_runs_convolutions_in_bf16(reference):
    dtypes = set()
    model = copy.deepcopy(reference)
    model.stages[0][0].conv1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training and
                                                   torch.is_grad_enabled() else None)  # distillation steps only
    result = ptsparse.sparsify(model, randn(32, 1, 28, 28), distill_precision="bf16", **DISTILL)
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.report["achieved_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert torch.isfinite(torch.tensor(result.report["recovery"]["history"][-1]["loss"]))


@pytest.mark.parametrize("value", ["fp16", "half"])
def test_precision_choices_are_checked(value):
    with pytest.raises(ConfigError, match=f"precision '{value}' is not allowed; choose from fp32, bf16"):
        ptsparse.SparsityConfig(method="magnitude", precision=value)


def test_fsdp_sharding_is_for_static_masks_and_a_no_op_in_one_process(reference):
    with pytest.raises(IncompatibleOptionsError, match="distill_shard 'fsdp' keeps only static masks.*'dst'"):
        ptsparse.SparsityConfig(method="unipts", distill_shard="fsdp")
    ptsparse.SparsityConfig(method="pot", distill_shard="fsdp")  # no distillation: nothing to shard, nothing refused
    x = randn(32, 1, 28, 28)
    plain = ptsparse.sparsify(reference, x, **DISTILL).model.state_dict()
    alone = ptsparse.sparsify(reference, x, distill_shard="fsdp", **DISTILL).model.state_dict()
    assert all(torch.equal(plain[k], alone[k]) for k in plain)  # one rank: nothing to shard over


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude_kd"])
def test_cuda_with_every_memory_saver(reference, method):
    result = ptsparse.sparsify(reference, randn(64, 1, 28, 28), method=method, sparsity=0.9, device="cuda",
                               offload=method != "magnitude_kd", precision="bf16", grad_checkpointing=True,
                               iterations=4, progress=False)
    assert result.report["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_cached_inputs_on_mobilenet_v2():
    pytest.importorskip("torchvision")
    from ptsparse.models import resolve_model
    torch.manual_seed(0)
    model, _ = resolve_model("torchvision:mobilenet_v2,num_classes=4")
    model.eval()
    x = randn(12, 3, 32, 32)
    chains = find_chains(model, find_targets(model), as_calibration(x), batch_size=8)
    assert chains[0].names[0] == "features.1" and len(chains[0].names) == 17
    assert_same(pruned(model, x, "sparsegpt"), pruned(model, x, "sparsegpt", cache_block_inputs=False))


def test_cached_inputs_on_bert_with_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ptsparse.models import resolve_model
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, pad_token_id=0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    model, _ = resolve_model(f"hf:{tmp_path}")
    model.eval()
    x = torch.randint(1, 30, (24, 8), generator=torch.Generator().manual_seed(0))
    x[::2, 5:] = 0  # padded samples: the attention mask every layer receives differs per batch
    chains = find_chains(model, find_targets(model), as_calibration(x), batch_size=8)
    assert [c.names for c in chains] == [[f"hf.bert.encoder.layer.{i}" for i in range(3)]]
    assert_same(pruned(model, x, "sparsegpt"), pruned(model, x, "sparsegpt", cache_block_inputs=False))


def test_the_peak_resident_memory_starts_afresh_after_a_reset():
    from ptsparse.report import peak_rss_mb, reset_peak_rss

    block = torch.ones(64 * 2**20 // 4)  # 64 MiB written, then returned to the system
    del block
    high = peak_rss_mb()
    if not reset_peak_rss():
        pytest.skip("this system cannot reset the peak resident memory (/proc/self/clear_refs)")
    assert peak_rss_mb() < high - 32
