"""``ptsparse`` command line: a thin layer over the Python API.

Sub-commands: ``sparsify``, ``eval``, ``report``, ``list``, ``train-reference``, ``export``,
``bench-latency``. Errors from ptsparse
print on one line and exit with status 2, without a traceback. Under ``torchrun`` (``torchrun --nproc-per-node N
-m ptsparse sparsify ...``) the command runs data-parallel in the launch's process group
(:mod:`ptsparse.distributed`): rank 0 alone prints the results and writes; an error on one rank ends every rank,
and the rank that failed prints it on one line naming itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import distributed
from ._registry import did_you_mean
from .config import (
    AXES, AXIS_SETTINGS, DEFAULT_METHOD, FLAT_KEYS, MOVED_KEYS, RUN_FIELDS, SECTIONS, SparsityConfig, read_config_file,
    resolve_config)
from .errors import ConfigError, PeerFailedError, PtsparseError
from .export import FORMATS
from .options import default_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ptsparse")


def _flag(key: str) -> str:
    """The flag of config key ``key``: ``--calib-size`` for ``calib_size``."""
    return "--" + key.replace("_", "-")


def _add_flag(group, key: str, f: dataclasses.Field, help: str | None = None) -> None:
    """The flag of config key ``key``, typed by its option's rule; its default is ``None`` so only flags
    actually given override the config file and the preset."""
    flag, kind = _flag(key), f.metadata["rule"].kind
    if help is None:
        default = default_of(f)
        shown = "auto" if default is None else " ".join(default) if isinstance(default, tuple) else default
        help = f"{f.metadata['help']} (default: {shown})"
    if kind is bool:
        group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help)
    elif kind is tuple:
        group.add_argument(flag, dest=key, nargs="+", default=None, metavar="NAME", help=help)
    else:
        group.add_argument(flag, dest=key, type=kind, default=None, help=help)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per run field and per part option, grouped by axis; moved keys of earlier releases stay as
    hidden flags."""
    run = parser.add_argument_group("run (also keys of --config)")
    for f in RUN_FIELDS:
        if f.metadata["cli"]:
            _add_flag(run, f.name, f)
    for axis, parts in AXIS_SETTINGS.items():
        if not parts:
            continue
        group = parser.add_argument_group(
            f"{axis} options (of the part --{axis} picks; in --config flat, or nested as PART: {{OPTION: value}}; "
            f"a method's preset may change the defaults: `ptsparse list methods --details`)")
        for settings in parts:
            for f in dataclasses.fields(settings):
                _add_flag(group, f"{settings.part}_{f.name}", f)
    for key, (target, *_) in MOVED_KEYS.items():
        part, name = FLAT_KEYS[target]
        _add_flag(parser, key, next(f for f in dataclasses.fields(SECTIONS[part]) if f.name == name),
                  help=argparse.SUPPRESS)


# What a run's --config file may give besides the config: the run's inputs, which the command line overrides.
INPUT_KEYS = ("model", "weights", "data", "eval_data", "data_dir", "image_size", "resize", "seq_len", "out")


def _config_from_args(args: argparse.Namespace) -> SparsityConfig:
    """The run's config from --config, the flags and the preset; the file's inputs (``model``, ``data``,
    ``out``, ...) fill the flags left at their defaults."""
    keys: dict[str, Any] = read_config_file(args.config, INPUT_KEYS) if args.config else {}
    for key in INPUT_KEYS:
        value = keys.pop(key, None)
        if value is not None and getattr(args, key, None) == args.parser.get_default(key):
            setattr(args, key, value)
    for key in (*(f.name for f in RUN_FIELDS), *FLAT_KEYS, *MOVED_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            keys[key] = value
    if args.quiet:
        keys["progress"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        config = resolve_config(keys)
    for message in dict.fromkeys(str(w.message) for w in caught):  # a moved key's notice, once each
        _warn(message)
    return config


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist, an image folder (class sub-folders, or images without labels; train/ "
                             "and val/ if present), or text:FILE for hf: text models (a causal LM reads the whole "
                             "file as one token stream cut into --seq-len windows; a classifier one sample per line)")
    parser.add_argument("--data-dir", default=None,
                        help="directory of the Fashion-MNIST IDX files (default: $PTSPARSE_FASHION_MNIST_DIR "
                             "or /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="crop size for image folders (default: the model's own, e.g. 224 for torchvision "
                             "ImageNet models; 28 for the reference model); the resize keeps its ratio to it")
    parser.add_argument("--resize", type=int, default=None,
                        help="shorter side before the centre crop, for torchvision:, timm: and hf: models (default: "
                             "the model's own, e.g. 232 for torchvision's V2 weights; 256 fits its V1 weights)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="tokens per text:FILE sample: a window of a causal LM's packed text (also its perplexity "
                             "window), a line of a classifier's (default 128)")


def _model_flags(parser: argparse.ArgumentParser, default: str = "reference") -> None:
    parser.add_argument("--model", default=default,
                        help="reference (the ResNet-20) or reference_mobilenet (the compact MobileNet); "
                             "torchvision:NAME, timm:NAME (random weights unless --weights; "
                             "NAME,key=value passes constructor arguments) or hf:DIRECTORY (a local Hugging Face "
                             "model); or a safetensors checkpoint / output directory written by ptsparse")
    parser.add_argument("--weights", default=None,
                        help="local weights for --model: a state dict in safetensors or a torch file "
                             "(read with weights_only=True)")


def _sources(args: argparse.Namespace, model, architecture: str | None, splits: tuple[str, ...],
             data: str | None = None) -> list:
    """The data of ``data`` (default ``--data``) for each split, preprocessed as the model expects: text is
    packed for a causal language model, one sample per line for a classifier."""
    from .data import load_source
    from .models import zoo

    data = str(args.data if data is None else data)
    options: dict[str, Any] = {"root": args.data_dir}
    if data.startswith("text:"):
        options.update(tokenizer=zoo.load_tokenizer(architecture or str(args.model)), seq_len=args.seq_len,
                       packed=zoo.is_causal_lm(model))
    elif data != "fashion-mnist" and architecture and zoo.is_spec(architecture):
        options["transform"] = zoo.image_transform(architecture, model, args.image_size, args.resize)
    elif args.image_size:
        options["image_size"] = args.image_size
    return [load_source(data, split, **options) for split in splits]


def _resume_dir(args: argparse.Namespace) -> Path | None:
    """Where ``sparsify --out OUT`` keeps an interrupted run's recovery checkpoint."""
    from .checkpoint import RESUME_DIR

    return Path(args.out) / RESUME_DIR if getattr(args, "out", None) else None


def _held_out(args: argparse.Namespace, model, architecture: str | None, source) -> tuple[Any, str | None]:
    """The data ``sparsify`` measures the dense and sparse models on, and what the report calls it: ``--eval-data``;
    else, for a classifier, the test split of ``--data`` when it has labels; ``(None, None)`` for none."""
    from .data import has_labels
    from .errors import DataError
    from .models import zoo

    if args.no_eval:
        return None, None
    if args.eval_data:
        data, = _sources(args, model, architecture, ("test",), args.eval_data)
        if not zoo.is_causal_lm(model) and not has_labels(data):
            raise DataError(f"--eval-data {str(args.eval_data)!r} carries no labels (no class folders); accuracy "
                            "needs them")
        return data, str(args.eval_data)
    if zoo.is_causal_lm(model):
        _warn("no --eval-data: perplexity is not measured (the calibration text is not held out); give held-out "
              "text with --eval-data text:FILE")
        return None, None
    if not has_labels(source):  # images without class folders and text carry no labels
        return None, None
    data, = _sources(args, model, architecture, ("test",))
    return (data, "test split") if has_labels(data) else (None, None)


def cmd_sparsify(args: argparse.Namespace) -> int:
    from .checkpoint import check_output_directory
    from .data import sample_calibration
    from .models import resolve_model, zoo
    from .recovery.trainer import checkpoint_step
    from .report import format_table, more_time_hint
    from .sparsify import sparsify

    config = _config_from_args(args)
    resume_dir = _resume_dir(args)
    if args.out:
        check_output_directory(args.out, args.force)
    if args.resume:
        if resume_dir is None:
            raise ConfigError("--resume needs --out: the checkpoint of an interrupted run lives in OUT/.resume")
        step = checkpoint_step(resume_dir)
        if step is None:
            raise ConfigError(f"--resume: no checkpoint in {resume_dir} to continue from (the run was not "
                              f"interrupted after its first checkpoint); run without --resume")
        print(f"ptsparse: resuming from the checkpoint at recovery step {step} in {resume_dir}", file=sys.stderr)
    model, architecture = resolve_model(args.model, args.weights)
    source, = _sources(args, model, architecture, ("train",))
    calibration = sample_calibration(source, config.calib_size, config.seed, config.calib_balanced)
    eval_data, evaluation = _held_out(args, model, architecture, source)
    result = sparsify(model, calibration, config, eval_data=eval_data, architecture=architecture,
                      checkpoint_dir=resume_dir, resume=args.resume)
    samples = f"{len(calibration)} windows of {args.seq_len} tokens" if zoo.is_causal_lm(model) else \
        f"{len(calibration)} samples"
    result.report["data"] = {"source": str(args.data), "calibration": f"train split, {samples}",
                             "evaluation": evaluation}
    if not distributed.is_main():
        return 0
    print(format_table(result.report))
    hint = more_time_hint(result.report)
    if hint:
        print(hint)
    if args.out:
        result.save(args.out, force=args.force)
        shutil.rmtree(resume_dir, ignore_errors=True)
        print(f"\nwrote {args.out}/model.safetensors, config.yaml, report.json")
    return 0


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command kept, and for ``sparsify`` the command that resumes it."""
    from .recovery.trainer import checkpoint_step

    resume_dir = _resume_dir(args) if args.command == "sparsify" else None
    step = checkpoint_step(resume_dir) if resume_dir is not None else None
    if step is None:
        return "ptsparse: interrupted; nothing was written"
    command = shlex.join(["ptsparse", *argv, *([] if "--resume" in argv else ["--resume"])])
    return (f"ptsparse: interrupted; kept the checkpoint at recovery step {step} in {resume_dir}; "
            f"continue with: {command}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import has_labels
    from .errors import DataError
    from .evaluate import accuracy
    from .export import load_model
    from .models import resolve_model, zoo
    from .sparsify import resolve_device, sparsity_of

    device = resolve_device(args.device)
    if zoo.is_spec(str(args.model)) or args.weights:
        model, architecture = resolve_model(args.model, args.weights)
    else:
        model, metadata = load_model(args.model)
        architecture = metadata.get("architecture")
    if zoo.is_causal_lm(model):
        return _eval_perplexity(args, model, architecture, device)
    if args.offload:
        raise ConfigError(f"--offload scores a causal language model's perplexity one decoder layer at a time; model "
                          f"{str(args.model)!r} is a classifier: drop --offload")
    data, = _sources(args, model, architecture, (args.split,))
    if not has_labels(data):
        raise DataError(f"data {str(args.data)!r} carries no labels (no class folders); accuracy needs them")
    result = {"model": str(args.model), "data": str(args.data), "split": args.split,
              "accuracy": accuracy(model.to(device), data, device=str(device), show_progress=not args.quiet),
              "sparsity": sparsity_of(model)}
    print(json.dumps(result, indent=2))
    print(f"ptsparse: accuracy {100 * result['accuracy']:.2f}% on the {args.split} split of {args.data}; "
          f"{100 * result['sparsity']:.2f}% of the weights are zeros", file=sys.stderr)  # stdout stays JSON
    return 0


def _eval_perplexity(args: argparse.Namespace, model, architecture: str | None, device: torch.device) -> int:
    """``ptsparse eval`` of a causal language model: its perplexity on the text of ``--data``; with ``--offload``
    the model stays in CPU memory and one decoder layer at a time runs on ``device`` (:mod:`ptsparse.offload`)."""
    from .errors import DataError
    from .evaluate import default_stride, perplexity
    from .offload import Offload, whole_model
    from .sparsify import sparsity_of
    from .targets import find_targets

    if not str(args.data).startswith("text:"):
        raise DataError(f"data {str(args.data)!r}: a causal language model is evaluated by perplexity on text; give "
                        "--data text:FILE (held-out text)")
    data, = _sources(args, model, architecture, (args.split,))
    stride = default_stride(args.seq_len) if args.stride is None else args.stride
    offload = Offload.of(model, find_targets(model), device) if args.offload else None
    if offload is None:
        model.to(device)
    with whole_model(offload):
        score = perplexity(model, data.tokens, args.seq_len, stride, device=device, show_progress=not args.quiet)
    result = {"model": str(args.model), "data": str(args.data), "perplexity": score,
              "max_length": args.seq_len, "stride": stride, "scored_tokens": len(data.tokens) - 1,
              "sparsity": sparsity_of(model)}
    print(json.dumps(result, indent=2))
    print(f"ptsparse: perplexity {result['perplexity']:.2f} on {args.data} ({result['scored_tokens']} tokens scored "
          f"in windows of {args.seq_len}, stride {stride}); {100 * result['sparsity']:.2f}% of the weights are "
          "zeros", file=sys.stderr)  # stdout stays JSON
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .errors import CheckpointError
    from .report import format_table, plot_layers

    directory = Path(args.directory)
    path = directory / "report.json" if directory.is_dir() else directory
    if not path.is_file():
        raise CheckpointError(f"no report at {path}; give a directory written by `ptsparse sparsify --out`")
    try:
        report = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"report {path} is not valid JSON: {error}") from None
    print(format_table(report))
    plot = Path(args.plot) if args.plot else path.parent / "sparsity.png"
    plot_layers(report, plot)
    print(f"\nplot: {plot}")
    return 0


LIST_AXES = {"methods": "method", "allocations": "allocation", "criteria": "criterion", "patterns": "pattern",
             "recoveries": "recovery", "objectives": "objective", "dynamics": "dynamics",
             "architectures": "architecture", "formats": "export format"}


def _method_lines(name: str, details: bool) -> list[str]:
    """A method preset: its summary, what it picks on each axis, its cost (from its module's docstring) and,
    with ``details``, the options it sets."""
    import inspect

    from .methods import METHODS

    preset = METHODS.get(name)
    doc = inspect.getmodule(preset).__doc__ or ""
    picks = preset("unstructured")
    axes = ", ".join(f"{axis} {picks[axis]}" for axis in AXES if axis in picks)
    cost = next((line.removeprefix("Cost: ") for line in doc.splitlines() if line.startswith("Cost: ")), "")
    default = " (the default)" if name == DEFAULT_METHOD else ""
    lines = [f"{name:<13} {axes or 'the defaults'}{default}" + (f"; {cost}" if cost else "")]
    if details:
        lines.append(f"    {doc.strip().partition(chr(10))[0]}")
        lines += [f"    sets {part}: {options}" for part, options in picks.items() if isinstance(options, dict)]
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .models import ARCHITECTURES

    axis = LIST_AXES[args.axis]
    registry = {"method": METHODS, "architecture": ARCHITECTURES, "export format": FORMATS}.get(axis) or AXES[axis]
    for name in registry.names():
        if axis == "method":
            print("\n".join(_method_lines(name, args.details)))
            continue
        shown = "N:M (for example 2:4)" if axis == "pattern" and name == "n:m" else name
        if not args.details:
            print(shown)
            continue
        entry = registry.get(name)
        summary = getattr(entry, "description", None) or (entry.__doc__ or "").strip().partition("\n")[0]
        print(f"{shown}: {summary}")
        settings = getattr(entry, "Settings", None)
        for f in dataclasses.fields(settings) if settings is not None else ():
            print(f"    {_flag(f'{settings.part}_{f.name}')} (default {default_of(f)!r}): {f.metadata['help']}")
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    from .checkpoint import save_model, write_json
    from .models.training import Recipe, train_reference

    recipe = Recipe(epochs=args.epochs, seed=args.seed)
    model, metadata = train_reference(recipe, data_root=args.data_dir, device=args.device,
                                      show_progress=not args.quiet, architecture=args.architecture)
    out = Path(args.out or f"{args.architecture}.safetensors")
    save_model(model, out, metadata)
    write_json(out.with_suffix(".json"), metadata)
    print(json.dumps(metadata, indent=2))
    return 0


class _LowercaseLevels(logging.Formatter):
    """``ptsparse: warning: ...`` like every other message of the command line, not ``WARNING``."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()})
        return super().format(record)


def _warn(message: str) -> None:
    print(f"ptsparse: warning: {message}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_format, export_model, load_model

    exporter = check_format(args.format)
    model, metadata = load_model(args.model)
    report = export_model(model, args.format, args.out, metadata=metadata, input_shape=args.input_shape,
                          value_dtype=args.dtype)
    for warning in exporter.warnings(model, metadata):
        _warn(warning)
    print(json.dumps(report, indent=2))
    print(f"\n{exporter.summary(report, args.out)}")
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import write_json
    from .export import input_shape_for, load_model
    from .export.latency import (
        check_timing,
        format_latency_table,
        measure_onnx_latency,
        onnx_params,
        profile,
        speedups,
        spread_warning,
    )
    from .export.semi_structured import to_semi_structured, unavailable_reason
    from .graph.cost import speedup_warnings
    from .sparsify import resolve_device

    device = resolve_device(args.device)
    check_timing(args.batch_sizes, args.warmup, args.repeats, args.compile)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.semi_structured and unavailable_reason(device):
        _warn(unavailable_reason(device))
    for spec in args.models:
        if str(spec).endswith(".onnx"):
            if not Path(spec).is_file():
                raise ConfigError(f"ONNX model {str(spec)!r} does not exist")
            if device.type != "cpu":
                raise ConfigError(f"ONNX models are timed with onnxruntime on CPU; use --device cpu for {spec}")
            shape = input_shape_for(None, args.input_shape or (rows[0]["input_shape"] if rows else None))
            latency = {str(b): measure_onnx_latency(spec, shape, b, args.warmup, args.repeats, args.threads)
                       for b in args.batch_sizes}
            rows.append({"model": str(spec), "runtime": "onnxruntime", "input_shape": list(shape),
                         "params": onnx_params(spec), "latency": latency})
            continue
        model, metadata = load_model(spec)
        shape = input_shape_for(metadata.get("architecture"), args.input_shape)
        pattern = (metadata.get("config") or {}).get("pattern")
        for warning in speedup_warnings(model, device, pattern):
            _warn(f"{spec}: {warning}")
        runtime = "torch.compile" if args.compile else "pytorch"
        rows.append({"model": str(spec), "runtime": runtime, "input_shape": list(shape),
                     **profile(model, shape, tuple(args.batch_sizes), device, args.warmup, args.repeats,
                               args.compile)})
        if args.semi_structured and not unavailable_reason(device):
            swapped, kernels = to_semi_structured(model, device)
            for warning in kernels["warnings"]:
                _warn(f"{spec}: {warning}")
            if kernels["available"] and kernels["swapped"]:
                rows.append({"model": f"{spec} (2:4 kernels)", "runtime": runtime, "input_shape": list(shape),
                             "kernels": kernels,
                             **profile(swapped, shape, tuple(args.batch_sizes), device, args.warmup, args.repeats,
                                       args.compile)})
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "compiled": args.compile,
              "warmup": args.warmup, "repeats": args.repeats, "batch_sizes": list(args.batch_sizes), "models": rows}
    for row, speedup in zip(rows, speedups(result)):
        row["speedup"] = speedup  # per batch: ratio to the baseline, and whether it is within the timing spread
    noisy = spread_warning(result)
    if noisy:
        _warn(noisy)
    print(format_latency_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


class _Parser(argparse.ArgumentParser):
    """One line per usage error, with a suggestion for a mistyped flag, instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flag = next((word.partition("=")[0] for word in unknown if word.startswith("--")), None)
        hint = did_you_mean(flag, self._all_flags()) if flag else ""
        self.exit(2, f"ptsparse: error: {message};{hint} see `{self.prog} --help`\n" if hint else
                  f"ptsparse: error: {message}; see `{self.prog} --help`\n")

    def _all_flags(self) -> list[str]:
        flags = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += list(sub._option_string_actions)
        return flags


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptsparse", description="Post-training sparsity for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sparsify", help="sparsify a model to a target sparsity",
                       usage="%(prog)s [--model MODEL] [--data DATA] [--method METHOD] [--sparsity S] [--out DIR] "
                             "[OPTION ...]")
    _model_flags(p)
    _data_flags(p)
    p.add_argument("--config", default=None, help="YAML or JSON file with the same keys as the flags")
    p.add_argument("--out", default=None, help="directory for model.safetensors, config.yaml and report.json")
    p.add_argument("--eval-data", default=None,
                   help="held-out data for the dense and sparse metric: text:FILE for a causal LM (perplexity; "
                        "without it none is measured), or data as --data for a classifier (default: the test split "
                        "of --data, when it has labels)")
    p.add_argument("--no-eval", action="store_true", help="skip the dense and sparse accuracy (perplexity)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint in OUT/.resume (same settings)")
    p.add_argument("--force", action="store_true",
                   help="write into an --out directory that holds other files (an earlier result is replaced "
                        "whole without it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p)
    p.set_defaults(handler=cmd_sparsify, parser=p)

    p = sub.add_parser("eval", help="accuracy (perplexity for a causal LM) and sparsity of a model")
    _model_flags(p)
    _data_flags(p)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--stride", type=int, default=None,
                   help="causal LMs: tokens between the starts of perplexity windows of --seq-len tokens, in "
                        "[1, seq-len - 1] (default: half a window)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload", action="store_true",
                   help="causal LMs: keep the model in CPU memory and move one decoder layer at a time to --device "
                        "(the embeddings, final norm and output layer for the pass); the same perplexity")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("report", help="per-layer table and a PNG plot of a sparsify run")
    p.add_argument("directory", help="output directory of `ptsparse sparsify` (or its report.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: sparsity.png beside the report)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("list", help="registered options of one axis")
    p.add_argument("axis", choices=tuple(LIST_AXES))
    p.add_argument("--details", action="store_true", help="each option's description and its own options")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("train-reference", help="train a reference model on Fashion-MNIST")
    p.add_argument("--architecture", default="reference_resnet20", choices=("reference_resnet20", "reference_mobilenet"))
    p.add_argument("--out", default=None, help="safetensors path, a .json goes beside (default: ARCHITECTURE.safetensors)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train_reference)

    p = sub.add_parser("export", help="compressed checkpoint, channel-removed model, ONNX, or Hugging Face directory "
                                      "of a sparse model")
    p.add_argument("model", help="a reference model, or a checkpoint / output directory written by ptsparse")
    p.add_argument("--format", required=True,
                   help="; ".join(f"{name}: {FORMATS.get(name).description}" for name in FORMATS.names()))
    p.add_argument("--out", required=True, help="file to write (.safetensors, or .onnx); hf: a new or empty directory")
    p.add_argument("--dtype", default=None,
                   help="compressed: storage dtype of the values: keep (default, bit-exact), float16, bfloat16")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="N",
                   help="one sample's shape for tracing, e.g. 3 224 224 (known for the reference models)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("bench-latency", help="latency, throughput, MACs and parameters of models on this device")
    p.add_argument("models", nargs="*", default=["reference"],
                   help="models to time, the first is the baseline: reference models, checkpoints written by ptsparse "
                        "(plain, compressed, channels) or .onnx files (onnxruntime)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], metavar="B")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=50, help="timed runs; the median is reported")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="time PyTorch models compiled by torch.compile (BatchNorm folded into convolutions, elementwise "
                        "layers fused; on the CPU it needs a C++ compiler such as g++); the first warm-up run compiles")
    p.add_argument("--semi-structured", action="store_true",
                   help="also time 2:4 kernels for Linear layers (CUDA only; elsewhere says why not)")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="N",
                   help="one sample's shape (known for the reference models)")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    p.set_defaults(handler=cmd_bench_latency)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    with distributed.process_group():
        rank, ranks = distributed.world()
        handler = logging.StreamHandler()
        handler.setFormatter(_LowercaseLevels("ptsparse: %(levelname)s: %(message)s"))
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level if rank == 0 else logging.ERROR, handlers=[handler])
        try:
            if ranks > 1 and args.command != "sparsify":
                raise ConfigError(f"only sparsify runs on many ranks; run `ptsparse {args.command}` without torchrun")
            with distributed.failures_shared():
                return args.handler(args)
        except PeerFailedError as error:  # the rank that failed printed its error; one that ended unheard is told
            if error.rank is None and rank == 0:
                print(f"ptsparse: error: rank 0 of {ranks}: {error}", file=sys.stderr)
            return 2
        except PtsparseError as error:
            where = f"rank {rank} of {ranks}: " if ranks > 1 else ""
            print(f"ptsparse: error: {where}{str(error).splitlines()[0] if str(error) else type(error).__name__}",
                  file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if rank == 0:
                print(_interrupted(args, argv), file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
