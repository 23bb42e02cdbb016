"""Causal language models from ``hf:`` directories: loading, packed calibration, perplexity, one-shot methods,
distillation that keeps the masks, the command line, and bad input."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import signal
from pathlib import Path

import pytest
import torch

import ptsparse
from ptsparse.allocation import OWL, AllocationContext, LayerBudget
from ptsparse.allocation.unipts_search import FitnessEvaluator
from ptsparse.blocks import find_blocks
from ptsparse.cli import main
from ptsparse.criteria import CRITERIA, prune_model
from ptsparse.criteria.block_inputs import find_chains
from ptsparse.data import PackedText, load_source, sample_calibration
from ptsparse.criteria.taylor import taylor_loss
from ptsparse.errors import ConfigError, DataError, IncompatibleOptionsError, ModelError
from ptsparse.evaluate import perplexity, sliding_windows
from ptsparse.export import input_shape_for
from ptsparse.models import resolve_model, zoo
from ptsparse.patterns import Unstructured
from ptsparse.recovery.objectives import kd_kl, output_mse
from ptsparse.recovery.trainer import TrainSchedule, batch_at
from ptsparse.report import format_table, more_time_hint
from ptsparse.targets import find_targets

from ..conftest import RecordingOffload

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 128
WORDS = ("the a cat dog sat on mat ran fast slow big small red blue green house tree sun moon star and or "
         "then it").split()
TINY = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=1)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                            bos_token_id=1, eos_token_id=1, architectures=["GPT2LMHeadModel"]),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, **TINY,
                                              architectures=["LlamaForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=1, **TINY,
                                              architectures=["Qwen2ForCausalLM"]),
    "opt": lambda: transformers.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1, **TINY,
                                          architectures=["OPTForCausalLM"]),
}
STREAM = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "llama": ("o_proj", "down_proj"), "qwen2": ("o_proj", "down_proj"),
          "opt": ("out_proj", "fc2")}  # the layers that write into the residual stream
BLOCKS = {"gpt2": "hf.transformer.h", "llama": "hf.model.layers", "qwen2": "hf.model.layers",
          "opt": "hf.model.decoder.layers"}


def word_tokenizer():
    """A word-level tokenizer over :data:`WORDS` (ids 2...), with ``<unk>`` 0 and ``<eos>`` 1."""
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *WORDS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def sentences(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(count))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("text")
    (directory / "train.txt").write_text(sentences(60, 0) + "\n")  # about 600 tokens
    (directory / "valid.txt").write_text(sentences(12, 1) + "\n")
    return directory / "train.txt", directory / "valid.txt"


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's model directory: config, random weights (seeded) and the tokenizer."""
    dirs = {}
    for family, config in CONFIGS.items():
        directory = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config()).save_pretrained(str(directory))
        word_tokenizer().save_pretrained(str(directory))
        dirs[family] = directory
    return dirs


@pytest.fixture(scope="module")
def lms(lm_dirs, texts):
    """Each family's model, architecture and a packed calibration set of 8 windows of 16 tokens."""
    built = {}
    for family, directory in lm_dirs.items():
        model, architecture = resolve_model(f"hf:{directory}")
        source = load_source(f"text:{texts[0]}", tokenizer=zoo.load_tokenizer(architecture), seq_len=16, packed=True)
        built[family] = model, architecture, sample_calibration(source, 8, seed=0)
    return built


FAMILIES = tuple(CONFIGS)


# --- loading -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_causal_lm_directory_gives_token_logits_and_keeps_its_output_layer_untargeted(lms, family):
    model, architecture, calibration = lms[family]
    assert isinstance(model, zoo.HFCausalLM) and zoo.is_causal_lm(model)
    assert calibration.inputs.shape == (8, 16) and calibration.inputs.dtype == torch.int64
    assert model(calibration.inputs[:2]).shape == (2, 16, VOCAB)
    names = [t.name for t in find_targets(model)]
    assert not any("lm_head" in name or "embed" in name or "wte" in name for name in names)
    assert find_blocks(model, find_targets(model)) == [f"{BLOCKS[family]}.0", f"{BLOCKS[family]}.1"]


def test_gpt2_conv1d_layers_are_linear_with_gpt2_checkpoints(lms, tmp_path):
    model, _, calibration = lms["gpt2"]
    layer = model.hf.transformer.h[0].attn.c_attn
    assert isinstance(layer, zoo.Conv1DLinear) and layer.weight.shape == (96, 32)  # (out, in)
    assert model.state_dict()["hf.transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D's layout
    model.hf.save_pretrained(str(tmp_path))
    word_tokenizer().save_pretrained(str(tmp_path))
    again, _ = resolve_model(f"hf:{tmp_path}")
    assert torch.equal(again(calibration.inputs[:2]), model(calibration.inputs[:2]))


def head_directory(path: Path, config) -> str:
    config.save_pretrained(str(path))
    return f"hf:{path}"


def test_the_config_architectures_choose_classifier_or_causal_lm(tmp_path):
    llama = CONFIGS["llama"]
    as_classifier = llama()
    as_classifier.architectures = ["LlamaForSequenceClassification"]
    model, _ = resolve_model(head_directory(tmp_path / "classifier", as_classifier))
    assert type(model) is zoo.HFLogits and type(model.hf).__name__ == "LlamaForSequenceClassification"
    model, _ = resolve_model(head_directory(tmp_path / "causal", llama()))
    assert type(model) is zoo.HFCausalLM and type(model.hf).__name__ == "LlamaForCausalLM"
    unnamed = llama()
    unnamed.architectures = None  # without architectures a classification head wins, as before causal LMs
    model, _ = resolve_model(head_directory(tmp_path / "unnamed", unnamed))
    assert type(model) is zoo.HFLogits


def test_a_directory_that_is_neither_classifier_nor_causal_lm_is_one_line(tmp_path):
    spec = head_directory(tmp_path / "speech", transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1))
    with pytest.raises(ModelError, match=r"model type 'wav2vec2' .* neither a classifier nor a causal language "
                                         r"model; ptsparse runs image or sequence classifiers and causal LMs") as error:
        resolve_model(spec)
    assert "\n" not in str(error.value)


# --- packed calibration and perplexity ----------------------------------------------------------------------

def test_packed_calibration_is_seeded_windows_of_the_token_stream(texts):
    source = PackedText(texts[0], word_tokenizer(), seq_len=16)
    stream = torch.tensor(word_tokenizer()(texts[0].read_text())["input_ids"])
    assert torch.equal(source.tokens, stream) and len(source) == len(stream) // 16
    first, again = sample_calibration(source, 8, seed=0), sample_calibration(source, 8, seed=0)
    other = sample_calibration(source, 8, seed=1)
    assert torch.equal(first.inputs, again.inputs) and first.hash == again.hash
    assert not torch.equal(first.inputs, other.inputs) and first.hash != other.hash
    for index, window in zip(first.indices.tolist(), first.inputs):  # whole, non-overlapping windows
        assert torch.equal(window, stream[16 * index: 16 * (index + 1)])


def test_sliding_windows_score_every_token_once_with_context():
    windows = sliding_windows(50, max_length=16, stride=6)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, 50))
    assert all(first - begin >= 16 - 6 for begin, _, first in windows[1:]) and windows[-1][1] == 50


def test_perplexity_is_exp_of_the_mean_token_nll(lms, texts):
    model, _, _ = lms["llama"]
    tokens = PackedText(texts[1], word_tokenizer(), seq_len=16).tokens[:40]
    with torch.no_grad():  # one window: token t given tokens[:t]
        logits = model(tokens[None])[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1].double(), tokens[1:])
    assert perplexity(model, tokens, max_length=40) == pytest.approx(math.exp(float(nll)), rel=1e-6)
    losses = []  # sliding windows of 16, stride 8: each token given the rest of its window before it
    with torch.no_grad():
        for begin, end, first in sliding_windows(len(tokens), 16, 8):
            log_probs = model(tokens[None, begin:end])[0].double().log_softmax(-1)
            losses += [-log_probs[t - 1 - begin, tokens[t]] for t in range(first, end)]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert perplexity(model, tokens, max_length=16, stride=8, batch_size=2) == pytest.approx(expected, rel=1e-6)


# --- one-shot methods -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_methods_meet_the_target_exactly(lms, family):
    model, architecture, calibration = lms[family]
    head = model.hf.get_output_embeddings().weight.detach().clone()
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("unstructured", "2:4"):
            result = ptsparse.sparsify(model, calibration, method=method, pattern=pattern, sparsity=0.5,
                                       progress=False, architecture=architecture)
            assert ptsparse.sparsity_of(result.model) == 0.5, (method, pattern)
            assert torch.equal(result.model.hf.get_output_embeddings().weight, head)  # the output layer is dense
            if pattern == "2:4":
                for target in find_targets(result.model):
                    zeros = (target.weight.reshape(target.shape[0], -1, 4) == 0).sum(-1)
                    assert bool((zeros >= 2).all()), target.name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_block_by_block_pruning_gives_the_masks_of_whole_model_passes(lms, family, criterion):
    model, _, calibration = lms[family]
    chains = find_chains(model, find_targets(model), calibration, batch_size=4)
    assert [chain.names for chain in chains] == [[f"{BLOCKS[family]}.0", f"{BLOCKS[family]}.1"]]
    outcomes = []
    for cached, offload in ((True, False), (False, False), (True, True)):
        copied = copy.deepcopy(model)
        targets = find_targets(copied)
        moves = RecordingOffload.of(copied, targets, "cpu") if offload else None
        masks = prune_model(copied, targets, {t.name: t.numel // 2 for t in targets}, Unstructured(),
                            CRITERIA.get(criterion)(), calibration, batch_size=4, cache_block_inputs=cached,
                            offload=moves)
        outcomes.append((masks, {t.name: t.weight.detach().clone() for t in targets}))
    (masks, weights), *others = outcomes
    for other_masks, other_weights in others:
        assert all(torch.equal(masks[name], other_masks[name]) for name in masks)
        assert all(torch.allclose(weights[name], other_weights[name], atol=1e-6) for name in weights)
    assert all(torch.equal(weights[name], others[1][1][name]) for name in weights)  # offload: the same computation
    # offload: each decoder layer runs alone on the device; on cached inputs without the embedding
    assert moves.block_names == tuple(chains[0].names)
    assert {name for name, _, _ in moves.runs} == set(chains[0].names)
    assert all(on_device == [name] for name, on_device, _ in moves.runs)
    assert any(not embedding for _, _, embedding in moves.runs) and not moves.on_device


def test_offload_gives_the_same_run_and_owl_goes_block_by_block(lms):
    model, _, calibration = lms["llama"]
    runs = {offload: ptsparse.sparsify(model, calibration, method="wanda", allocation="owl", owl_max_deviation=0.2,
                                       sparsity=0.5, batch_size=4, offload=offload, progress=False)
            for offload in (False, True)}
    assert runs[True].report["allocation_search"] == runs[False].report["allocation_search"]
    assert all(torch.equal(runs[True].masks[name], runs[False].masks[name]) for name in runs[False].masks)
    assert len({entry["sparsity"] for entry in runs[True].report["allocation_search"]["layers"].values()}) == 2
    summary = format_table(runs[True].report)
    assert runs[True].report["peak_device_memory_mb"] is None and "(tensors included: the device is the CPU)" in summary
    assert "calibration 8 sequences of 16 tokens (hash " in summary


def test_owl_statistics_under_offload_are_those_of_one_pass_one_block_on_the_device_at_a_time(lms):
    model, _, calibration = lms["qwen2"]
    model = copy.deepcopy(model)
    targets = find_targets(model)
    budgets = [LayerBudget(t.name, tuple(t.shape)) for t in targets]
    plain = OWL(max_deviation=0.2).allocate(budgets, 0.5, context=AllocationContext(model, targets, calibration, 4))
    moves = RecordingOffload.of(model, targets, "cpu")
    offloaded = OWL(max_deviation=0.2).allocate(budgets, 0.5, context=AllocationContext(
        model, targets, calibration, 4, offload=moves))
    assert offloaded == plain and len(set(plain.values())) == 2
    assert {name for name, _, _ in moves.runs} == {f"{BLOCKS['qwen2']}.{i}" for i in range(2)}
    assert all(on_device == [name] for name, on_device, _ in moves.runs)
    assert any(not embedding for _, _, embedding in moves.runs) and not moves.on_device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offload_keeps_peak_gpu_memory_far_below_the_model(method):
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=32,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                      max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = zoo.HFCausalLM(transformers.LlamaForCausalLM(config)).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # about 134 MB, a block 4 MB
    tokens = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    offloaded = ptsparse.sparsify(model, tokens, method=method, sparsity=0.5, batch_size=8, device="cuda",
                                  offload=True, progress=False)
    peak = torch.cuda.max_memory_allocated(device)
    assert offloaded.report["peak_device_memory_mb"] == round(peak / 2**20, 1)
    assert peak < model_bytes / 2
    plain = ptsparse.sparsify(model, tokens, method=method, sparsity=0.5, batch_size=8, device="cuda",
                              progress=False)
    assert plain.report["peak_device_memory_mb"] * 2**20 > model_bytes  # the whole model was on the GPU
    assert ptsparse.sparsity_of(offloaded.model) == ptsparse.sparsity_of(plain.model) == 0.5
    if method == "wanda":  # no weight update: the masks do not depend on the order of float sums on the GPU
        assert all(torch.equal(offloaded.masks[name], plain.masks[name]) for name in plain.masks)


# --- distillation -----------------------------------------------------------------------------------------

def test_block_mse_is_a_mean_over_token_positions_and_unchanged_for_images():
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = float((student - teacher).pow(2).sum(-1).mean())  # summed over the hidden size, mean over tokens
    assert float(output_mse(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert float(output_mse(student.repeat(1, 3, 1), teacher.repeat(1, 3, 1))) == pytest.approx(expected, rel=1e-6)
    images, reference = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)  # (batch, channels, h, w): over channels
    assert torch.equal(output_mse(images, reference), (images - reference).pow(2).sum(1).mean())


def test_taylor_scores_a_causal_lm_by_next_token_cross_entropy(lms):
    model, _, calibration = lms["gpt2"]
    x = calibration.inputs[:2]
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert torch.equal(taylor_loss(logits, x, None), expected)
    classes = torch.randn(4, 10)  # a classifier: against its labels, else its arg-max
    assert torch.equal(taylor_loss(classes, torch.randn(4, 3), None),
                       torch.nn.functional.cross_entropy(classes, classes.argmax(1)))



@contextlib.contextmanager
def time_limit(seconds: int):
    """Fails the test, instead of hanging it, when the block runs longer than ``seconds`` (pure-Python loops such
    as torch-pruning's grouping are interrupted by the alarm)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    except TimeoutError as error:  # its traceback, deep in a library, is not shown
        pytest.fail(str(error), pytrace=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_prunes_whole_channels_of_every_causal_lm_family(lms, family):
    pytest.importorskip("torch_pruning")
    model, _, calibration = lms[family]
    with time_limit(60):  # llama and qwen2 (grouped-query attention) made torch-pruning's grouping run for ever
        result = ptsparse.sparsify(model, calibration, method="taylor", sparsity=0.5, batch_size=4, progress=False)
    assert ptsparse.sparsity_of(result.model) == pytest.approx(0.5, abs=0.02)
    rows = {name: mask.flatten(1).all(1) for name, mask in result.masks.items()}
    assert all(bool((mask.flatten(1).all(1) | ~mask.flatten(1).any(1)).all()) for mask in result.masks.values())
    assert all(0 < int((~kept).sum()) < len(kept) for kept in rows.values())  # every layer loses rows, keeps some
    stream = [kept for name, kept in rows.items() if name.endswith(STREAM[family])]
    assert len(stream) == 4 and all(torch.equal(kept, stream[0]) for kept in stream)  # the residual stream: one unit
    for name in rows:
        if name.endswith("gate_proj"):  # SwiGLU: gate and up multiplied, one unit
            assert torch.equal(rows[name], rows[name.replace("gate_proj", "up_proj")])
    assert not any("forward" in vars(module) for module in result.model.modules())  # no stand-in left behind
    assert any("does not take language models" in warning for warning in result.report["warnings"])
    assert not any("--format channels" in warning for warning in result.report["warnings"])  # it refuses LMs


def test_grouped_query_attention_is_traced_through_a_stand_in_and_its_projections_prune_rows_alone(lms):
    pytest.importorskip("torch_pruning")
    from ptsparse.graph.coupling import channel_groups, opaque_readers

    model, _, calibration = lms["llama"]  # 2 query heads share 1 key/value head
    attention = model.get_submodule("hf.model.layers.0.self_attn")
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (32, 16)
    assert opaque_readers(model)[attention].reads == (attention.q_proj, attention.k_proj, attention.v_proj)
    with time_limit(60):
        groups = channel_groups(model, calibration.inputs[:2], [t.name for t in find_targets(model)])
    members = sorted(sorted(group.members) for group in groups)
    assert members == sorted([[f"hf.model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")] for i in (0, 1)] + [
        [f"hf.model.layers.{i}.{part}" for i in (0, 1) for part in ("mlp.down_proj", "self_attn.o_proj")]])
    gpt2 = lms["gpt2"][0]  # no grouped queries: traced as it is, q, k and v rows coupled
    assert not opaque_readers(gpt2)


def test_unstructured_taylor_is_refused_before_any_work_in_one_line(lms):
    model, _, calibration = lms["llama"]
    with pytest.raises(IncompatibleOptionsError) as caught:
        ptsparse.sparsify(model, calibration, method="magnitude", criterion="taylor", pattern="unstructured",
                          sparsity=0.5, progress=False)
    assert str(caught.value) == "criterion 'taylor' does not support pattern 'unstructured'; use pattern channel"

def test_unipts_kd_fitness_averages_the_kl_over_token_positions(lms):
    model, _, calibration = lms["opt"]
    model = copy.deepcopy(model)
    targets = find_targets(model)
    evaluate = FitnessEvaluator(AllocationContext(model, targets, calibration, batch_size=4), bn_samples=4,
                                fit_samples=4, temperature=2.0)
    assert evaluate({t.name: 0 for t in targets})[0] == 0.0
    fitness, _ = evaluate({t.name: t.numel // 2 for t in targets})
    with torch.no_grad():
        sparse = evaluate.model(evaluate.fit_slice.inputs).double() / 2.0
        dense = model(evaluate.fit_slice.inputs).double() / 2.0
    per_token = (dense.softmax(-1) * (dense.log_softmax(-1) - sparse.log_softmax(-1))).sum(-1)  # (samples, tokens)
    assert fitness == pytest.approx(-float(per_token.mean()), rel=1e-4)


def test_tracing_exports_and_latency_refuse_a_language_model_in_one_line(capsys, lm_dirs, texts, tmp_path):
    spec = f"hf:{lm_dirs['llama']}"
    assert zoo.image_input_shape(spec) is None
    for given in (None, (16,)):
        with pytest.raises(ConfigError, match=r"reads token ids: tracing exports \(channels, onnx\) and bench-latency"):
            input_shape_for(spec, given)
    out = tmp_path / "run"
    assert run_cli(capsys, "sparsify", "--model", spec, "--data", f"text:{texts[0]}", "--method", "magnitude",
                   "--seq-len", "16", "--calib-size", "4", "--out", out, "-q")[0] == 0
    for argv in (("export", out, "--format", "onnx", "--out", tmp_path / "model.onnx"),
                 ("bench-latency", out, "--repeats", "1", "--warmup", "0")):
        code, _, stderr = run_cli(capsys, *argv)
        lines = [line for line in stderr.splitlines() if line.startswith("ptsparse: error")]
        assert code == 2 and len(lines) == 1 and "reads token ids" in lines[0], stderr


def test_kd_kl_averages_the_per_token_kl_over_positions():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    per_token = [kd_kl(student[b, s][None], teacher[b, s][None], 2.0) for b in range(2) for s in range(5)]
    assert kd_kl(student, teacher, 2.0) == pytest.approx(float(torch.stack(per_token).mean()), rel=1e-5)


def test_flips_and_crops_leave_token_ids_as_they_are(lms):
    _, _, calibration = lms["llama"]
    schedule = TrainSchedule(iterations=4, batch_size=8, augment="flip_crop")
    for step in range(4):
        batch = batch_at(calibration, step, schedule)
        assert all(any(torch.equal(row, window) for window in calibration.inputs) for row in batch)


def assert_pruned_weights_stay_zero(result) -> None:
    targets = {t.name: t for t in find_targets(result.model)}
    assert result.masks.keys() == targets.keys()
    for name, mask in result.masks.items():
        assert bool((targets[name].weight[~mask] == 0).all()), name
    assert ptsparse.sparsity_of(result.model) == 0.5


def test_magnitude_kd_keeps_every_pruned_weight_zero(lms):
    model, _, calibration = lms["llama"]
    result = ptsparse.sparsify(model, calibration, method="magnitude_kd", sparsity=0.5, distill_iterations=5,
                               batch_size=4, progress=False)
    assert_pruned_weights_stay_zero(result)
    history = result.report["recovery"]["history"]
    assert history[-1]["step"] == 5 and all(math.isfinite(entry["kd"]) for entry in history)
    changed = [name for name, mask in result.masks.items()
               if not torch.equal(result.model.get_submodule(name).weight[mask],
                                  model.get_submodule(name).weight[mask])]
    assert changed  # the kept weights trained


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recommended_distils_decoder_layers_in_bf16_with_checkpointing(lms, family):
    model, _, calibration = lms[family]
    result = ptsparse.sparsify(model, calibration, method="recommended", sparsity=0.5, distill_iterations=3,
                               batch_size=4, distill_precision="bf16", distill_grad_checkpointing=True, progress=False)
    assert_pruned_weights_stay_zero(result)
    recovery = result.report["recovery"]
    assert recovery["objective"] == "kd_blocks" and recovery["history"][-1]["block_mse"] > 0  # blocks compared
    assert more_time_hint(result.report) == ("more time for a lower perplexity: --distill-iterations (this run: 3 "
                                             "steps)")


# --- command line -----------------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_sparsify_reports_dense_and_sparse_perplexity_and_eval_agrees(capsys, lm_dirs, texts, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "sparsify", "--model", f"hf:{lm_dirs['gpt2']}", "--data", f"text:{texts[0]}",
                              "--eval-data", f"text:{texts[1]}", "--method", "wanda", "--sparsity", "0.5",
                              "--seq-len", "32", "--calib-size", "8", "--out", out, "-q")
    assert code == 0 and "perplexity: dense " in stdout and "calibration 8 sequences of 32 tokens (hash" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "perplexity" and report["dense_accuracy"] is None
    assert report["dense_perplexity"] > 1 and report["sparse_perplexity"] > 1
    assert report["evaluation"] == {"metric": "perplexity", "max_length": 32, "stride": 16,
                                    "scored_tokens": report["evaluation"]["scored_tokens"]}
    assert report["data"]["calibration"] == "train split, 8 windows of 32 tokens"
    assert report["achieved_sparsity"] == 0.5 and report["calib_size"] == 8
    loaded = ptsparse.load(out)  # the tied output layer and GPT-2's Conv1D layout survive saving
    assert loaded.hf.get_output_embeddings().weight is loaded.hf.get_input_embeddings().weight
    code, stdout, stderr = run_cli(capsys, "eval", "--model", out, "--data", f"text:{texts[1]}", "--seq-len", "32",
                                   "-q")
    evaluated = json.loads(stdout)
    assert code == 0 and evaluated["perplexity"] == pytest.approx(report["sparse_perplexity"], rel=1e-9)
    assert evaluated["stride"] == 16 and evaluated["sparsity"] == 0.5 and "perplexity" in stderr



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eval_offload_gives_the_same_perplexity_one_decoder_layer_on_the_device_at_a_time(capsys, monkeypatch,
                                                                                         lm_dirs, texts, family):
    made = []

    class Recorded(RecordingOffload):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr("ptsparse.offload.Offload", Recorded)
    argv = ("eval", "--model", f"hf:{lm_dirs[family]}", "--data", f"text:{texts[1]}", "--seq-len", "16", "-q")
    (code, plain, _), (offloaded_code, offloaded, _) = run_cli(capsys, *argv), run_cli(capsys, *argv, "--offload")
    assert code == offloaded_code == 0 and len(made) == 1
    assert json.loads(offloaded)["perplexity"] == json.loads(plain)["perplexity"] > 1  # the same number
    moves, = made
    assert moves.block_names == (f"{BLOCKS[family]}.0", f"{BLOCKS[family]}.1")
    assert {name for name, _, _ in moves.runs} == set(moves.block_names)
    assert all(on_device == [name] and embedding for name, on_device, embedding in moves.runs)
    assert not moves.on_device  # all back in CPU memory


def test_eval_offload_of_a_classifier_is_refused_in_one_line(capsys):
    code, _, stderr = run_cli(capsys, "eval", "--model", "reference", "--offload", "-q")
    lines = [line for line in stderr.splitlines() if line.startswith("ptsparse: error")]
    assert code == 2 and lines == ["ptsparse: error: --offload scores a causal language model's perplexity one "
                                   "decoder layer at a time; model 'reference' is a classifier: drop --offload"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_eval_on_a_device_that_is_not_there_is_one_line(capsys, lm_dirs, texts):
    code, _, stderr = run_cli(capsys, "eval", "--model", f"hf:{lm_dirs['llama']}", "--data", f"text:{texts[1]}",
                              "--device", "cuda", "--offload", "-q")
    assert code == 2 and "device 'cuda' is not available: no CUDA device is visible; use --device cpu" in stderr

def test_cli_without_held_out_text_says_so(capsys, lm_dirs, texts):
    code, stdout, stderr = run_cli(capsys, "sparsify", "--model", f"hf:{lm_dirs['llama']}", "--data",
                                   f"text:{texts[0]}", "--method", "magnitude", "--seq-len", "16", "--calib-size",
                                   "4", "-q")
    assert code == 0 and "no --eval-data: perplexity is not measured" in stderr
    assert "perplexity: dense n/a  sparse n/a" in stdout


@pytest.mark.parametrize("argv, message", [
    (("--seq-len", "5000"), r"holds \d+ tokens, fewer than one window of --seq-len 5000; give more text or a "
                            r"seq_len of at most \d+"),
    (("--seq-len", "1"), "sequence length must be an integer >= 2, got 1"),
    (("--seq-len", "100"), "sequences of 100 tokens are longer than the model's 64 positions"),
])
def test_cli_bad_text_input_is_one_line(capsys, lm_dirs, texts, argv, message):
    code, _, stderr = run_cli(capsys, "sparsify", "--model", f"hf:{lm_dirs['opt']}", "--data", f"text:{texts[0]}",
                              "--method", "magnitude", "--calib-size", "2", "-q", *argv)
    lines = [line for line in stderr.splitlines() if line.startswith("ptsparse: error")]
    assert code == 2 and len(lines) == 1
    assert re.search(message, lines[0]), lines[0]


def test_eval_of_a_causal_lm_needs_text_and_a_stride_inside_the_window(capsys, lm_dirs, texts):
    code, _, stderr = run_cli(capsys, "eval", "--model", f"hf:{lm_dirs['qwen2']}", "--data", "fashion-mnist")
    assert code == 2 and "a causal language model is evaluated by perplexity on text" in stderr
    code, _, stderr = run_cli(capsys, "eval", "--model", f"hf:{lm_dirs['qwen2']}", "--data", f"text:{texts[1]}",
                              "--seq-len", "16", "--stride", "16", "-q")
    assert code == 2 and "perplexity stride 16 is not allowed; it must be in [1, 15]" in stderr
    with pytest.raises(DataError, match="fewer than one window"):
        PackedText(texts[1], word_tokenizer(), seq_len=10_000)
