"""The ``hf`` export (a directory that transformers' ``from_pretrained`` loads) and 2:4 kernels on Hugging Face
models: tiny models from configs with random weights, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.cli import main
from ptsparse.errors import ConfigError, ExportError
from ptsparse.export import export_model
from ptsparse.export.semi_structured import as_linear, to_semi_structured, two_four_layers
from ptsparse.models import zoo
from ptsparse.models import resolve_model, zoo
from ptsparse.targets import find_targets

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat ran fast slow big small red".split()


class CausalLM(nn.Module):
    """A minimal wrapper of a causal language model: token ids -> logits, the model at attribute ``hf``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=x).logits


def tokens(count: int, length: int = 12, vocab: int = len(WORDS), seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT for sequence classification: config and tokenizer only (random weights)."""
    directory = tmp_path_factory.mktemp("bert")
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=len(WORDS), max_position_embeddings=32, num_labels=3)
    config.save_pretrained(str(directory))
    (directory / "notes.txt").write_text("not a file transformers reads\n")
    return directory


@pytest.fixture(scope="module")
def bert(bert_dir):
    """A tiny BERT at 50% (magnitude), and its architecture."""
    torch.manual_seed(0)
    model, architecture = resolve_model(f"hf:{bert_dir}")
    result = ptsparse.sparsify(model, tokens(16), method="magnitude", sparsity=0.5, progress=False,
                               architecture=architecture)
    return result, architecture


def assert_same_model(reloaded: nn.Module, sparse: nn.Module) -> None:
    """Every tensor of the reloaded Hugging Face model equals the sparse one's bit for bit (so do the zeros)."""
    expected = sparse.state_dict()
    assert set(reloaded.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in reloaded.state_dict().items())


def test_a_bert_classifier_round_trips_through_from_pretrained(bert, bert_dir, tmp_path):
    result, architecture = bert
    out = tmp_path / "bert-50"
    report = export_model(result.model, "hf", out, metadata={"architecture": architecture})
    assert report["files"] == sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= set(report["files"])
    assert "notes.txt" not in report["files"] and report["source"] == str(bert_dir.resolve())
    assert report["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert report["max_relative_difference"] == 0.0
    assert [p.name for p in tmp_path.iterdir()] == ["bert-50"]  # no staging directory left beside it

    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(reloaded) is type(result.model.hf)
    assert_same_model(reloaded, result.model.hf)
    ids = tokens(4, seed=1)
    assert torch.equal(zoo.HFLogits(reloaded)(ids), result.model(ids))
    sparsity = ptsparse.sparsity_of(zoo.HFLogits(reloaded))
    assert sparsity == result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    zeros = sum(int((t.weight == 0).sum()) for t in find_targets(result.model))
    assert report["zeros"] == zeros
    text = "the cat sat on the mat"
    assert (transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
            == zoo.load_tokenizer(architecture)(text)["input_ids"])
    assert result.model.hf.config.architectures is None  # save_pretrained's record in the config is undone


def test_export_hf_from_the_cli_reads_back_as_a_model_spec(capsys, bert, tmp_path):
    result, _ = bert
    ptsparse.save(result, tmp_path / "run")
    code = main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    assert code == 0 and json.loads(stdout[:stdout.rindex("}") + 1])["class"] == "BertForSequenceClassification"
    assert "a BertForSequenceClassification for from_pretrained" in stdout and "copied" in stdout
    loaded, _ = resolve_model(f"hf:{tmp_path / 'out'}")  # ptsparse reads it back as an hf: directory
    ids = tokens(4, seed=2)
    assert torch.equal(loaded(ids), result.model(ids))


@pytest.mark.parametrize("name, config", [
    ("gpt2", lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                             bos_token_id=0, eos_token_id=0)),
    ("llama", lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                               max_position_embeddings=32, bos_token_id=0, eos_token_id=0)),
])
def test_causal_language_models_round_trip_with_their_tied_weights(name, config, tmp_path):
    torch.manual_seed(0)
    model = zoo.HFCausalLM(zoo.replace_conv1d(transformers.AutoModelForCausalLM.from_config(config()))).eval()
    result = ptsparse.sparsify(model, tokens(8, vocab=64), method="magnitude", sparsity=0.5, progress=False)
    report = export_model(result.model, "hf", tmp_path / name)
    assert report["copied"] == [] and report["source"] is None  # nothing names a source directory
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
    assert_same_model(reloaded, result.model.hf)
    tied = result.model.hf.config.tie_word_embeddings
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    assert name != "gpt2" or tied  # GPT-2's lm_head is its token embedding: stored once, tied again on loading
    ids = tokens(3, vocab=64, seed=1)
    assert torch.equal(CausalLM(reloaded)(ids), result.model(ids))
    as_built = zoo.HFCausalLM(zoo.replace_conv1d(reloaded))  # GPT-2's Conv1D layers are what ptsparse prunes
    assert ptsparse.sparsity_of(as_built) == ptsparse.sparsity_of(result.model)
    # the other formats take tied weights too: the dense checkpoint they compare with stores each name once
    assert export_model(result.model, "compressed", tmp_path / "c.safetensors")["dense_bytes"] > 0


def test_a_model_that_is_not_hugging_face_is_refused_in_one_line(capsys, tmp_path):
    with pytest.raises(ExportError) as info:
        export_model(nn.Sequential(nn.Linear(4, 4)), "hf", tmp_path / "out")
    assert str(info.value) == ("format 'hf' exports Hugging Face transformers models (built from --model "
                               "hf:DIRECTORY, held at the attribute 'hf'); this model is a Sequential")
    code = main(["export", "reference", "--format", "hf", "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Hugging Face transformers models" in stderr
    assert not list(tmp_path.iterdir())


def test_the_output_is_a_new_or_empty_directory(bert, tmp_path):
    result, architecture = bert
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="'.*full' already holds files; give a new or empty directory"):
        export_model(result.model, "hf", tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        export_model(result.model, "hf", tmp_path / "file")
    (tmp_path / "empty").mkdir()
    export_model(result.model, "hf", tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full"]


def test_an_interrupted_write_leaves_no_directory(bert, monkeypatch, tmp_path):
    result, architecture = bert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C once the files are written, during the reload check

    monkeypatch.setattr(type(result.model.hf), "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(result.model, "hf", tmp_path / "out", metadata={"architecture": architecture})
    assert not list(tmp_path.iterdir())


def changed_reload(change):
    """A ``from_pretrained`` that applies ``change`` to one layer of the model it loads."""
    load = transformers.BertForSequenceClassification.from_pretrained

    def from_pretrained(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            change(model.bert.encoder.layer[0].intermediate.dense.weight)
        return model

    return from_pretrained


@pytest.mark.parametrize("change, message", [
    (lambda weight: weight.mul_(2), "gives other outputs than the sparse model"),
    (lambda weight: weight.masked_fill_(weight == 0, 1e-30),
     "reloads hf.bert.encoder.layer.0.intermediate.dense with other zeros"),
])
def test_a_reload_that_differs_is_an_error_and_writes_nothing(bert, monkeypatch, tmp_path, change, message):
    result, _ = bert
    monkeypatch.setattr(transformers.BertForSequenceClassification, "from_pretrained", changed_reload(change))
    with pytest.raises(ExportError, match=message):
        export_model(result.model, "hf", tmp_path / "out")
    assert not list(tmp_path.iterdir())


# 2:4 kernels on Hugging Face models -----------------------------------------------------------------------

def test_two_four_kernels_take_the_aligned_linear_layers_of_a_bert(bert_dir):
    torch.manual_seed(0)
    model, _ = resolve_model(f"hf:{bert_dir}")
    result = ptsparse.sparsify(model, tokens(16), method="magnitude", pattern="2:4", progress=False)
    eligible, skipped = two_four_layers(result.model, 32, 64)  # CUTLASS's minimum sizes for float16
    # hidden 32, intermediate 64: only the 32x64 output projections of the feed-forward blocks are multiples
    assert eligible == ["hf.bert.encoder.layer.0.output.dense", "hf.bert.encoder.layer.1.output.dense"]
    query = "hf.bert.encoder.layer.0.attention.self.query"
    assert skipped[query] == "shape 32x32 is not a multiple of the kernel's 32x64"
    assert skipped["hf.classifier"] == "shape 3x32 is not a multiple of the kernel's 32x64"
    assert set(two_four_layers(result.model, 1, 4)[0]) == {t.name for t in find_targets(model)}
    assert two_four_layers(model, 1, 4) == ([], {name: "weight is not 2:4 sparse along its inputs"
                                                 for name in two_four_layers(result.model, 1, 4)[0]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_two_four_kernels_on_cpu_say_why_in_one_line(bert):
    result, _ = bert
    swapped, report = to_semi_structured(result.model, "cpu")
    assert not report["available"] and report["swapped"] == [] and report["warnings"] == [report["reason"]]
    assert "CUDA" in report["reason"] and len(report["reason"].splitlines()) == 1
    ids = tokens(2)
    assert torch.equal(swapped(ids), result.model(ids))


def test_a_gpt2_conv1d_that_is_two_four_along_its_inputs_becomes_a_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=16,
                                                          n_positions=8, bos_token_id=0, eos_token_id=0))
    conv = gpt2.h[0].mlp.c_fc  # Conv1D: weight inputs x outputs = 64 x 256
    with torch.no_grad():  # 2:4 along the inputs: the two smallest of every 4 consecutive inputs per output
        weight = conv.weight.t().reshape(256, 16, 4)
        weight.scatter_(2, weight.abs().argsort(2)[..., :2], 0.0)
        conv.weight.copy_(weight.reshape(256, 64).t())
    eligible, skipped = two_four_layers(gpt2, 32, 64)
    assert eligible == ["h.0.mlp.c_fc"] and isinstance(conv, Conv1D)
    assert skipped["h.0.attn.c_attn"] == "weight is not 2:4 sparse along its inputs"  # ptsparse leaves Conv1D dense
    linear = as_linear(conv)
    x = torch.randn(3, 5, 64)
    assert linear.weight.shape == (256, 64) and torch.allclose(linear(x), conv(x), atol=1e-6)
