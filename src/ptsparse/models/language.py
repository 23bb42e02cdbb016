"""The project's recipe for its reference language model: a small Llama trained on the Python documentation.

Corpus: the reStructuredText sources of the Python 3.11 documentation from the Debian package
``python3.11-doc`` (PSF licence), split by file (:mod:`ptsparse.data.python_docs`).
Tokenizer: byte-level BPE trained with ``tokenizers`` on the training split (:func:`train_tokenizer`), saved as
a ``transformers`` fast tokenizer; it adds no special tokens, so a text's ids are the same from any caller.
Model (:func:`reference_lm_config`): ``LlamaForCausalLM``, 4 decoder layers, hidden 192, 4 heads, SwiGLU MLP of
512, RoPE, untied input embedding and output head (so the head is a Linear of its own that can be pruned
apart from the embedding), about 3.3M parameters (6.7 MB at fp16).
Training (:class:`LMRecipe`): windows of ``seq_len + 1`` tokens drawn at random from the training split's
token stream by a seeded generator, AdamW (betas 0.9 / 0.95, weight decay 0.1 on matrices only), linear
warm-up then cosine decay to a tenth of the peak, gradient clipping at 1, a fixed number of steps, one seed.
Evaluation (:func:`evaluate_reference_lm`): perplexity over a held-out split's whole text, in non-overlapping
windows of ``seq_len`` tokens, and in windows of ``seq_len`` every ``seq_len // 2`` tokens (as ``ptsparse
eval`` measures it).

``python -m ptsparse.models.language train --out DIR`` retrains it, ``... eval DIR`` measures a saved model
again, and ``... texts DIR`` writes the calibration and held-out texts the CLI reads (``--data text:FILE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import require
from .._progress import progress
from ..data import python_docs

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
METADATA = "ptsparse_reference_lm.json"  # beside config.json in the model's directory


@dataclass(frozen=True)
class LMRecipe:
    """Hyper-parameters of the reference language model's training run."""

    vocab_size: int = 4096
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 800
    warmup_steps: int = 100
    max_lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0


def reference_lm_config(recipe: LMRecipe = LMRecipe(), vocab_size: int | None = None) -> Any:
    """The ``LlamaConfig`` of the reference language model (``vocab_size`` overrides the recipe's, e.g. with the
    trained tokenizer's actual size)."""
    transformers = require("transformers", "the reference language model", extra="hf")
    return transformers.LlamaConfig(
        vocab_size=vocab_size or recipe.vocab_size, hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=max(512, recipe.seq_len), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=0, pad_token_id=None,
    )


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``transformers`` fast tokenizer.

    Every byte is in the alphabet, so any text encodes; :data:`EOS` is id 0 and is never added automatically.
    Training is deterministic for the same texts.
    """
    tokenizers = require("tokenizers", "the reference language model's tokenizer", extra="hf")
    transformers = require("transformers", "the reference language model's tokenizer", extra="hf")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS,
                                                model_max_length=1_000_000_000, clean_up_tokenization_spaces=False)


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """The token ids of ``text`` as one int64 vector (no special tokens added)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _causal_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``window`` (batch, length + 1): inputs all but the last token."""
    logits = model(input_ids=window[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 32,
               max_tokens: int | None = None, show_progress: bool = False) -> dict:
    """Perplexity of a Hugging Face causal LM on a token stream over non-overlapping windows of ``seq_len``
    tokens: a window's first token is context only, and the tail shorter than a window is dropped. (The
    sliding-window perplexity of ``ptsparse eval`` is :func:`ptsparse.evaluate.perplexity`.)

    Args:
        ids: the token ids, one vector.
        max_tokens: use only the stream's first ``max_tokens`` tokens.

    Returns:
        ``{"perplexity", "nll", "tokens" (scored), "seq_len", "stride"}``.

    Raises:
        ValueError: the stream holds no window.
    """
    ids = ids[:max_tokens] if max_tokens else ids
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if len(windows) == 0:
        raise ValueError(f"{len(ids)} tokens hold no window of {seq_len}")
    was_training = model.training
    model.eval()
    total = 0.0
    for begin in progress(range(0, len(windows), batch_size), show_progress, "perplexity"):
        batch = windows[begin: begin + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                       .double().sum())
    model.train(was_training)
    count = windows[:, 1:].numel()
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count, "seq_len": seq_len,
            "stride": seq_len}


def sliding_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 128, show_progress: bool = False) -> dict:
    """Perplexity as ``ptsparse eval`` measures it (:func:`ptsparse.evaluate.perplexity`): windows of ``seq_len``
    tokens every ``seq_len // 2``, every token after the first scored once, as :func:`perplexity` reports it."""
    from ..evaluate import perplexity as sliding
    from .zoo import HFCausalLM

    value = sliding(HFCausalLM(model), ids, seq_len, seq_len // 2, batch_size=32, show_progress=show_progress)
    return {"perplexity": value, "nll": math.log(value), "tokens": len(ids) - 1, "seq_len": seq_len,
            "stride": seq_len // 2}


def _learning_rate(recipe: LMRecipe, step: int) -> float:
    """Linear warm-up to ``max_lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * max_lr``."""
    if step < recipe.warmup_steps:
        return recipe.max_lr * (step + 1) / recipe.warmup_steps
    done = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_ratio * recipe.max_lr
    return floor + 0.5 * (recipe.max_lr - floor) * (1 + math.cos(math.pi * min(1.0, done)))


def train_lm(recipe: LMRecipe, train_ids: torch.Tensor, vocab_size: int,
             show_progress: bool = True, log_every: int = 50) -> tuple[nn.Module, dict]:
    """Trains a fresh reference-architecture LM on a token stream (the recipe's steps, seed and schedule).

    Args:
        train_ids: the training token stream, one int64 vector longer than ``recipe.seq_len``.
        vocab_size: the tokenizer's vocabulary size.
        log_every: log the mean training loss every this many steps.

    Returns:
        The model (eval mode) and ``{"losses": per-step training loss, "final_train_loss": mean of the last
        50 steps, "train_time_s" (wall clock), "train_cpu_s" (this process's CPU time: with one thread, the
        time on one core whatever else shares the machine)}``.
    """
    transformers = require("transformers", "the reference language model", extra="hf")
    if len(train_ids) <= recipe.seq_len + 1:
        raise ValueError(f"{len(train_ids)} training tokens hold no window of {recipe.seq_len + 1}")
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # weight initialisation only; the caller's global RNG is restored
        model = transformers.LlamaForCausalLM(reference_lm_config(recipe, vocab_size)).float()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.max_lr, betas=recipe.betas)
    offsets = torch.arange(recipe.seq_len + 1)
    losses: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    model.train()
    for step in progress(range(recipe.steps), show_progress, "train"):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        begins = torch.randint(0, len(train_ids) - recipe.seq_len, (recipe.batch_size,), generator=generator)
        loss = _causal_loss(model, train_ids[begins[:, None] + offsets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("step %d/%d: train loss %.4f (%.0f s)", step + 1, recipe.steps,
                     sum(losses[-log_every:]) / len(losses[-log_every:]), time.perf_counter() - start)
    model.eval()
    tail = losses[-50:]
    return model, {"losses": losses, "final_train_loss": sum(tail) / len(tail),
                   "train_time_s": round(time.perf_counter() - start, 1),
                   "train_cpu_s": round(time.process_time() - start_cpu, 1)}


def _load_as_float32(config_path: Path) -> None:
    """Makes ``from_pretrained`` (whose default dtype is the config's) load float16 weights as float32."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def evaluate_reference_lm(directory: str | os.PathLike, corpus: str | os.PathLike | None = None, seq_len: int = 128,
                          sample_tokens: int = 512, show_progress: bool = False) -> dict:
    """Perplexities of the model saved in ``directory`` (loaded as ``from_pretrained`` loads it) on the
    corpus's held-out splits.

    Returns:
        ``{"validation", "test"}``: non-overlapping windows of ``seq_len`` tokens; ``{"validation_sliding",
        "test_sliding"}``: windows of ``seq_len`` tokens every ``seq_len // 2`` (each token scored once, as
        ``ptsparse eval`` does); ``"test_sample"``: non-overlapping windows over the test split's first
        ``sample_tokens`` tokens, which a quick test recomputes. Each as :func:`perplexity` returns it.
    """
    transformers = require("transformers", "the reference language model", extra="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    evaluation = {}
    for split in ("validation", "test"):
        ids = encode(tokenizer, python_docs.split_text(split, corpus))
        evaluation[split] = perplexity(model, ids, seq_len, show_progress=show_progress)
        evaluation[f"{split}_sliding"] = sliding_perplexity(model, ids, seq_len, show_progress=show_progress)
        for name in (split, f"{split}_sliding"):
            log.info("%s perplexity %.3f (%d tokens scored, stride %d)", split, evaluation[name]["perplexity"],
                     evaluation[name]["tokens"], evaluation[name]["stride"])
    evaluation["test_sample"] = perplexity(model, ids, seq_len, max_tokens=sample_tokens)
    return evaluation


def train_reference_lm(out: str | os.PathLike, recipe: LMRecipe = LMRecipe(), corpus: str | os.PathLike | None = None,
                       show_progress: bool = True, sample_tokens: int = 512) -> dict:
    """Trains the tokenizer and the model on the corpus's training split and saves both to ``out``.

    ``out`` then holds a Hugging Face directory (``config.json``, ``model.safetensors`` in float16, tokenizer
    files), loadable as ``--model hf:DIR`` and by ``AutoModelForCausalLM.from_pretrained`` (as float32: the
    config says so), and :data:`METADATA`: the corpus package, version, licence, digest and split rule, the
    recipe, the training time and final loss, and the perplexities of :func:`evaluate_reference_lm` (of the
    saved float16 weights).

    Returns:
        The metadata.
    """
    files = python_docs.split_files("train", corpus)
    texts = [python_docs.read_file(name, corpus) for name in files]
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, recipe.vocab_size)
    log.info("tokenizer: %d tokens in %.0f s", len(tokenizer), time.perf_counter() - started)
    train_ids = encode(tokenizer, python_docs.SEPARATOR.join(texts))
    log.info("training split: %d files, %d characters, %d tokens", len(files), sum(map(len, texts)), len(train_ids))
    model, trained = train_lm(recipe, train_ids, len(tokenizer), show_progress)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    _load_as_float32(out / "config.json")
    tokenizer.save_pretrained(out)
    transformers = require("transformers", "the reference language model", extra="hf")
    metadata = {
        "model": "LlamaForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": False,
        "corpus": {
            "package": python_docs.PACKAGE, "version": python_docs.package_version(),
            "license": python_docs.LICENSE, "files": "html/_sources/**/*.rst.txt",
            "sha256": python_docs.corpus_digest(corpus), "split_rule": python_docs.SPLIT_RULE,
            "split_files": {split: len(python_docs.split_files(split, corpus)) for split in python_docs.SPLITS},
            "train_tokens": len(train_ids),
        },
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer), "eos": EOS},
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "train_time_s": trained["train_time_s"],
        "train_cpu_s": trained["train_cpu_s"],
        "final_train_loss": round(trained["final_train_loss"], 4),
        "loss_every_50_steps": [round(sum(trained["losses"][i:i + 50]) / len(trained["losses"][i:i + 50]), 4)
                                for i in range(0, len(trained["losses"]), 50)],
        "eval": evaluate_reference_lm(out, corpus, recipe.seq_len, sample_tokens, show_progress),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def write_texts(directory: str | os.PathLike, corpus: str | os.PathLike | None = None,
                calibration_chars: int = 1_000_000, seed: int = 0) -> dict[str, Path]:
    """Writes the texts the CLI reads (``--data text:FILE``) to ``directory``.

    ``validation.txt`` and ``test.txt`` are those splits' texts (:func:`ptsparse.data.python_docs.split_text`),
    the held-out text the recorded perplexities are measured on; ``calibration.txt`` is drawn from the
    training split: its files in an order shuffled by ``seed``, taken until ``calibration_chars`` characters,
    then written in sorted order, joined like a split's text.

    Returns:
        ``{"calibration": path, "validation": path, "test": path}``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = python_docs.split_files("train", corpus)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, size = [], 0
    for index in order:
        if size >= calibration_chars:
            break
        chosen.append(files[index])
        size += len(python_docs.read_file(files[index], corpus))
    texts = {"calibration": python_docs.SEPARATOR.join(python_docs.read_file(name, corpus) for name in sorted(chosen))}
    texts.update({split: python_docs.split_text(split, corpus) for split in ("validation", "test")})
    paths = {}
    for name, text in texts.items():
        path = directory / f"{name}.txt"
        temporary = path.with_suffix(".txt.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptsparse.models.language", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the tokenizer and the model, save them to --out")
    train.add_argument("--out", required=True, help="the model directory to write")
    train.add_argument("--corpus", default=None, help=f"the _sources directory (default {python_docs.DEFAULT_DIR})")
    for field, default in asdict(LMRecipe()).items():
        if not isinstance(default, tuple):
            train.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log")
    evaluate = commands.add_parser("eval", help=f"measure a saved model's perplexities again, into its {METADATA}")
    evaluate.add_argument("directory")
    evaluate.add_argument("--corpus", default=None)
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log")
    texts = commands.add_parser("texts", help="write calibration.txt, validation.txt and test.txt to a directory")
    texts.add_argument("directory")
    texts.add_argument("--corpus", default=None)
    args = parser.parse_args(argv)
    from ..errors import PtsparseError

    try:
        if args.command == "texts":
            for name, path in write_texts(args.directory, args.corpus).items():
                print(f"{name}: {path}")
            return 0
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
        if args.command == "eval":
            path = Path(args.directory) / METADATA
            metadata = json.loads(path.read_text()) if path.is_file() else {}
            seq_len = metadata.get("recipe", {}).get("seq_len", LMRecipe.seq_len)
            metadata["eval"] = evaluate_reference_lm(args.directory, args.corpus, seq_len,
                                                     show_progress=not args.quiet)
            path.write_text(json.dumps(metadata, indent=2) + "\n")
            print(json.dumps({name: round(value["perplexity"], 3) for name, value in metadata["eval"].items()}))
            return 0
        fields = {name: getattr(args, name) for name in asdict(LMRecipe()) if hasattr(args, name)}
        metadata = train_reference_lm(args.out, LMRecipe(**fields), args.corpus, show_progress=not args.quiet)
    except PtsparseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: metadata[k] for k in ("parameters", "train_time_s", "final_train_loss")}
                     | {split: round(metadata["eval"][split]["perplexity"], 3) for split in ("validation", "test")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
