"""Contracts every registered part meets: its settings, its patterns, exact targets, per-layer counts.

Each test iterates a whole registry, so a new part is checked by registering it.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import ptsparse
from ptsparse.config import AXES, FLAT_KEYS, RUN_FIELDS, SECTIONS, SparsityConfig
from ptsparse.errors import ConfigError, IncompatibleOptionsError
from ptsparse.patterns import NM, pattern_kind
from ptsparse.targets import find_targets

from ..conftest import largest_unit_step

PATTERNS = ("unstructured", "2:4", "channel")
# Short runs: distillation, the UniPTS search and IEE cycles cut to a few steps.
QUICK = {"distill": {"iterations": 6}, "batch_size": 16, "progress": False,
         "unipts_search": {"population": 4, "generations": 1, "parents": 2, "elites": 1, "bn_samples": 16,
                           "fit_samples": 16},
         "iee": {"exploit_steps": 1, "improve_steps": 1, "explore_steps": 1}}


def parts(axis: str) -> list[tuple[str, type]]:
    registry = AXES[axis]
    return [(name, registry.get(name)) for name in registry]


def supports(part: type, pattern: str) -> bool:
    return part.patterns is None or pattern_kind(pattern) in part.patterns


def zeros_per_layer(model) -> dict[str, int]:
    return {t.name: int((t.weight == 0).sum()) for t in find_targets(model)}


# settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", list(SECTIONS), ids=str)
def test_settings_declare_help_and_rules_and_build_from_defaults(part):
    settings = SECTIONS[part]
    defaults = settings()
    assert settings.build(defaults.to_dict()) == defaults
    for field in dataclasses.fields(settings):
        assert field.metadata["help"] and field.metadata["rule"].kind is not None
        assert f"{part}_{field.name}" in FLAT_KEYS


def test_flat_keys_are_unique_and_do_not_shadow_run_fields():
    run = {f.name for f in RUN_FIELDS}
    assert not run & set(FLAT_KEYS) and not run & set(SECTIONS)
    assert len(FLAT_KEYS) == sum(len(dataclasses.fields(s)) for s in SECTIONS.values())


@pytest.mark.parametrize("axis", list(AXES))
def test_constructor_defaults_match_declared_settings(axis):
    """Where a part's constructor takes an option by name, its default is the declared one."""
    for name, part in parts(axis):
        settings = getattr(part, "Settings", None)
        if settings is None:
            continue
        signature = inspect.signature(part.__init__).parameters
        for field in dataclasses.fields(settings):
            if field.name in signature:
                assert signature[field.name].default == field.default, (name, field.name)


@pytest.mark.parametrize("part", list(SECTIONS), ids=str)
def test_a_bad_option_value_is_one_line_naming_its_key(part):
    field = dataclasses.fields(SECTIONS[part])[0]
    with pytest.raises(ConfigError) as info:
        SparsityConfig(**{f"{part}_{field.name}": object()})
    assert f"{part}_{field.name}" in str(info.value) and "\n" not in str(info.value)


# criteria -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name, criterion", parts("criterion"), ids=[n for n, _ in parts("criterion")])
def test_every_criterion_works_with_its_patterns_and_refuses_the_others(name, criterion, pattern, tiny_cnn,
                                                                         calib_images):
    keys = {"criterion": name, "pattern": pattern, "allocation": "uniform", "sparsity": 0.5, **QUICK}
    if not supports(criterion, pattern):
        with pytest.raises(IncompatibleOptionsError) as info:
            SparsityConfig(**keys)
        message = str(info.value)
        assert f"{name!r}" in message and f"{pattern!r}" in message and "\n" not in message
        return
    result = ptsparse.sparsify(tiny_cnn, calib_images, **keys)
    for target in find_targets(result.model):
        weight, mask = target.weight, result.masks[target.name]
        assert torch.equal(weight == 0, ~mask) or bool((weight[~mask] == 0).all())
        if pattern == "channel":
            kept_rows = mask.flatten(1)
            assert bool((kept_rows.all(1) | ~kept_rows.any(1)).all()), target.name  # whole rows kept or gone
        if pattern == "2:4" and NM(2, 4).eligible(weight.shape):
            groups = mask.movedim(1, -1).reshape(-1, 4)
            assert bool((groups.sum(1) == 2).all()), target.name
    if pattern == "unstructured":
        total = sum(t.weight.numel() for t in find_targets(result.model))
        assert sum(zeros_per_layer(result.model).values()) == round(0.5 * total)


# allocations ----------------------------------------------------------------------------------------

# Each allocation with the run's default criterion, and rows for pairings worth pinning.
ALLOCATION_ROWS = [(name, allocation, {}) for name, allocation in parts("allocation")] + [
    ("owl", AXES["allocation"].get("owl"), {"criterion": "wanda"})]


@pytest.mark.parametrize("pattern", ("unstructured", "channel"))
@pytest.mark.parametrize("name, allocation, keys", ALLOCATION_ROWS,
                         ids=[name + "".join(f"-{v}" for v in keys.values()) for name, _, keys in ALLOCATION_ROWS])
def test_every_allocation_meets_the_target_exactly(name, allocation, keys, pattern, tiny_cnn, calib_images):
    if not supports(allocation, pattern):
        with pytest.raises(IncompatibleOptionsError, match=f"allocation {name!r} does not support"):
            SparsityConfig(method="magnitude", allocation=name, pattern=pattern)
        return
    result = ptsparse.sparsify(tiny_cnn, calib_images, allocation=name, pattern=pattern, sparsity=0.5, **keys,
                               **QUICK)
    report = result.report
    targets = find_targets(result.model)
    total = sum(t.weight.numel() for t in targets)
    zeros = sum(zeros_per_layer(result.model).values())
    if allocation.exact:  # its own budget (the knapsack's MACs) is met, never exceeded
        assert report["allocation_search"]["reduction"] >= 0.5 - 1e-9
        assert zeros == round(report["target_sparsity"] * total)
    elif pattern == "unstructured":
        assert zeros == round(0.5 * total)
    else:  # coupled channels planned by unit: short of the target by less than the largest step of a unit
        assert 0 <= round(0.5 * total) - zeros < largest_unit_step(tiny_cnn, calib_images)
    for layer in report["layers"]:
        assert layer["achieved"] <= 1.0


# dynamics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dynamics", parts("dynamics"), ids=[n for n, _ in parts("dynamics")])
def test_every_dynamics_meets_the_target_and_keeps_per_layer_counts_unless_it_learns_them(name, dynamics, tiny_cnn,
                                                                                           calib_images):
    keys = {"method": "magnitude_kd", "sparsity": 0.6, **QUICK}
    static = ptsparse.sparsify(tiny_cnn, calib_images, **keys)
    moved = ptsparse.sparsify(tiny_cnn, calib_images, dynamics=name, **keys)
    before, after = zeros_per_layer(static.model), zeros_per_layer(moved.model)
    assert sum(after.values()) == sum(before.values())
    if dynamics.keeps_layer_counts:
        assert after == before
    if dynamics.moves_masks:
        with pytest.raises(IncompatibleOptionsError, match="needs recovery 'distill'"):
            SparsityConfig(method="magnitude", dynamics=name, recovery="none")


# recoveries and objectives --------------------------------------------------------------------------

@pytest.mark.parametrize("name, recovery", parts("recovery"), ids=[n for n, _ in parts("recovery")])
def test_every_recovery_keeps_the_masks_and_reports_its_kind(name, recovery, tiny_cnn, calib_images):
    keys = {"recovery": name, "sparsity": 0.5, "layerwise": {"iterations": 3}, **QUICK}
    one_shot = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude", sparsity=0.5, progress=False)
    result = ptsparse.sparsify(tiny_cnn, calib_images, **keys)
    assert result.report["recovery"]["kind"] == name
    assert zeros_per_layer(result.model) == zeros_per_layer(one_shot.model)
    assert all(torch.equal(result.masks[n], one_shot.masks[n]) for n in one_shot.masks)


@pytest.mark.parametrize("name, objective", parts("objective"), ids=[n for n, _ in parts("objective")])
def test_every_objective_trains_to_a_finite_loss(name, objective, tiny_cnn, calib_images):
    # TinyCNN has no Sequential of blocks to find; name two for the block-wise objectives.
    result = ptsparse.sparsify(tiny_cnn, calib_images, method="magnitude_kd", objective=name, sparsity=0.5,
                               blocks=("grouped", "pointwise"), **QUICK)
    history = result.report["recovery"]["history"]
    assert history and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history)
