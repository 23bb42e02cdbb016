"""``ptsparse`` command line: a thin layer over the Python API.

Sub-commands: ``sparsify``, ``eval``, ``report``, ``list``, ``train-reference``. Errors from ptsparse
print on one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from .config import SparsityConfig, read_config_file, resolve_config
from .errors import ConfigError, PtsparseError

log = logging.getLogger("ptsparse")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--calib-size`` for ``calib_size``); defaults are ``None`` so only
    flags actually given override the config file and the preset."""
    group = parser.add_argument_group("configuration (also keys of --config)")
    for f in dataclasses.fields(SparsityConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.metadata.get("type") or (type(f.default) if f.default is not dataclasses.MISSING
                                           else type(f.default_factory()))
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f.metadata["help"])
        elif kind is tuple:
            group.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="NAME", help=f.metadata["help"])
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=f.metadata["help"])


def _config_from_args(args: argparse.Namespace) -> SparsityConfig:
    keys: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(SparsityConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            keys[f.name] = value
    if args.quiet:
        keys["progress"] = False
    return resolve_config(keys)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist, or an image folder (class sub-folders; train/ and val/ if present)")
    parser.add_argument("--data-dir", default=None,
                        help="directory of the Fashion-MNIST IDX files (default: $PTSPARSE_FASHION_MNIST_DIR "
                             "or /usr/share/datasets/fashion-mnist)")


def cmd_sparsify(args: argparse.Namespace) -> int:
    from .data import load_source, sample_calibration
    from .models import resolve_model
    from .report import format_table
    from .sparsify import sparsify

    config = _config_from_args(args)
    model, architecture = resolve_model(args.model)
    source = load_source(args.data, "train", root=args.data_dir)
    calibration = sample_calibration(source, config.calib_size, config.seed, config.calib_balanced)
    eval_data = None if args.no_eval else load_source(args.data, "test", root=args.data_dir)
    resume_dir = Path(args.out) / ".resume" if args.out else None
    if args.resume and resume_dir is None:
        raise ConfigError("--resume needs --out: the checkpoint of an interrupted run lives in OUT/.resume")
    result = sparsify(model, calibration, config, eval_data=eval_data, architecture=architecture,
                      checkpoint_dir=resume_dir, resume=args.resume)
    print(format_table(result.report))
    if args.out:
        result.save(args.out)
        shutil.rmtree(resume_dir, ignore_errors=True)
        print(f"\nwrote {args.out}/model.safetensors, config.yaml, report.json")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_source
    from .evaluate import accuracy
    from .models import resolve_model
    from .sparsify import sparsity_of

    model, _ = resolve_model(args.model)
    data = load_source(args.data, args.split, root=args.data_dir)
    result = {"model": str(args.model), "data": str(args.data), "split": args.split,
              "accuracy": accuracy(model, data, device=args.device, show_progress=not args.quiet),
              "sparsity": sparsity_of(model)}
    print(json.dumps(result, indent=2))
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


def cmd_list(args: argparse.Namespace) -> int:
    from .allocation import ALLOCATIONS
    from .criteria import CRITERIA
    from .methods import METHODS
    from .models import ARCHITECTURES

    axes = {"methods": METHODS, "allocations": ALLOCATIONS, "criteria": CRITERIA, "architectures": ARCHITECTURES}
    if args.axis == "patterns":
        print("unstructured\nchannel\nN:M (for example 2:4)")
        return 0
    for name in axes[args.axis].names():
        print(name)
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    from .checkpoint import save_model, write_json
    from .models.training import Recipe, train_reference

    recipe = Recipe(epochs=args.epochs, seed=args.seed)
    model, metadata = train_reference(recipe, data_root=args.data_dir, device=args.device,
                                      show_progress=not args.quiet)
    out = Path(args.out)
    save_model(model, out, metadata)
    write_json(out.with_suffix(".json"), metadata)
    print(json.dumps(metadata, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptsparse", description="Post-training sparsity for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sparsify", help="sparsify a model to a target sparsity")
    p.add_argument("--model", default="reference", help="reference, or a safetensors checkpoint / output directory")
    _data_flags(p)
    p.add_argument("--config", default=None, help="YAML or JSON file with the same keys as the flags")
    p.add_argument("--out", default=None, help="directory for model.safetensors, config.yaml and report.json")
    p.add_argument("--no-eval", action="store_true", help="skip dense and sparse accuracy on the test split")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint in OUT/.resume (same settings)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p)
    p.set_defaults(handler=cmd_sparsify)

    p = sub.add_parser("eval", help="accuracy and sparsity of a model")
    p.add_argument("--model", default="reference", help="reference, or a safetensors checkpoint / output directory")
    _data_flags(p)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("report", help="per-layer table and a PNG plot of a sparsify run")
    p.add_argument("directory", help="output directory of `ptsparse sparsify` (or its report.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: sparsity.png beside the report)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("list", help="registered options of one axis")
    p.add_argument("axis", choices=("methods", "allocations", "criteria", "patterns", "architectures"))
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("train-reference", help="train the reference ResNet-20 on Fashion-MNIST")
    p.add_argument("--out", default="reference_resnet20.safetensors", help="safetensors path (a .json goes beside)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="ptsparse: %(levelname)s: %(message)s")
    try:
        return args.handler(args)
    except PtsparseError as error:
        print(f"ptsparse: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptsparse: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
