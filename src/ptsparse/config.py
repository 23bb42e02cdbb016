"""One configuration for a run: the run's own fields and the settings of every part, validated on construction.

A run picks one option on each axis (``pattern``, ``allocation``, ``criterion``, ``recovery``, ``objective``,
``dynamics``); each part owns its settings (:mod:`ptsparse.options`), held here by part name. In a file::

    method: iee
    sparsity: 0.9
    distill: {iterations: 800, lr: 0.02}
    iee: {alpha: 0.2}

A part's option is also one flat key ``<part>_<option>`` (``iee_alpha: 0.2``), which is its CLI flag
(``--iee-alpha``). Keys of earlier releases that named options otherwise (``lr``, ``search_population``,
``penalty``, ...) still work and warn once that they moved (:data:`MOVED_KEYS`).

Precedence, lowest first: defaults < the method's preset (``recommended`` when no method is given) < a config
file < explicit overrides (CLI flags or ``sparsify(**overrides)``). The constructor lays the keys over the preset;
:func:`resolve_config` reads files and lays overrides over them. The resolved config is written beside every
output; loading it back reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._registry import did_you_mean
from .allocation import ALLOCATIONS
from .checkpoint import write_text
from .criteria import CRITERIA
from .errors import ConfigError, IncompatibleOptionsError
from .methods import METHODS
from .options import Options, Rule, check_fields, default_of, option, plain
from .patterns import PATTERNS, parse_pattern, pattern_kind
from .recovery import DYNAMICS, OBJECTIVES, RECOVERIES
from .targets import resolve_layer_types

# The axes in flow order, each with its registry; a part of any axis may declare settings.
# The method a run uses when none is given: the benchmark's best (issue 16, benchmarks/RESULTS.md "Regimes").
DEFAULT_METHOD = "recommended"

AXES = {"pattern": PATTERNS, "allocation": ALLOCATIONS, "criterion": CRITERIA, "recovery": RECOVERIES,
        "objective": OBJECTIVES, "dynamics": DYNAMICS}


AXIS_SETTINGS: dict[str, list[type[Options]]] = {
    axis: [registry.get(name).Settings for name in registry if getattr(registry.get(name), "Settings", None)]
    for axis, registry in AXES.items()}
"""The settings classes of each axis's parts (those that have options)."""
SECTIONS: dict[str, type[Options]] = {
    settings.part: settings for per_axis in AXIS_SETTINGS.values() for settings in per_axis}
"""Each part's settings class by part name: the config's sections."""

# Keys of earlier releases: old key -> the part option(s) it sets now.
MOVED_KEYS: dict[str, tuple[str, ...]] = {
    **{f"search_{name}": (f"unipts_search_{name}",) for name in (
        "delta", "population", "generations", "parents", "elites", "mutation", "fitness", "bn_samples",
        "fit_samples")},
    **{name: (f"distill_{name}",) for name in (
        "iterations", "optimizer", "lr", "momentum", "weight_decay", "warmup_iterations", "teacher_bn", "augment",
        "precision", "grad_checkpointing", "checkpoint_every")},
    **{name: (f"learned_thresholds_{name}",) for name in (
        "penalty", "penalty_weight", "density", "density_bins", "kde_max_samples", "score_grad")},
    **{name: (f"base_decayed_{name}",) for name in ("student_temperature", "tau0", "tau_decay", "tau_epochs")},
    "layer_iterations": ("layerwise_iterations",), "layer_lr": ("layerwise_lr",),
    "layer_bias_lr": ("layerwise_bias_lr",), "weight_correction": ("layerwise_weight_correction",),
    "bias_correction": ("layerwise_bias_correction",),
    "mask_update_every": ("dst_update_every",), "pruned_decay": ("dst_pruned_decay",),
    "temperature": ("kd_logits_temperature", "kd_blocks_temperature", "base_decayed_temperature",
                    "unipts_search_temperature"),
}


def _registered(registry) -> Any:
    return lambda name, value: registry.get(value)


def _pattern(name: str, value: Any) -> None:
    parse_pattern(value)


def _layer_types(name: str, value: tuple) -> None:
    resolve_layer_types(value)


_CAP_RULE = Rule(float, minimum=0, maximum=1)


def _caps(name: str, caps: Mapping) -> None:
    for glob, cap in caps.items():
        _CAP_RULE.validate(f"layer_caps[{glob!r}]", cap)


def _device(name: str, value: Any) -> None:
    if not (value == "cpu" or str(value).startswith("cuda")):
        raise ConfigError(f"device {value!r} is not allowed; choose cpu or cuda[:N]")


@dataclass(frozen=True, init=False)
class SparsityConfig:
    """Everything that decides a ptsparse run.

    Build it from keys: ``SparsityConfig(method="magnitude", sparsity=0.9, allocation="global")``; the keys are laid
    over the ``method``'s preset (``recommended`` when none is given). A part's settings are given flat
    (``iee_alpha=0.2``) or as a section (``iee={"alpha": 0.2}``). Field names and section names are the keys of
    config files.

    Attributes:
        parts: each part's settings by part name (:data:`SECTIONS`); :meth:`settings_of` reads them.
    """

    # what and how much
    method: str = option(DEFAULT_METHOD, "method preset (see `ptsparse list methods`)", check=_registered(METHODS))
    sparsity: float = option(0.5, "global fraction of zero weights, in [0, 1) (allocation knapsack: the fraction "
                             "of MACs or latency removed)", minimum=0, maximum=1, open_maximum=True)
    # the axes
    pattern: str = option("unstructured", "unstructured, channel, or N:M such as 2:4", check=_pattern)
    allocation: str = option("erk", "per-layer sparsity (see `ptsparse list allocations`)",
                             check=_registered(ALLOCATIONS))
    criterion: str = option("magnitude", "score per weight (see `ptsparse list criteria`)",
                            check=_registered(CRITERIA))
    recovery: str = option("none", "after masking: none, distill (train against the dense teacher) or layerwise "
                           "(POT reconstruction)", check=_registered(RECOVERIES))
    objective: str = option("kd_logits", "what distill minimises (see `ptsparse list objectives`)",
                            check=_registered(OBJECTIVES))
    dynamics: str = option("static", "how masks move during distill (see `ptsparse list dynamics`)",
                           check=_registered(DYNAMICS))
    # which layers, how much each may lose
    layer_types: tuple = option(("Linear", "Conv1d", "Conv2d", "Conv3d"), "module types that are sparsified and "
                                "counted", check=_layer_types)
    include: tuple = option(("*",), "name globs of the layers to sparsify")
    exclude: tuple = option((), "name globs of layers left dense and not counted")
    max_sparsity: float = option(1.0, "largest sparsity any layer may get", minimum=0, maximum=1)
    layer_caps: dict = option({}, "largest sparsity per layer-name glob, e.g. {'fc': 0.5}; 0 keeps a layer dense",
                              check=_caps, cli=False)
    blocks: tuple = option((), "name globs of the model's blocks, whose outputs kd_blocks compares and whose "
                           "activations distill_grad_checkpointing recomputes (default: found automatically)")
    # data and run
    # calib_size and calib_balanced apply where ptsparse draws the calibration set itself (--data); from Python
    # the calibration data passed in is used as given, and its size is reported.
    calib_size: int = option(1024, "calibration samples drawn from --data", minimum=1)
    calib_balanced: bool = option(False, "draw the same number of samples per class from --data")
    batch_size: int = option(64, "calibration batch size", minimum=1)
    bn_recalibration: bool = option(True, "re-estimate BatchNorm statistics on the calibration set after masking")
    offload: bool = option(False, "keep the model and the cached block inputs in CPU memory and move one block at a "
                           "time to --device (the layers outside blocks too, for a pass through the whole model); "
                           "one-shot runs only: parts that train or differentiate the whole model are refused")
    seed: int = option(0, "seed of calibration sampling and every random choice", kind=int)
    device: str = option("cpu", "cpu or cuda", check=_device)
    progress: bool = option(True, "show progress bars", cli=False)
    parts: Mapping[str, Options] = field(default_factory=dict, repr=False)

    def __init__(self, **keys: Any) -> None:
        keys = normalize_keys(keys)
        given_parts = keys.pop("parts", {})
        keys = {**given_parts, **keys}
        keys = {key: value.to_dict() if isinstance(value, Options) else value for key, value in keys.items()}
        method = keys.get("method", DEFAULT_METHOD)
        if isinstance(method, str) and method in METHODS:
            preset = METHODS.get(method)(keys.get("pattern", "unstructured"))
            recovery = RECOVERIES.get(keys["recovery"]) if keys.get("recovery") in RECOVERIES else None
            if recovery is not None and not recovery.runs_dynamics and "dynamics" not in keys:
                preset.pop("dynamics", None)  # the preset's mask dynamics need the recovery that runs them
            keys = merge_keys(normalize_keys(preset, f"method {method!r}"), keys)
        for f in RUN_FIELDS:
            value = keys.pop(f.name) if f.name in keys else default_of(f)
            object.__setattr__(self, f.name, _coerce(f, value))
        parts = {}
        for part, settings in SECTIONS.items():
            parts[part] = settings.build(dict(keys.pop(part, {})))
        object.__setattr__(self, "parts", parts)
        check_fields(self)
        self._check_combination()

    def _check_combination(self) -> None:
        """Cross-axis rules, read from what each picked part declares it can do."""
        kind = pattern_kind(self.pattern)
        picked = {axis: AXES[axis].get(getattr(self, axis)) for axis in ("criterion", "allocation", "dynamics")}
        for axis, part in picked.items():
            if part.patterns is not None and kind not in part.patterns:
                raise IncompatibleOptionsError(f"{axis} {getattr(self, axis)!r} does not support pattern "
                                               f"{self.pattern!r}; use pattern {' or '.join(part.patterns)}")
        multiple = self.parts["channel"].multiple
        if multiple > 1 and kind != "channel":
            raise IncompatibleOptionsError(f"channel_multiple {multiple} applies to pattern 'channel', "
                                           f"not {self.pattern!r}")
        single = [f"{axis} {getattr(self, axis)!r}" for axis in ("allocation", "dynamics")
                  if picked[axis].chooses_units]
        if multiple > 1 and single:
            raise IncompatibleOptionsError(f"channel_multiple {multiple} needs channels chosen N at a time; "
                                           f"{' and '.join(single)} choose single channels")
        if self.parts["distill"].shard == "fsdp" and self.recovery == "distill" and picked["dynamics"].moves_masks:
            raise IncompatibleOptionsError(f"distill_shard 'fsdp' keeps only static masks (a sharded weight is whole "
                                           f"only inside a forward pass); dynamics {self.dynamics!r} moves them: use "
                                           f"dynamics 'static' or distill_shard 'none'")
        if self.offload:
            for axis in ("criterion", "allocation", "recovery"):
                registry = AXES[axis]
                if not registry.get(getattr(self, axis)).offloadable:
                    allowed = " or ".join(repr(name) for name in registry if registry.get(name).offloadable)
                    raise IncompatibleOptionsError(
                        f"offload runs the model one block at a time, forward passes only; {axis} "
                        f"{getattr(self, axis)!r} needs the whole model on the device: use {axis} {allowed}, or "
                        "drop offload")
        if picked["dynamics"].moves_masks and not RECOVERIES.get(self.recovery).runs_dynamics:
            trainers = " or ".join(repr(n) for n in RECOVERIES if RECOVERIES.get(n).runs_dynamics)
            raise IncompatibleOptionsError(f"dynamics {self.dynamics!r} moves masks during training; it needs "
                                           f"recovery {trainers}, not {self.recovery!r}")

    def settings_of(self, part: str | type) -> Options:
        """The settings of a part, by part name or by its class (``config.settings_of(ERK).power``)."""
        name = part if isinstance(part, str) else part.Settings.part
        return self.parts[name]

    def __getattr__(self, name: str) -> Any:
        """A part's option by its flat key (``config.iee_alpha``), or by a moved key of an earlier release."""
        if name.startswith("_") or name == "parts":
            raise AttributeError(name)
        if name in MOVED_KEYS:
            _warn_moved(name)
            name = MOVED_KEYS[name][0]
        if name in FLAT_KEYS:
            part, option_name = FLAT_KEYS[name]
            return getattr(self.parts[part], option_name)
        raise AttributeError(f"{type(self).__name__} has no field or option {name!r}")

    def updated(self, **keys: Any) -> SparsityConfig:
        """A copy with ``keys`` laid over this config's values (a new ``method`` does not bring its preset)."""
        return SparsityConfig(**merge_keys(self.to_dict(), normalize_keys(keys, "override")))

    # round trip -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, dicts) for YAML or JSON: the run's fields, then one section per part."""
        data = {f.name: plain(getattr(self, f.name)) for f in RUN_FIELDS}
        data.update({part: settings.to_dict() for part, settings in self.parts.items()})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityConfig:
        """Builds a config from keys (a file's contents): the method's preset, then these keys."""
        return resolve_config(None, **dict(data))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
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


RUN_FIELDS = tuple(f for f in fields(SparsityConfig) if f.name != "parts")
FIELD_NAMES = tuple(f.name for f in RUN_FIELDS) + tuple(SECTIONS)
"""The top-level keys of a saved config: the run's fields and one section per part."""
FLAT_KEYS: dict[str, tuple[str, str]] = {
    f"{part}_{f.name}": (part, f.name) for part, settings in SECTIONS.items() for f in fields(settings)}
"""Each part option's flat key (``iee_alpha``) -> (part, option)."""


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Strings and lists become tuples for tuple fields, mappings plain dicts; other values stay as given."""
    kind = f.metadata["rule"].kind
    if kind is tuple:
        value = (value,) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{f.name} must be a list of strings, got {value!r}")
        return tuple(value)
    if kind is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{f.name} must map layer-name globs to sparsities, got {value!r}")
        return dict(value)
    return value


def _warn_moved(key: str) -> None:
    targets = " and ".join(MOVED_KEYS[key])
    warnings.warn(f"config key {key!r} moved to {targets}", FutureWarning, stacklevel=3)


def normalize_keys(keys: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Run fields as given, and every part option gathered into its section (``{"iee": {"alpha": 0.2}}``).

    Moved keys of earlier releases warn once and set the options they moved to.

    Raises:
        ConfigError: a key that is neither a field, a section, a part option nor a moved key; a section that
            is not a mapping.
    """
    out: dict[str, Any] = {}
    for key, value in keys.items():
        key = key.replace("-", "_") if isinstance(key, str) else key  # a flag's spelling (calib-size) works too
        if key in MOVED_KEYS:
            _warn_moved(key)
            for target in MOVED_KEYS[key]:
                part, name = FLAT_KEYS[target]
                out.setdefault(part, {})[name] = value
        elif key in SECTIONS:
            if isinstance(value, Options):
                value = value.to_dict()
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source} key {key!r} holds the options of {key}; give a mapping, not {value!r}")
            out.setdefault(key, {}).update({str(k).replace("-", "_"): v for k, v in value.items()})
        elif key in FLAT_KEYS:
            part, name = FLAT_KEYS[key]
            out.setdefault(part, {})[name] = value
        elif key == "parts" or any(f.name == key for f in RUN_FIELDS):
            out[key] = value
        else:
            known = (*FIELD_NAMES, *FLAT_KEYS, *MOVED_KEYS)
            raise ConfigError(f"unknown {source} key {key!r};{did_you_mean(key, known)} the keys are the run's "
                              f"fields and each part's <part>_<option> (`ptsparse sparsify --help` lists them)")
    return out


def merge_keys(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top; sections merge option by option."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = {**merged.get(key, {}), **value} if key in SECTIONS else value
    return merged


def check_keys(keys: Mapping[str, Any], source: str = "config") -> None:
    """Raises :class:`ConfigError` naming the first key that is not a config key."""
    normalize_keys(keys, source)


def read_config_file(path: str | os.PathLike, inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of a YAML or JSON config file.

    Args:
        inputs: further keys the file may hold besides the config's (the command line's ``model``, ``data``,
            ``out``, ...); returned as they are, under their names with ``_`` for ``-``.

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
    given = {str(key).replace("-", "_"): value for key, value in data.items()}
    check_keys({key: value for key, value in given.items() if key not in inputs}, source=f"key in {path.name}:")
    return given


def resolve_config(config: SparsityConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                   **overrides: Any) -> SparsityConfig:
    """Applies the precedence: defaults < method preset < ``config`` < ``overrides``.

    Args:
        config: ``None``, a complete :class:`SparsityConfig` (its values are used as they are), a
            mapping of keys, or the path of a YAML/JSON file.
        overrides: config keys and values.

    Raises:
        ConfigError: an unknown key or a value that is not allowed.
    """
    override_keys = normalize_keys(overrides, "override")
    if isinstance(config, SparsityConfig):
        return config.updated(**overrides) if overrides else config
    if isinstance(config, (str, os.PathLike)):
        keys = normalize_keys(read_config_file(config))
    elif isinstance(config, Mapping):
        keys = normalize_keys(config)
    elif config is None:
        keys = {}
    else:
        raise ConfigError(f"config must be a SparsityConfig, a mapping or a file path, got {type(config).__name__}")
    return SparsityConfig(**merge_keys(keys, override_keys))


def stage_config(config: SparsityConfig, method: str) -> SparsityConfig:
    """The configuration of a stage that runs ``method`` first (an allocation's ``stage``).

    The stage is ``method``'s preset with every change this run makes to its own method's preset laid over it:
    the run's fields (sparsity, scope, caps, seed, device, ...) and each part option that differs from the
    preset's, so that nothing the user set is dropped between the stages. The stage keeps its own picks on the
    axes a preset picks (allocation, criterion, recovery, objective, dynamics).
    """
    baseline = resolve_config(None, method=config.method, pattern=config.pattern).to_dict()
    picked = set(AXES) - {"pattern"}
    changes: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if key == "method" or key in picked:
            continue
        if key in SECTIONS:
            changed = {name: v for name, v in value.items() if v != baseline[key][name]}
            if changed:
                changes[key] = changed
        elif value != baseline[key]:
            changes[key] = value
    return resolve_config(None, method=method, **changes)
