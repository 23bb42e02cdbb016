"""The reference language model: its corpus split, the committed model and metadata, and the training recipe
(on a tiny fake corpus and a tiny config, in seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ptsparse.data import python_docs  # noqa: E402
from ptsparse.errors import DataError  # noqa: E402
from ptsparse.models import REFERENCE_LM, reference_lm_dir, reference_lm_metadata, resolve_model  # noqa: E402
from ptsparse.models import language  # noqa: E402

needs_python_docs = pytest.mark.skipif(
    not (python_docs.corpus_dir() / "tutorial" / "index.rst.txt").is_file(),
    reason=f"Python documentation sources missing ({python_docs.INSTALL_HINT})",
)

# Held-out text: the opening prose of library/operator.rst.txt, a file of the test split (PSF licence).
HELD_OUT = """The :mod:`operator` module exports a set of efficient functions corresponding to
the intrinsic operators of Python.  For example, ``operator.add(x, y)`` is
equivalent to the expression ``x+y``. Many function names are those used for
special methods, without the double underscores.  For backward compatibility,
many of these have a variant with the double underscores kept. The variants
without the double underscores are preferred for clarity.

The functions fall into categories that perform object comparisons, logical
operations, mathematical operations and sequence operations.
"""

TINY = language.LMRecipe(vocab_size=300, hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=16,
                         batch_size=4, steps=4, warmup_steps=2)

# Names whose CRC-32 puts them in each split (the rule of ptsparse.data.python_docs).
FAKE_FILES = {"tutorial/b.rst.txt": "train", "tutorial/c.rst.txt": "train", "library/f.rst.txt": "train",
              "tutorial/a.rst.txt": "test", "library/e.rst.txt": "validation"}


def fake_corpus(directory):
    """A few small reST files, repeated prose, laid out like ``_sources``."""
    for index, name in enumerate(sorted(FAKE_FILES)):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Section {index}\n==========\n\n" + HELD_OUT * 6, encoding="utf-8")
    return directory


# --- corpus ----------------------------------------------------------------------------------------------

def test_split_rule_is_fixed_by_path():
    assert {name: python_docs.split_of(name) for name in FAKE_FILES} == FAKE_FILES
    assert python_docs.split_of("library/operator.rst.txt") == "test"
    assert python_docs.split_of("tutorial/index.rst.txt") == "train"


def test_split_files_partition_the_corpus(tmp_path):
    root = fake_corpus(tmp_path)
    splits = {split: python_docs.split_files(split, root) for split in python_docs.SPLITS}
    assert splits == {"train": ["library/f.rst.txt", "tutorial/b.rst.txt", "tutorial/c.rst.txt"],
                      "validation": ["library/e.rst.txt"], "test": ["tutorial/a.rst.txt"]}
    text = python_docs.split_text("train", root)
    assert text == python_docs.SEPARATOR.join((root / name).read_text() for name in splits["train"])


def test_missing_corpus_names_the_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install python3.11-doc"):
        python_docs.corpus_files(tmp_path / "absent")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        python_docs.split_files("dev", fake_corpus(tmp_path))


def test_write_texts(tmp_path):
    root = fake_corpus(tmp_path / "corpus")
    paths = language.write_texts(tmp_path / "texts", root, calibration_chars=1)
    assert sorted(paths) == ["calibration", "test", "validation"]
    assert paths["test"].read_text() == python_docs.split_text("test", root)
    assert paths["validation"].read_text() == python_docs.split_text("validation", root)
    calibration = paths["calibration"].read_text()  # one training file: the first of the seeded order
    assert calibration in [(root / name).read_text() for name in python_docs.split_files("train", root)]
    assert language.write_texts(tmp_path / "again", root, calibration_chars=1)["calibration"].read_text() == calibration


# --- the committed model ---------------------------------------------------------------------------------

def committed():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(reference_lm_dir()), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(reference_lm_dir()), local_files_only=True)
    return model.eval(), tokenizer


def test_committed_lm_matches_its_metadata():
    metadata = reference_lm_metadata()
    model, tokenizer = committed()
    recipe, config = metadata["recipe"], model.config
    assert model.dtype == torch.float32 and type(model).__name__ == metadata["model"] == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == \
        (recipe["hidden_size"], recipe["layers"], recipe["heads"], recipe["intermediate_size"])
    assert config.vocab_size == len(tokenizer) == metadata["tokenizer"]["vocab_size"] == recipe["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == metadata["parameters"]
    assert not config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert metadata["corpus"]["package"] == python_docs.PACKAGE and "PSF" in metadata["corpus"]["license"]
    assert metadata["corpus"]["split_rule"] == python_docs.SPLIT_RULE
    for split in ("validation", "test"):
        plain, sliding = metadata["eval"][split], metadata["eval"][f"{split}_sliding"]
        assert plain["seq_len"] == plain["stride"] == sliding["seq_len"] == 2 * sliding["stride"] == recipe["seq_len"]
        assert 1 < sliding["perplexity"] < plain["perplexity"] < 100  # more context, better predictions
    assert tokenizer("a b", add_special_tokens=False)["input_ids"] == language.encode(tokenizer, "a b").tolist()


def test_committed_lm_predicts_held_out_text():
    model, tokenizer = committed()
    ids = language.encode(tokenizer, HELD_OUT)
    result = language.perplexity(model, ids, seq_len=32)
    assert result["tokens"] == len(ids) // 32 * 31 > 60
    # a uniform guess scores 4096; the model, never trained on this file, is far closer
    bound = 3 * reference_lm_metadata()["eval"]["test"]["perplexity"]
    assert math.isfinite(result["perplexity"]) and result["perplexity"] < bound


@needs_python_docs
def test_committed_lm_sample_perplexity_is_the_recorded_one():
    metadata = reference_lm_metadata()
    if metadata["corpus"]["sha256"] != python_docs.corpus_digest():
        pytest.skip("the installed python3.11-doc differs from the one the model was trained on")
    model, tokenizer = committed()
    sample = metadata["eval"]["test_sample"]
    ids = language.encode(tokenizer, python_docs.split_text("test"))
    result = language.perplexity(model, ids, sample["seq_len"], max_tokens=sample["tokens"] // (sample["seq_len"] - 1)
                                 * sample["seq_len"])
    assert result["tokens"] == sample["tokens"]
    assert result["perplexity"] == pytest.approx(sample["perplexity"], rel=1e-3)


def test_reference_lm_name_resolves_to_its_directory():
    from ptsparse.export import load_model

    model, architecture = resolve_model(REFERENCE_LM)
    assert architecture == f"hf:{reference_lm_dir().resolve()}"
    assert model(torch.tensor([[1, 2, 3]])).shape[-1] == reference_lm_metadata()["tokenizer"]["vocab_size"]
    _, metadata = load_model(REFERENCE_LM)  # what `ptsparse eval` and `export` load by name
    assert metadata["architecture"] == architecture


# --- the recipe ------------------------------------------------------------------------------------------

def test_tokenizer_training_is_deterministic():
    texts = [HELD_OUT, HELD_OUT.upper()]
    first, second = language.train_tokenizer(texts, 300), language.train_tokenizer(texts, 300)
    assert first.get_vocab() == second.get_vocab() and len(first) == 300
    assert first.convert_ids_to_tokens(0) == language.EOS
    assert first.decode(language.encode(first, "ünïcode ✓ text")) == "ünïcode ✓ text"  # byte-level: any text


def test_training_is_deterministic_and_learns():
    ids = torch.arange(2000) % 37  # a periodic stream: easy to predict
    runs = [language.train_lm(TINY, ids, 300, show_progress=False) for _ in range(2)]
    (model_a, info_a), (model_b, info_b) = runs
    assert info_a["losses"] == info_b["losses"] and len(info_a["losses"]) == TINY.steps
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    _, other = language.train_lm(TINY.__class__(**{**TINY.__dict__, "seed": 1}), ids, 300, show_progress=False)
    assert other["losses"] != info_a["losses"]
    assert info_a["losses"][-1] < info_a["losses"][0]


def test_learning_rate_schedule():
    recipe = language.LMRecipe(steps=100, warmup_steps=10, max_lr=1.0, min_lr_ratio=0.1)
    rates = [language._learning_rate(recipe, step) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] > 0.1


def test_perplexity_windows():
    model = transformers.LlamaForCausalLM(language.reference_lm_config(TINY, 300)).eval()
    ids = torch.arange(100) % 300
    result = language.perplexity(model, ids, seq_len=16)
    assert (result["tokens"], result["seq_len"], result["stride"]) == (6 * 15, 16, 16)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    with pytest.raises(ValueError, match="no window"):
        language.perplexity(model, ids[:10], seq_len=16)
    whole = language.perplexity(model, ids, seq_len=100)  # one window: every token after the first, all context
    sliding = language.sliding_perplexity(model, ids, seq_len=100)  # ... and so do the sliding windows
    assert (sliding["tokens"], sliding["stride"]) == (99, 50)
    assert sliding["nll"] == pytest.approx(whole["nll"], rel=1e-5)


def test_train_command_writes_a_loadable_model(tmp_path, capsys):
    root = fake_corpus(tmp_path / "corpus")
    out = tmp_path / "lm"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.__dict__.items()
             if not isinstance(value, tuple)]
    assert language.main(["train", "--out", str(out), "--corpus", str(root), "-q", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    metadata = json.loads((out / language.METADATA).read_text())
    assert printed["final_train_loss"] == metadata["final_train_loss"]
    assert metadata["corpus"]["split_files"] == {"train": 3, "validation": 1, "test": 1}
    assert metadata["recipe"]["steps"] == TINY.steps and metadata["seed"] == 0
    assert metadata["eval"]["test"]["perplexity"] == pytest.approx(printed["test"], abs=1e-3)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.float32 and model.config.hidden_size == TINY.hidden_size
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float16}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = language.encode(tokenizer, python_docs.split_text("test", root))
    again = language.perplexity(model, ids, TINY.seq_len)
    assert again["perplexity"] == pytest.approx(metadata["eval"]["test"]["perplexity"], rel=1e-4)
    assert language.main(["eval", str(out), "--corpus", str(root), "-q"]) == 0  # measures again, same numbers
    remeasured = json.loads((out / language.METADATA).read_text())
    assert remeasured == metadata


def test_train_command_reports_a_missing_corpus(tmp_path, capsys):
    assert language.main(["train", "--out", str(tmp_path / "lm"), "--corpus", str(tmp_path / "absent"), "-q"]) == 2
    assert "apt-get install python3.11-doc" in capsys.readouterr().err
    assert not (tmp_path / "lm").exists()
