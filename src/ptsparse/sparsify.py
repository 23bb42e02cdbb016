"""The one flow: targets -> allocation -> criterion -> pattern -> recovery -> result.

``sparsify`` copies the model, finds its targets, scores every weight, allocates per-layer sparsities
that meet the global target exactly, builds masks by the pattern, attaches them, runs recovery, and
returns plain modules with the masks baked in, plus a report.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import distributed
from .allocation import (
    ALLOCATIONS,
    Allocation,
    AllocationContext,
    LayerBudget,
    exact_counts,
    mac_reduction,
    target_count,
)
from .attention import find_attention, heads_by_layer
from .checkpoint import result_directory, save_state, write_json
from .config import SparsityConfig, resolve_config, stage_config
from .coupled import coupled_units
from .criteria import CRITERIA, prune_model
from .data import Calibration, as_calibration
from .errors import CalibrationError, ConfigError, IncompatibleOptionsError, first_line
from .evaluate import measure, metric_of, protocol
from .graph.calls import layers_called_through
from .graph.cost import speedup_warnings
from .graph.outputs import feeding_the_output, record_output_nodes, traceable_input
from .masking import bake, masks_of
from .models import architecture_of
from .models.zoo import is_causal_lm
from .offload import HOME, Offload, whole_model
from .patterns import NM, Channel, Pattern, parse_pattern
from .recovery import DYNAMICS, RECOVERIES, recalibrate_batchnorm
from .recovery.trainer import CHECKPOINT_NAME, Stopwatch
from .report import peak_device_memory_mb, peak_rss_mb, removed_fractions
from .targets import Target, count_zeros, find_targets

log = logging.getLogger(__name__)


@dataclass
class SparsifyResult:
    """What :func:`sparsify` returns.

    Attributes:
        model: the sparse model: plain modules whose weights hold exact zeros (eval mode).
        masks: kept-weight masks by layer name.
        report: per-layer and global facts of the run (see ``report.json``).
        config: the resolved configuration.
        architecture: what :meth:`save` records so that :func:`ptsparse.load` rebuilds the model by itself: the
            ``architecture`` given to :func:`sparsify`, else the one the input model was built as (a model from
            ``ptsparse.models``: ``load_reference()``, ``resolve_model("torchvision:resnet18")``,
            ``ptsparse.load(...)``; see :func:`ptsparse.models.architecture_of`); None for other models.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    config: SparsityConfig
    architecture: str | None = field(default=None, repr=False)

    def save(self, directory: str | os.PathLike, force: bool = False) -> Path:
        """Writes ``model.safetensors``, ``config.yaml`` and ``report.json`` into ``directory``.

        The files are written into a staging directory that then replaces ``directory`` whole, so a failed
        save leaves no partial output and an earlier result there leaves no stale file. In a data-parallel run
        rank 0 alone writes; on the other ranks this does nothing.

        Args:
            force: write among the files of a directory that is not a ptsparse result (else refused).

        Raises:
            ConfigError: ``directory`` is an existing file, or holds other files and ``force`` is not set.
        """
        if not distributed.is_main():
            return Path(directory)
        with result_directory(directory, force) as staging:
            metadata = {"architecture": self.architecture, "config": self.config.to_dict(),
                        "achieved_sparsity": self.report["achieved_sparsity"]}
            save_state(self.model.state_dict(), staging / "model.safetensors", metadata)
            self.config.save(staging / "config.yaml")
            write_json(staging / "report.json", self.report)
        return Path(directory)


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]`` (``cuda`` is each rank's own GPU in a data-parallel run); raises
    :class:`ConfigError` when CUDA is asked for but absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available: no CUDA device is visible; use --device cpu")
    return distributed.local_device(torch.device(name))


def check_data_parallel(config: SparsityConfig, calibration: Calibration) -> None:
    """Under many ranks (:mod:`ptsparse.distributed`): refuses parts that do not run data-parallel yet, and checks
    that every rank was given the same calibration samples and config.

    Raises:
        IncompatibleOptionsError: the run's mask dynamics do not run data-parallel.
        DistributedError: the ranks' calibration samples or configs differ.
    """
    ranks = distributed.world()[1]
    if ranks == 1:
        return
    if RECOVERIES.get(config.recovery).runs_dynamics and not DYNAMICS.get(config.dynamics).data_parallel:
        raise IncompatibleOptionsError(
            f"dynamics {config.dynamics!r} does not run data-parallel ({ranks} ranks); run it in one process")
    distributed.same_on_every_rank(calibration.hash, "calibration samples")
    distributed.same_on_every_rank(json.dumps(config.to_dict(), sort_keys=True, default=str), "configs")


def probe(model: nn.Module, targets: list[Target], calibration: Calibration,
          device: torch.device) -> tuple[list[Target], set[str], set[str]]:
    """Runs two calibration samples through the model.

    Returns:
        The targets in execution order (those never called last, in module order); the names of the output
        layers: the targets whose output is the model's output, or feeds it through activations, pooling,
        flatten or reshape only (:mod:`ptsparse.graph.outputs`; SqueezeNet's classifier conv is followed by ReLU
        and pooling); and the names of the targets that never ran, neither called nor applied by their parent
        in a way :mod:`ptsparse.graph.calls` follows (``F.linear``, ``nn.MultiheadAttention``'s ``out_proj``):
        an unused branch, or a parent that computes with a layer's weight some other way.

    Raises:
        CalibrationError: the inputs do not fit the model (wrong shape, dtype or channels).
    """
    outputs: dict[str, torch.Tensor] = {}
    produced: dict[object, str] = {}
    hooks = [t.module.register_forward_hook(lambda m, i, o, name=t.name: outputs.__setitem__(name, o))
             for t in targets]
    hooks += [t.module.register_forward_hook(record_output_nodes(produced, t.name)) for t in targets]
    was_training = model.training
    model.eval()
    sample = traceable_input(calibration.inputs[:2].to(device))
    try:
        with torch.enable_grad(), layers_called_through(model):
            result = model(sample)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        reason = first_line(error)
        raise CalibrationError(
            f"calibration inputs of shape {tuple(calibration.inputs.shape[1:])} (per sample) do not fit the "
            f"model: {reason}"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    order = {name: position for position, name in enumerate(outputs)}
    ordered = sorted(targets, key=lambda t: order.get(t.name, len(order)))
    direct = {name for name, out in outputs.items() if out is result}  # no graph: integer inputs, frozen model
    return ordered, direct | feeding_the_output(result, produced), {t.name for t in targets if t.name not in order}


def layer_budgets(targets: list[Target], config: SparsityConfig, pattern: Pattern,
                  protected: set[str]) -> list[LayerBudget]:
    """Caps per layer: ``max_sparsity``, the tightest matching ``layer_caps`` glob, 0 for ``protected``; each
    layer's unit (and attention module, whose heads it prunes under the channel pattern) come from ``pattern``."""
    budgets = []
    for target in targets:
        cap = config.max_sparsity
        for glob, limit in config.layer_caps.items():
            if fnmatch.fnmatchcase(target.name, glob):
                cap = min(cap, limit)
        if target.name in protected:
            cap = 0.0
        attention = pattern.attention_of(target.name) if isinstance(pattern, Channel) else None
        budgets.append(LayerBudget(target.name, tuple(target.shape), cap, pattern.unit_size(target.shape, target.name),
                                   attention))
    return budgets


def plan_counts(targets: list[Target], config: SparsityConfig, pattern: Pattern, allocation: Allocation,
                scores: dict[str, torch.Tensor] | None, budgets: list[LayerBudget],
                context: AllocationContext | None = None,
                units: list[LayerBudget] | None = None) -> tuple[dict[str, int], dict[str, float], float]:
    """Prune counts per layer, the allocated ratios, and the global target they meet.

    For N:M the pattern fixes each layer's count and the target follows from it; otherwise the
    allocation gives ratios and :func:`exact_counts` rounds them to meet ``round(sparsity * total)``; an
    ``exact`` allocation's ratios are whole counts already, and the target is the weight sparsity they give.

    Args:
        units: the layers as the channel pattern prunes them (:meth:`~ptsparse.coupled.CoupledUnits.budgets`):
            the ratios are rounded by those units, so the layers of a coupled unit get one count of its steps,
            planned from their ratios together, and the total stays within a step of the target; the allocation
            sees their caps (every unit keeps one step) (default: ``budgets``).
    """
    total = sum(t.numel for t in targets)
    if isinstance(pattern, NM):
        counts = {t.name: pattern.prune_count(t.shape) for t in targets}
        skipped = [t.name for t in targets if counts[t.name] == 0]
        if skipped:
            log.warning("%s: %d layer(s) stay dense (inputs per group not a multiple of %d or fewer than %d): %s",
                        pattern.name, len(skipped), pattern.m, pattern.m, ", ".join(skipped))
        ratios = {t.name: counts[t.name] / t.numel for t in targets}
        return counts, ratios, sum(counts.values()) / total
    if allocation.exact:
        ratios = allocation.allocate(budgets, config.sparsity, scores, context)
        counts = {b.name: round(ratios[b.name] * b.numel) for b in budgets}
        return counts, ratios, sum(counts.values()) / total
    planned = units if units is not None else budgets
    wanted = target_count(planned, config.sparsity)  # under the channel pattern a unit keeps one step
    # The allocation sees the caps the units leave, so it places what a unit cannot lose on other layers itself
    capped = [replace(budget, cap=unit.cap) for budget, unit in zip(budgets, planned)]
    ratios = allocation.allocate(capped, config.sparsity, scores, context)
    counts = exact_counts(planned, ratios, wanted)
    return counts, ratios, config.sparsity


@distributed.failures_shared()
def sparsify(model: nn.Module, calib: Any, config: SparsityConfig | dict | str | None = None, *,
             eval_data: Dataset | None = None, architecture: str | None = None,
             checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             **overrides: Any) -> SparsifyResult:
    """Sparsifies a copy of ``model`` to the configured target.

    Args:
        model: the trained dense model; it is never modified.
        calib: calibration data: a DataLoader, an iterable of batches (``x`` or ``(x, y, ...)``), a
            Dataset, a tensor of inputs, or a :class:`~ptsparse.data.Calibration`. Labels are optional.
        config: a :class:`SparsityConfig`, a mapping of its keys, or a YAML/JSON file; ``None`` uses
            the method's preset.
        eval_data: held-out data; when given, the report holds the dense and sparse models' metric on it:
            accuracy on a labelled Dataset, perplexity on a :class:`~ptsparse.data.PackedText` (a causal
            language model's held-out text, scored by :func:`~ptsparse.evaluate.perplexity` in windows of its
            ``seq_len`` tokens).
        architecture: name of a registered architecture or a model spec, recorded so :func:`ptsparse.load` can
            rebuild the model; by default the architecture a model from ``ptsparse.models`` was built as.
        checkpoint_dir: where distillation writes a resumable checkpoint every ``checkpoint_every``
            steps; the checkpoint is removed once the run has finished.
        resume: continue an interrupted run from the checkpoint in ``checkpoint_dir``.
        overrides: config field names (``sparsity=0.9, method="magnitude", pattern="2:4"``).

    Returns:
        A :class:`SparsifyResult` with the sparse model (masks baked in), masks, report and config.

    Raises:
        PtsparseError: bad configuration, empty or ill-fitting calibration data, nothing to prune.
        DistributedError: in a data-parallel run, the ranks were given different calibration data or configs,
            or ended with different models.
        PeerFailedError: in a data-parallel run, another rank failed (the error names it and its error).

    Data-parallel: inside a default process group (``torchrun``, or one the caller initialised) every rank
    calls this with the same model, calibration data and config; each computes on its part of the calibration
    set (:mod:`ptsparse.distributed`), every rank returns the same result, and rank 0 alone writes checkpoints.

    Example:
        >>> result = ptsparse.sparsify(model, calib_images, sparsity=0.9)
        >>> ptsparse.sparsity_of(result.model)
        0.9
    """
    stopwatch = Stopwatch()  # a resumed run's wall time includes its earlier attempts'
    config = resolve_config(config, **overrides)
    calibration = as_calibration(calib)
    check_data_parallel(config, calibration)
    device = resolve_device(config.device)
    student = copy.deepcopy(model).to(HOME if config.offload else device)
    targets = find_targets(student, config.layer_types, config.include, config.exclude)
    # with offload the student stays in CPU memory and every pass moves one block at a time to the device
    offload = Offload.of(student, targets, device) if config.offload else None
    with whole_model(offload):
        targets, output_layers, never_ran = probe(student, targets, calibration, device)
    criterion = CRITERIA.get(config.criterion).from_config(config)
    pattern = parse_pattern(config.pattern, config.settings_of(NM).fallback)
    protected, units = set(), None
    if isinstance(pattern, Channel):
        protected = output_layers  # pruning output units drops classes
        heads = heads_by_layer(find_attention(student, [t.name for t in targets]))
        if offload is None:  # traced before any work: a criterion that requires the coupling may be refused
            units = coupled_units(student, targets, calibration.inputs[:2].to(device), heads,
                                  criterion.requires_coupling)
        else:
            log.warning("offload: channels are pruned layer by layer, without the channels coupled to them in other "
                        "layers (tracing the coupling needs the whole model on the device)")
        if units is not None and not is_causal_lm(model):  # (the channel export refuses language models)
            # zeroed rows that the channel export cannot remove would cost accuracy and save nothing
            kept = [t.name for t in targets if not units.removable(t.name) and t.name not in protected]
            if kept:
                log.warning("%d layers stay dense: the channel export could not remove their channels (torch-pruning "
                            "does not follow their outputs, or they feed a normalisation over channels such as "
                            "LayerNorm): %s%s", len(kept), ", ".join(kept[:4]), ", ..." if len(kept) > 4 else "")
                protected = protected | set(kept)
        pattern = Channel(heads=heads, multiple=config.settings_of(Channel).multiple, units=units)
    unobserved = sorted(never_ran) if criterion.statistics else []
    if unobserved:  # their input statistics would be empty: every weight would score 0 and ties would choose
        log.warning("%d layers stay dense: criterion %r scores a layer on its inputs, and these never ran as layers "
                    "(an unused branch, or weights their parent applies in a way ptsparse does not follow): %s%s",
                    len(unobserved), config.criterion, ", ".join(unobserved[:4]),
                    ", ..." if len(unobserved) > 4 else "")
        protected = protected | set(unobserved)

    # accuracy for classifiers, perplexity for causal language models
    metric = metric_of(eval_data) if eval_data is not None else "perplexity" if is_causal_lm(model) else "accuracy"

    def evaluate(network: nn.Module) -> float | None:
        if eval_data is None:
            return None
        with whole_model(offload if network is student else None):
            return measure(network, eval_data, device, show_progress=config.progress)

    dense_metric = evaluate(student)
    recovery = RECOVERIES.get(config.recovery).from_config(config)
    teacher = copy.deepcopy(student).eval() if recovery.needs_teacher else None
    allocation = ALLOCATIONS.get(config.allocation).from_config(config)
    # A stage is a whole run of another method whose result the allocation needs (fcpts: learned sparsities).
    stage_report = sparsify(student, calibration, stage_config(config, allocation.stage)).report \
        if allocation.stage else None
    scores = None
    if allocation.needs_scores or units is not None:
        with whole_model(offload):
            scores = criterion.scores(student, targets, calibration)
        if offload is not None:  # each where its layer was during the pass
            scores = {name: score.to(HOME) for name, score in scores.items()}
        if units is not None:
            scores = units.score(scores, criterion.comparable_scores)
    budgets = layer_budgets(targets, config, pattern, protected)
    context = AllocationContext(student, targets, calibration, config.batch_size, device, stage_report, offload) \
        if allocation.needs_context else None
    unit_budgets = units.budgets(budgets, pattern.multiple) if units is not None else None
    counts, ratios, target_sparsity = plan_counts(targets, config, pattern, allocation, scores, budgets, context,
                                                  unit_budgets)
    prune_model(student, targets, counts, pattern, criterion, calibration, config.batch_size, device,
                config.progress, scores=scores, offload=offload)

    # What the masks are worth before recovery (one-shot, BatchNorm re-estimated), to say what recovery bought.
    one_shot_metric = evaluate(_recalibrated_copy(student, calibration, config, device)) \
        if recovery.needs_teacher and eval_data is not None else None
    recovery_report = recovery.run(student, teacher, targets, calibration, budgets, target_sparsity, device,
                                   checkpoint_dir, resume, stopwatch)
    del teacher
    if config.bn_recalibration:
        with whole_model(offload):
            recalibrate_batchnorm(student, calibration, config.batch_size, device)
    masks = masks_of(targets)
    distributed.same_on_every_rank(masks.values(), "masks")
    bake(student)
    distributed.same_on_every_rank(student.state_dict().values(), "sparse models")
    student.eval()
    warnings = speedup_warnings(student, device, config.pattern)
    for warning in warnings:
        log.warning(warning)

    sparse_metric = evaluate(student)
    zeros, total = count_zeros(targets)
    layers = []
    for target in targets:
        layer_zeros, layer_total = count_zeros([target])
        layers.append({"name": target.name, "params": layer_total, "target": ratios[target.name],
                       "achieved": layer_zeros / layer_total, "shape": list(target.shape)})
    removed = None
    if isinstance(pattern, Channel):
        with whole_model(offload):
            macs = mac_reduction(student, targets, calibration.inputs[:2].to(device), pattern.heads)
        removed = removed_fractions([t.module for t in targets], zeros / total, macs)
    report = {
        "method": config.method,
        "pattern": config.pattern,
        "allocation": config.allocation if not isinstance(pattern, NM) else "n:m",
        "criterion": config.criterion,
        "target_sparsity": target_sparsity,
        "achieved_sparsity": zeros / total,
        "counted_params": total,
        "metric": metric,
        **{f"{kind}_{name}": value if name == metric else None
           for name in ("accuracy", "perplexity")
           for kind, value in (("dense", dense_metric), ("sparse", sparse_metric), ("one_shot", one_shot_metric))},
        "evaluation": protocol(eval_data) if eval_data is not None else None,
        "removed": removed,
        "layers": layers,
        "wall_time_s": round(stopwatch.elapsed(), 3),
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_memory_mb": peak_device_memory_mb(device),
        "seed": config.seed,
        "calib_size": len(calibration),
        "calib_seq_len": calibration.inputs.shape[1] if is_causal_lm(model) else None,
        "calib_hash": calibration.hash,
        "device": str(device),
        "torch": torch.__version__,
        "allocation_search": allocation.summary(),
        "recovery": recovery_report,
        "layer_errors": criterion.layer_errors(),
        "warnings": warnings,
        "config": config.to_dict(),
    }
    if checkpoint_dir is not None and distributed.is_main():
        (Path(checkpoint_dir) / CHECKPOINT_NAME).unlink(missing_ok=True)
    if architecture is None:
        architecture = architecture_of(model)  # built by ptsparse.models (load_reference, resolve_model, ...)
    return SparsifyResult(student.cpu(), masks, report, config, architecture)


def _recalibrated_copy(student: nn.Module, calibration, config: SparsityConfig, device) -> nn.Module:
    """A copy of the masked student as it would be without recovery: BatchNorm re-estimated if the run does."""
    copied = copy.deepcopy(student)
    if config.bn_recalibration:
        recalibrate_batchnorm(copied, calibration, config.batch_size, device)
    return copied.eval()


def sparsity_of(model: nn.Module, config: SparsityConfig | dict | str | None = None) -> float:
    """Fraction of exact zeros over the weights of the layers ``config`` targets (all prunable by default)."""
    config = resolve_config(config)
    zeros, total = count_zeros(find_targets(model, config.layer_types, config.include, config.exclude))
    return zeros / total
