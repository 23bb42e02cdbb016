"""The channel pattern prunes attention projections by whole heads (timm ViT, Hugging Face BERT), meets the
target as for other layers, and channel removal turns the pruned heads into a smaller working model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.allocation import LayerBudget, exact_counts, target_count
from ptsparse.attention import find_attention, heads_by_layer
from ptsparse.data import load_source, sample_calibration
from ptsparse.models import resolve_model, zoo
from ptsparse.patterns import Channel
from ptsparse.targets import count_zeros, find_targets

warnings.filterwarnings("ignore", message=".*dense kernels.*")

TIMM_VIT = "timm:vit_tiny_patch16_224,depth=2,img_size=32,num_classes=2,patch_size=8"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat ran fast slow big small red".split()


@pytest.fixture(scope="module")
def timm_vit(images):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model, architecture = resolve_model(TIMM_VIT)
    source = load_source(images, transform=zoo.image_transform(architecture, model))
    return model, sample_calibration(source, 8, 0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT (2 layers, 2 heads of 16) from a config and a word list; random weights."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("bert")
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=len(WORDS), max_position_embeddings=32, num_labels=3)
    config.save_pretrained(str(directory))
    lines = ["the cat sat on the mat", "a dog ran fast", "big red dog", "", "small slow cat on a mat"]
    (directory / "text.txt").write_text("\n".join(lines * 4) + "\n")
    torch.manual_seed(0)
    model, architecture = resolve_model(f"hf:{directory}")
    source = load_source(f"text:{directory / 'text.txt'}", tokenizer=zoo.load_tokenizer(architecture), seq_len=12)
    return model, sample_calibration(source, 16, 0)


def pruned_heads(model: nn.Module) -> dict[str, set[int]]:
    """Per q/k/v projection, the heads whose rows are all zero; fails if any head is zero only in part."""
    result = {}
    for attention in find_attention(model):
        for name in attention.projections:
            zero_rows = (model.get_submodule(name).weight.detach() == 0).all(1)
            per_head = zero_rows[attention.rows(name)]
            assert bool((per_head.all(1) == per_head.any(1)).all()), f"{name}: a head is pruned in part"
            result[name] = {int(h) for h in per_head.all(1).nonzero().flatten()}
    return result


def assert_whole_rows_elsewhere(model: nn.Module) -> None:
    """Layers other than the projections prune whole output rows only (channel pattern as before)."""
    projections = heads_by_layer(find_attention(model))
    for target in find_targets(model):
        if target.name not in projections:
            rows = target.weight.detach().flatten(1)
            assert int((rows == 0).sum()) == int((rows == 0).all(1).sum()) * rows.shape[1], target.name


def assert_target_met(result, sparsity: float) -> None:
    """Achieved zeros within one output row (of a non-attention layer) of ``round(sparsity * total)``."""
    targets = find_targets(result.model)
    zeros, total = count_zeros(targets)
    projections = heads_by_layer(find_attention(result.model))
    row = max(t.fan_in for t in targets if t.name not in projections)
    assert 0 <= round(sparsity * total) - zeros < row
    assert result.report["achieved_sparsity"] == ptsparse.sparsity_of(result.model) == zeros / total


# --- discovery -------------------------------------------------------------------------------------------

def test_timm_fused_qkv_rows_of_a_head_are_its_q_k_and_v_rows(timm_vit):
    model, _ = timm_vit
    attentions = find_attention(model)
    assert [a.name for a in attentions] == ["blocks.0.attn", "blocks.1.attn"]
    attention = attentions[0]
    assert attention.num_heads == 3 and list(attention.projections) == ["blocks.0.attn.qkv"]
    rows = attention.rows("blocks.0.attn.qkv")  # (3, num_heads, head_dim) = (3, 3, 64) over 576 rows
    assert rows.shape == (3, 192)
    assert rows[1].tolist() == [*range(64, 128), *range(256, 320), *range(448, 512)]
    assert find_attention(model, ["blocks.1.attn.qkv"])[0].name == "blocks.1.attn"  # restricted to targets


def test_hf_separate_projections_share_the_head_rows(bert):
    model, _ = bert
    attention = find_attention(model)[0]
    assert attention.name == "hf.bert.encoder.layer.0.attention.self" and attention.num_heads == 2
    assert [n.rsplit(".", 1)[1] for n in attention.projections] == ["query", "key", "value"]
    for name in attention.projections:
        assert attention.rows(name).tolist() == [list(range(16)), list(range(16, 32))]


# --- pattern and counts ----------------------------------------------------------------------------------

def test_channel_mask_prunes_the_head_with_the_lowest_mean_score(timm_vit):
    model, _ = timm_vit
    heads = heads_by_layer(find_attention(model))
    pattern = Channel(heads=heads)
    name = "blocks.0.attn.qkv"
    scores = torch.ones(576, 192)
    scores[heads[name].rows(name)[2]] = 0.5  # head 2 lowest on average ...
    scores[0] = -100.0  # ... though head 0 has the lowest single row
    scores[heads[name].rows(name)[0]] += 0.6
    assert pattern.unit_size(scores.shape, name) == 3 * 64 * 192
    keep = pattern.mask(scores, 3 * 64 * 192, name)
    pruned = (~keep).all(1)
    assert pruned[heads[name].rows(name)[2]].all() and int(pruned.sum()) == 192
    # a layer that is no projection prunes rows as the plain channel pattern does
    other = torch.randn(192, 768)
    assert torch.equal(pattern.mask(other, 5 * 768, "blocks.0.mlp.fc2"), Channel().mask(other, 5 * 768))


def test_separate_projections_prune_the_heads_the_first_one_ranked(bert):
    model, _ = bert
    heads = heads_by_layer(find_attention(model))
    pattern = Channel(heads=heads)
    query, key, value = list(find_attention(model)[0].projections)
    first = torch.ones(32, 32)
    first[16:] = 0.1  # the query ranks head 1 lowest
    later = torch.ones(32, 32)
    later[:16] = 0.1  # the key's own scores would pick head 0
    masks = [pattern.mask(first, 16 * 32, query), pattern.mask(later, 16 * 32, key),
             pattern.mask(later, 16 * 32, value)]
    for mask in masks:
        assert torch.equal((~mask).all(1), torch.arange(32) >= 16)


def test_exact_counts_give_the_projections_of_one_attention_equal_head_counts():
    row = 32
    head = 16 * row
    layers = [LayerBudget(f"attn.{p}", (32, 32), unit=head, attention="attn") for p in ("q", "k", "v")]
    layers += [LayerBudget("fc1", (64, 32), unit=32), LayerBudget("fc2", (32, 64), unit=64)]
    ratios = {"attn.q": 0.2, "attn.k": 0.4, "attn.v": 0.35, "fc1": 0.3, "fc2": 0.3}
    wanted = target_count(layers, 0.3)
    counts = exact_counts(layers, ratios, wanted)
    assert counts["attn.q"] == counts["attn.k"] == counts["attn.v"] == head  # 0.95 of a head each: one
    assert counts["fc1"] % 32 == 0 and counts["fc2"] % 64 == 0
    assert 0 <= wanted - sum(counts.values()) < 64  # the others absorb the heads' rounding


# --- sparsify and channel removal ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_timm_vit_channel_pattern_prunes_whole_heads_and_exports_a_smaller_model(timm_vit, method):
    pytest.importorskip("torch_pruning")
    from ptsparse.export.channels import remove_channels
    from ptsparse.graph.cost import count_params

    model, calib = timm_vit
    # the residual stream feeds LayerNorms, so its layers stay dense (the export could not remove its channels);
    # 0.2 of the weights then falls on the heads and the MLPs' hidden channels: one head of 3 in each block
    result = ptsparse.sparsify(model, calib, method=method, pattern="channel", allocation="uniform", sparsity=0.2,
                               batch_size=8, progress=False)
    heads = pruned_heads(result.model)
    assert set(heads) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert all(len(h) == 1 for h in heads.values())
    assert_whole_rows_elsewhere(result.model)
    assert_target_met(result, 0.2)
    for stream in ("patch_embed.proj", "blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.mlp.fc2"):
        assert bool(result.model.get_submodule(stream).weight.ne(0).all()), stream

    x = calib.inputs[:4]
    smaller, report = remove_channels(result.model, x)
    assert count_params(smaller) < count_params(result.model)
    assert torch.allclose(smaller(x), result.model(x), atol=1e-4)
    for block in smaller.blocks:
        assert block.attn.num_heads == 2 and block.attn.head_dim == 64 and block.attn.attn_dim == 128
        assert block.attn.qkv.out_features == 3 * 128 and block.attn.proj.in_features == 128


def test_pruned_heads_lose_their_projection_biases_so_channel_removal_drops_them(timm_vit):
    pytest.importorskip("torch_pruning")
    import copy

    from ptsparse.export.channels import remove_channels

    model, calib = timm_vit
    model = copy.deepcopy(model)
    with torch.no_grad():  # pretrained projections have biases; this random model's are zero
        for block in model.blocks:
            block.attn.qkv.bias.normal_(generator=torch.Generator().manual_seed(0))
    result = ptsparse.sparsify(model, calib, method="magnitude", pattern="channel", allocation="uniform",
                               sparsity=0.2, batch_size=8, progress=False)
    for name, heads in pruned_heads(result.model).items():
        attention = next(a for a in find_attention(result.model) if name in a.projections)
        rows = attention.rows(name)[sorted(heads)].flatten()
        assert len(rows) and not result.model.get_submodule(name).bias[rows].any(), name

    x = calib.inputs[:4]
    smaller, _ = remove_channels(result.model, x)
    assert [block.attn.num_heads for block in smaller.blocks] == [2, 2]
    assert torch.allclose(smaller(x), result.model(x), atol=1e-4)


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_bert_prunes_the_same_whole_heads_in_query_key_and_value(bert, method):
    pytest.importorskip("torch_pruning")
    from ptsparse.export.channels import remove_channels

    model, calib = bert
    result = ptsparse.sparsify(model, calib, method=method, pattern="channel", allocation="uniform", sparsity=0.3,
                               batch_size=8, progress=False)
    heads = pruned_heads(result.model)
    assert len(heads) == 6
    for layer in (0, 1):
        prefix = f"hf.bert.encoder.layer.{layer}.attention.self."
        assert heads[prefix + "query"] == heads[prefix + "key"] == heads[prefix + "value"]
        assert len(heads[prefix + "query"]) == 1
    assert_whole_rows_elsewhere(result.model)
    if method == "magnitude":
        assert_target_met(result, 0.3)

    x = calib.inputs[:4]
    smaller, _ = remove_channels(result.model, x)
    assert torch.allclose(smaller(x), result.model(x), atol=1e-5)
    for layer in smaller.hf.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 1 and attention.all_head_size == 16
        assert attention.query.out_features == attention.value.out_features == 16


def test_channel_iee_moves_whole_heads_within_the_budget(timm_vit):
    pytest.importorskip("torch_pruning")
    model, calib = timm_vit
    result = ptsparse.sparsify(model, calib, method="iee", pattern="channel", sparsity=0.3, batch_size=8,
                               iterations=24, iee_exploit_steps=2, iee_improve_steps=2, iee_explore_steps=2,
                               iee_alpha=0.5, progress=False)
    pruned_heads(result.model)  # fails if a head is zero only in part
    assert_whole_rows_elsewhere(result.model)
    recovery = result.report["recovery"]
    assert recovery["iee_cost_after"] <= recovery["iee_budget"] + 1e-6
    assert any(cycle["swapped"] for cycle in recovery["iee_cycles"])
