"""One configuration for a run, validated on construction, with a YAML/JSON round-trip.

Precedence, lowest first: field defaults < the method's preset < a config file < explicit overrides
(CLI flags or ``sparsify(**overrides)``). :func:`resolve_config` applies it. The resolved config is
written beside every output; loading it back reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, IncompatibleOptionsError


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class SparsityConfig:
    """Everything that decides a ptsparse run. Field names are the keys of config files and overrides."""

    # what and how much
    method: str = field(default="magnitude", metadata=_help("method preset (see `ptsparse list methods`)"))
    sparsity: float = field(default=0.5, metadata=_help(
        "global fraction of zero weights, in [0, 1) (allocation knapsack: the fraction of MACs or latency removed)"))
    pattern: str = field(default="unstructured", metadata=_help("unstructured, channel, or N:M such as 2:4"))
    channel_multiple: int = field(default=1, metadata=_help(
        "channel pattern: prune channels N at a time so kept widths stay multiples of N (8 suits onnxruntime)"))
    nm_fallback: str = field(default="skip", metadata=_help(
        "N:M layers whose inputs are not a multiple of M: skip (stay dense) or pad"))
    # the axes
    allocation: str = field(default="erk", metadata=_help(
        "per-layer sparsity: uniform, global, erk, unipts_search, fcpts (learned by an FCPTS run first), "
        "knapsack (channels under a MACs or latency budget)"))
    criterion: str = field(default="magnitude", metadata=_help("score per weight (see `ptsparse list criteria`)"))
    erk_power: float = field(default=1.0, metadata=_help("ERK exponent (0 gives uniform)"))
    taylor_aggregation: str = field(default="squared", metadata=_help(
        "taylor criterion: mean of squared (paper) or absolute (HALP) per-batch channel scores"))
    wanda_compare: str = field(default="row", metadata=_help(
        "wanda criterion, unstructured: compare scores within each output row (paper) or the whole layer"))
    sparsegpt_blocksize: int = field(default=128, metadata=_help("sparsegpt: columns per lazy-update block"))
    sparsegpt_dampening: float = field(default=0.01, metadata=_help(
        "sparsegpt: dampening as a fraction of mean(diag H), raised x10 on a failed Cholesky"))
    global_normalize: str = field(default="none", metadata=_help(
        "per-layer normalisation of global ranking: none, l1, l2"))
    search_delta: float = field(default=0.05, metadata=_help(
        "unipts_search: every layer is reduced to sparsity + delta, then delta * N weights are regrown by search"))
    search_population: int = field(default=16, metadata=_help("unipts_search: genomes per generation"))
    search_generations: int = field(default=8, metadata=_help("unipts_search: generations"))
    search_parents: int = field(default=6, metadata=_help("unipts_search: best genomes that breed"))
    search_elites: int = field(default=2, metadata=_help("unipts_search: best genomes carried over unchanged"))
    search_mutation: float = field(default=0.1, metadata=_help("unipts_search: mutation probability per gene"))
    knapsack_cost: str = field(default="macs", metadata=_help(
        "knapsack allocation (channel pattern): what the budget counts, macs (of every Conv/Linear layer) or "
        "latency (a per-layer table measured on --device); sparsity is then the fraction of it removed"))
    search_fitness: str = field(default="kd", metadata=_help(
        "unipts_search: kd (KL to the dense outputs), agreement (same top-1) or top1_labels (needs labels)"))
    search_bn_samples: int = field(default=256, metadata=_help(
        "unipts_search: calibration samples that re-estimate BatchNorm for each candidate"))
    search_fit_samples: int = field(default=256, metadata=_help(
        "unipts_search: held-out calibration samples (disjoint from the BN ones) that score each candidate"))
    max_sparsity: float = field(default=1.0, metadata=_help("largest sparsity any layer may get"))
    layer_caps: dict = field(default_factory=dict, metadata=_help(
        "largest sparsity per layer-name glob, e.g. {'fc': 0.5}; 0 keeps a layer dense", cli=False))
    # recovery
    recovery: str = field(default="none", metadata=_help(
        "after masking: none, distill (train against the dense teacher) or layerwise (POT reconstruction)"))
    objective: str = field(default="kd_logits", metadata=_help(
        "distill objective: kd_logits, layer_mse, kd_blocks (logit KL + MSE at block outputs) or base_decayed "
        "(UniPTS)"))
    blocks: tuple = field(default=(), metadata=_help(
        "kd_blocks: name globs of the blocks whose outputs are compared (default: found automatically)"))
    student_temperature: float = field(default=1.0, metadata=_help(
        "base_decayed: softmax temperature of the student (1 as UniPTS's code; the teacher uses `temperature`)"))
    tau0: float = field(default=8.0, metadata=_help("base_decayed: initial log base tau"))
    tau_decay: float = field(default=0.99, metadata=_help("base_decayed: decay of tau per epoch"))
    tau_epochs: float = field(default=100.0, metadata=_help(
        "base_decayed: epochs the decay spans, spread over the run (tau ends at tau0 * tau_decay ** tau_epochs)"))
    dynamics: str = field(default="static", metadata=_help(
        "how masks move during distill: static, learned_thresholds (FCPTS), dst (UniPTS) or iee (exploit/explore)"))
    mask_update_every: int = field(default=1, metadata=_help("dst: steps between magnitude top-k mask updates"))
    iee_exploit_steps: int = field(default=40, metadata=_help(
        "iee: steps H that train the active weights before each prune"))
    iee_improve_steps: int = field(default=40, metadata=_help("iee: steps J that train the reduced network"))
    iee_explore_steps: int = field(default=20, metadata=_help(
        "iee: steps Q that train only the reactivated pruned units, the active ones frozen"))
    iee_alpha: float = field(default=0.1, metadata=_help(
        "iee: swap fraction at the first cycle; it decays by a cosine to 0 at iee_end"))
    iee_end: float = field(default=0.65, metadata=_help(
        "iee: fraction of the run after which masks are fixed and only the active weights train"))
    iee_criterion: str = field(default="magnitude", metadata=_help(
        "iee: score of prune and grow, magnitude (|w|; filter norm for channels) or taylor (|w * mean grad| "
        "over the phase; BatchNorm gates for channels)"))
    iee_reactivate: bool = field(default=True, metadata=_help(
        "iee: explore the pruned units before growing (false: grow by the criterion on their stored values)"))
    pruned_decay: float = field(default=5e-5, metadata=_help("dst: SR-STE decay lambda on pruned weights"))
    penalty: str = field(default="abs", metadata=_help(
        "learned_thresholds: global-sparsity penalty |S - S*| (abs) or (S - S*)^2 (pow2)"))
    penalty_weight: float = field(default=1.0, metadata=_help("learned_thresholds: weight lambda of the penalty"))
    density: str = field(default="histogram", metadata=_help(
        "learned_thresholds: weight density behind the sparsity gradient, histogram (authors' code) or kde"))
    density_bins: int = field(default=100, metadata=_help("learned_thresholds: histogram bins"))
    kde_max_samples: int = field(default=65536, metadata=_help(
        "learned_thresholds: weights per layer the KDE draws (larger layers are subsampled)"))
    score_grad: str = field(default="constraint_only", metadata=_help(
        "learned_thresholds: thresholds learn from the penalty only (constraint_only, authors' code) or also "
        "from the distillation loss through a straight-through mask (ste)"))
    iterations: int | None = field(default=None, metadata=_help(
        "distill steps; default 100 epochs of the calibration set (1600 for 1024 samples at batch 64)", type=int))
    optimizer: str = field(default="sgd", metadata=_help("distill optimizer: sgd or adam"))
    lr: float = field(default=0.01, metadata=_help("distill peak learning rate (batch 64)"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=3e-4, metadata=_help("weight decay on weights (never biases, norms, scores)"))
    warmup_iterations: int | None = field(default=None, metadata=_help(
        "linear warm-up steps before the cosine decay; default one epoch", type=int))
    temperature: float = field(default=4.0, metadata=_help("distillation temperature"))
    teacher_bn: str = field(default="eval", metadata=_help(
        "dense teacher's BatchNorm mode: eval, or train as FCPTS's and UniPTS's code"))
    augment: str = field(default="none", metadata=_help("calibration augmentation during distill: none or flip"))
    precision: str = field(default="fp32", metadata=_help(
        "distill arithmetic: fp32, or bf16 (autocast mixed precision: less memory, faster on recent GPUs)"))
    grad_checkpointing: bool = field(default=False, metadata=_help(
        "distill: recompute each block's activations during backward instead of storing them (less memory)"))
    checkpoint_every: int = field(default=100, metadata=_help(
        "distill steps between resumable checkpoints (0: none)"))
    layer_iterations: int = field(default=2000, metadata=_help("layerwise: Adam steps per layer"))
    layer_lr: float = field(default=1e-5, metadata=_help("layerwise: learning rate of weights"))
    layer_bias_lr: float = field(default=1e-4, metadata=_help("layerwise: learning rate of biases"))
    weight_correction: bool = field(default=True, metadata=_help("layerwise: POT per-channel weight correction"))
    bias_correction: bool = field(default=True, metadata=_help("layerwise: POT bias correction"))
    # which layers
    layer_types: tuple = field(default=("Linear", "Conv1d", "Conv2d", "Conv3d"), metadata=_help(
        "module types that are sparsified and counted"))
    include: tuple = field(default=("*",), metadata=_help("name globs of the layers to sparsify"))
    exclude: tuple = field(default=(), metadata=_help("name globs of layers left dense and not counted"))
    # data and run
    offload: bool = field(default=False, metadata=_help(
        "wanda/sparsegpt: keep the cached inputs of the block being pruned in CPU memory, not on --device"))
    calib_size: int = field(default=1024, metadata=_help("calibration samples drawn from --data"))
    calib_balanced: bool = field(default=False, metadata=_help("draw the same number of samples per class"))
    batch_size: int = field(default=64, metadata=_help("calibration batch size"))
    bn_recalibration: bool = field(default=True, metadata=_help(
        "re-estimate BatchNorm statistics on the calibration set after masking"))
    seed: int = field(default=0, metadata=_help("seed of calibration sampling and every random choice"))
    device: str = field(default="cpu", metadata=_help("cpu or cuda"))
    progress: bool = field(default=True, metadata=_help("show progress bars", cli=False))

    def __post_init__(self) -> None:
        for name in ("layer_types", "include", "exclude", "blocks"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.layer_caps, Mapping):
            raise ConfigError(f"layer_caps must map layer-name globs to sparsities, got {self.layer_caps!r}")
        object.__setattr__(self, "layer_caps", dict(self.layer_caps))
        self._validate()

    def _validate(self) -> None:
        from .allocation import ALLOCATIONS
        from .criteria import CRITERIA
        from .methods import METHODS
        from .patterns import parse_pattern
        from .allocation.knapsack import COSTS
        from .allocation.unipts_search import FITNESSES
        from .recovery import DYNAMICS, OBJECTIVES, RECOVERIES
        from .recovery.bridge import DENSITIES
        from .recovery.iee import IEE_CRITERIA
        from .recovery.memory import PRECISIONS
        from .recovery.thresholds import PENALTIES, SCORE_GRADS
        from .targets import resolve_layer_types

        _number("sparsity", self.sparsity, 0.0, 1.0, "[0, 1)", high_open=True)
        _number("max_sparsity", self.max_sparsity, 0.0, 1.0, "[0, 1]")
        for glob, cap in self.layer_caps.items():
            _number(f"layer_caps[{glob!r}]", cap, 0.0, 1.0, "[0, 1]")
        METHODS.get(self.method)
        pattern_kind = parse_pattern(self.pattern, self.nm_fallback).kind
        for axis, name, option in (("criterion", self.criterion, CRITERIA.get(self.criterion)),
                                   ("allocation", self.allocation, ALLOCATIONS.get(self.allocation))):
            supported = getattr(option, "patterns", None)
            if supported is not None and pattern_kind not in supported:
                raise IncompatibleOptionsError(f"{axis} {name!r} does not support pattern {self.pattern!r}; "
                                               f"use pattern {' or '.join(supported)}")
        if self.taylor_aggregation not in ("squared", "abs"):
            raise ConfigError(f"taylor_aggregation {self.taylor_aggregation!r} is not allowed; choose squared or abs")
        if self.nm_fallback not in ("skip", "pad"):
            raise ConfigError(f"nm_fallback {self.nm_fallback!r} is not allowed; choose 'skip' or 'pad'")
        parse_pattern(self.pattern, self.nm_fallback)
        resolve_layer_types(self.layer_types)
        if not isinstance(self.erk_power, (int, float)) or self.erk_power < 0:
            raise ConfigError(f"erk_power must be a number >= 0, got {self.erk_power!r}")
        if self.global_normalize not in ("none", "l1", "l2"):
            raise ConfigError(f"global_normalize {self.global_normalize!r} is not allowed; choose none, l1 or l2")
        if self.wanda_compare not in ("row", "layer"):
            raise ConfigError(f"wanda_compare {self.wanda_compare!r} is not allowed; choose row or layer")
        _number("sparsegpt_dampening", self.sparsegpt_dampening, 0.0, float("inf"), "(0, inf)")
        _number("search_delta", self.search_delta, 0.0, 1.0, "(0, 1)", high_open=True)
        _number("search_mutation", self.search_mutation, 0.0, 1.0, "[0, 1]")
        for name in ("calib_size", "batch_size", "layer_iterations", "sparsegpt_blocksize", "density_bins",
                     "kde_max_samples", "search_population", "search_parents", "search_bn_samples",
                     "search_fit_samples", "mask_update_every", "iee_exploit_steps", "iee_improve_steps",
                     "iee_explore_steps", "channel_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("iterations", "warmup_iterations", "checkpoint_every", "search_generations", "search_elites"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "temperature", "layer_lr", "layer_bias_lr", "penalty_weight",
                     "student_temperature", "tau0", "tau_decay", "tau_epochs", "pruned_decay", "search_mutation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        _number("iee_alpha", self.iee_alpha, 0.0, 1.0, "[0, 1]")
        _number("iee_end", self.iee_end, 0.0, 1.0, "[0, 1]")
        OBJECTIVES.get(self.objective)
        dynamics = DYNAMICS.get(self.dynamics)
        if dynamics.patterns is not None and pattern_kind not in dynamics.patterns:
            raise IncompatibleOptionsError(f"dynamics {self.dynamics!r} does not support pattern {self.pattern!r}; "
                                           f"use pattern {' or '.join(dynamics.patterns)}")
        if self.channel_multiple > 1 and pattern_kind != "channel":
            raise IncompatibleOptionsError(f"channel_multiple {self.channel_multiple} applies to pattern 'channel', "
                                           f"not {self.pattern!r}")
        if self.channel_multiple > 1 and (self.allocation == "knapsack" or self.dynamics == "iee"):
            raise IncompatibleOptionsError(f"channel_multiple {self.channel_multiple} needs a per-layer allocation "
                                           "(uniform, erk, global) and static masks; the knapsack and channel IEE "
                                           "choose single channels")
        if self.dynamics != "static" and self.recovery != "distill":
            raise IncompatibleOptionsError(f"dynamics {self.dynamics!r} moves masks during distillation; it needs "
                                           f"recovery 'distill', not {self.recovery!r}")
        for name, allowed in (("recovery", RECOVERIES), ("optimizer", ("sgd", "adam")),
                              ("teacher_bn", ("eval", "train")), ("augment", ("none", "flip")),
                              ("penalty", PENALTIES), ("density", DENSITIES), ("search_fitness", FITNESSES),
                              ("score_grad", SCORE_GRADS), ("knapsack_cost", COSTS),
                              ("iee_criterion", IEE_CRITERIA),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not allowed; choose from {', '.join(allowed)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise ConfigError(f"device {self.device!r} is not allowed; choose cpu or cuda[:N]")
        for name in ("calib_balanced", "bn_recalibration", "progress", "weight_correction", "bias_correction",
                     "iee_reactivate", "offload", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    # round trip -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, dicts) for YAML or JSON."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityConfig:
        """Builds a config from keys (a file's contents): the method's preset, then these keys."""
        return resolve_config(None, **dict(data))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
        from .checkpoint import write_text

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityConfig:
        """Reads a YAML or JSON config file (see :func:`read_config_file`)."""
        return cls.from_dict(read_config_file(path))


def _number(name: str, value: Any, low: float, high: float, allowed: str, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok or (high_open and value >= high):
        raise ConfigError(f"{name} {value!r} is not allowed; it must be in {allowed}")


FIELD_NAMES = tuple(f.name for f in fields(SparsityConfig))


def check_keys(keys: Mapping[str, Any] | set[str], source: str = "config") -> None:
    """Raises :class:`ConfigError` naming the first key that is not a config field."""
    for key in keys:
        if key not in FIELD_NAMES:
            raise ConfigError(f"unknown {source} key {key!r}; allowed keys: {', '.join(FIELD_NAMES)}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The keys of a YAML or JSON config file.

    Raises:
        ConfigError: the file is missing, unparsable, not a mapping, or has an unknown key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"config file {path} cannot be parsed: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    check_keys(data, source=f"key in {path.name}:")
    return data


def resolve_config(config: SparsityConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                   **overrides: Any) -> SparsityConfig:
    """Applies the precedence: defaults < method preset < ``config`` < ``overrides``.

    Args:
        config: ``None``, a complete :class:`SparsityConfig` (its fields are used as they are), a
            mapping of keys, or the path of a YAML/JSON file.
        overrides: config field names and values.

    Raises:
        ConfigError: an unknown key or a value that is not allowed.
    """
    from .methods import METHODS

    check_keys(overrides, source="override")
    if isinstance(config, SparsityConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    keys: dict[str, Any] = {}
    if isinstance(config, (str, os.PathLike)):
        keys = read_config_file(config)
    elif isinstance(config, Mapping):
        check_keys(config)
        keys = dict(config)
    elif config is not None:
        raise ConfigError(f"config must be a SparsityConfig, a mapping or a file path, got {type(config).__name__}")
    keys.update(overrides)
    method = keys.pop("method", "magnitude")
    return METHODS.get(method)(**keys)
