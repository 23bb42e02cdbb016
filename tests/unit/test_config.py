"""SparsityConfig validation, YAML/JSON round trip, and the precedence of resolve_config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from ptsparse.config import FIELD_NAMES, SparsityConfig, read_config_file, resolve_config
from ptsparse.errors import ConfigError, UnknownOptionError


def test_defaults_are_valid():
    config = SparsityConfig()
    assert config.method == "recommended" and config.sparsity == 0.5
    assert config.pattern == "unstructured" and config.allocation == "erk" and config.criterion == "magnitude"
    assert config.layer_types == ("Linear", "Conv1d", "Conv2d", "Conv3d")
    assert config.include == ("*",) and config.exclude == () and config.layer_caps == {}
    assert config.device == "cpu" and config.seed == 0


def test_without_a_method_the_recommended_preset_lies_under_the_keys():
    assert resolve_config() == resolve_config(None) == SparsityConfig() == resolve_config(method="recommended")
    config = SparsityConfig(sparsity=0.9, kd_blocks_temperature=2.0)
    assert (config.recovery, config.objective, config.kd_blocks_normalize) == ("distill", "kd_blocks", "teacher")
    assert config.kd_blocks_temperature == 2.0 and config.distill_lr == 0.01


def test_a_named_method_brings_its_preset_under_the_keys():
    config = SparsityConfig(method="magnitude", criterion="wanda")
    assert (config.method, config.criterion, config.recovery) == ("magnitude", "wanda", "none")
    assert config.updated(sparsity=0.7).recovery == "none"  # updated keeps every value; no preset is re-laid
    assert dataclasses.replace(config, sparsity=0.7) == config.updated(sparsity=0.7)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SparsityConfig(method="magnitude").sparsity = 0.9


def test_string_globs_become_tuples():
    config = SparsityConfig(method="magnitude", include="stage*", exclude=["fc"], layer_types=["Conv2d"])
    assert config.include == ("stage*",) and config.exclude == ("fc",) and config.layer_types == ("Conv2d",)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.999, 0])
def test_sparsity_in_range_is_accepted(sparsity):
    assert SparsityConfig(method="magnitude", sparsity=sparsity).sparsity == sparsity


BAD_VALUES = [
    ("sparsity", -0.1),
    ("sparsity", 1.0),
    ("sparsity", 1.5),
    ("sparsity", "a"),
    ("sparsity", None),
    ("sparsity", True),
    ("max_sparsity", 1.5),
    ("max_sparsity", -0.5),
    ("method", "nope"),
    ("allocation", "bogus"),
    ("criterion", "telepathy"),
    ("pattern", "blocky"),
    ("pattern", "4:4"),
    ("pattern", "0:4"),
    ("global_normalize", "l3"),
    ("erk_power", -1.0),
    ("erk_power", "one"),
    ("layer_types", ["Conv2d", "LSTM"]),
    ("layer_types", ["Conv4d"]),
    ("calib_size", 0),
    ("calib_size", -5),
    ("calib_size", 2.5),
    ("batch_size", 0),
    ("seed", "zero"),
    ("device", "tpu"),
    ("device", "gpu"),
    ("calib_balanced", "yes"),
    ("bn_recalibration", 1),
]


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_bad_value_raises_config_error_naming_it(name, value):
    bad = repr(value[-1] if isinstance(value, list) else value)
    with pytest.raises(ConfigError) as info:
        SparsityConfig(**{name: value})
    assert bad in str(info.value)
    with pytest.raises(ConfigError) as info:  # the same through overrides
        resolve_config(**{name: value})
    assert bad in str(info.value)


def test_bad_nm_fallback_raises_with_an_nm_pattern():
    with pytest.raises(ConfigError, match="'zero'"):
        SparsityConfig(method="magnitude", pattern="2:4", nm_fallback="zero")


def test_bad_nm_fallback_raises_whatever_the_pattern():
    """An invalid value is rejected when given, not only once the pattern happens to be N:M."""
    with pytest.raises(ConfigError, match="'zero'"):
        SparsityConfig(method="magnitude", nm_fallback="zero")


@pytest.mark.parametrize("name, value", [("method", "nope"), ("allocation", "bogus"),
                                         ("criterion", "telepathy"), ("layer_types", ["LSTM"])])
def test_unknown_names_are_unknown_option_errors_listing_choices(name, value):
    with pytest.raises(UnknownOptionError) as info:
        SparsityConfig(**{name: value})
    message = str(info.value)
    expected_choice = {"method": "magnitude", "allocation": "erk", "criterion": "magnitude",
                       "layer_types": "Conv2d"}[name]
    assert expected_choice in message


@pytest.mark.parametrize("caps, bad", [({"fc": 1.5}, "1.5"), ({"fc": -0.1}, "-0.1"), ({"fc": "half"}, "'half'")])
def test_bad_layer_cap_raises(caps, bad):
    with pytest.raises(ConfigError, match=bad):
        SparsityConfig(method="magnitude", layer_caps=caps)


@pytest.mark.parametrize("field, value", [("layer_caps", ["fc"]), ("include", [1, 2]), ("exclude", 3)])
def test_bad_container_types_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        SparsityConfig(**{field: value})


def test_unknown_override_key_raises_naming_it():
    with pytest.raises(ConfigError, match="'sparsty'"):
        resolve_config(method="magnitude", sparsty=0.5)
    with pytest.raises(ConfigError, match="'sparsty'"):
        resolve_config(SparsityConfig(method="magnitude"), sparsty=0.5)
    with pytest.raises(ConfigError, match="'sparsty'"):
        resolve_config({"sparsty": 0.5})


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_devices_accepted(device):
    assert SparsityConfig(method="magnitude", device=device).device == device


# round trip -----------------------------------------------------------------------------------------

@pytest.fixture
def custom() -> SparsityConfig:
    return SparsityConfig(
        method="magnitude", sparsity=0.9, pattern="2:4", nm_fallback="pad", allocation="global", global_normalize="l2",
        erk_power=0.5, max_sparsity=0.95, layer_caps={"fc": 0.5, "stem*": 0.0},
        layer_types=("Conv2d", "Linear"), include=("stages.*", "fc"), exclude=("stages.0.*",),
        calib_size=256, calib_balanced=True, batch_size=32, bn_recalibration=False, seed=7,
        device="cuda:0", progress=False,
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip(tmp_path, custom, suffix):
    path = tmp_path / f"config{suffix}"
    custom.save(path)
    loaded = SparsityConfig.load(path)
    assert loaded == custom
    assert SparsityConfig.load(str(path)) == custom
    text = path.read_text()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert set(data) == set(FIELD_NAMES)
    assert data["sparsity"] == 0.9 and data["layer_caps"] == {"fc": 0.5, "stem*": 0.0}
    assert data["include"] == ["stages.*", "fc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing else left behind


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_of_defaults(tmp_path, suffix):
    path = tmp_path / f"defaults{suffix}"
    SparsityConfig(method="magnitude").save(path)
    assert SparsityConfig.load(path) == SparsityConfig(method="magnitude")


def test_to_dict_from_dict_round_trip(custom):
    data = custom.to_dict()
    assert isinstance(data["include"], list) and isinstance(data["layer_types"], list)
    assert SparsityConfig.from_dict(data) == custom


# precedence -----------------------------------------------------------------------------------------

def test_override_beats_mapping():
    assert resolve_config({"sparsity": 0.7}, sparsity=0.8).sparsity == 0.8
    assert resolve_config({"sparsity": 0.7}).sparsity == 0.7


def test_file_beats_defaults_and_override_beats_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sparsity: 0.7\npattern: '2:4'\nseed: 3\n")
    from_file = resolve_config(path)
    assert (from_file.sparsity, from_file.pattern, from_file.seed) == (0.7, "2:4", 3)
    assert from_file.allocation == SparsityConfig(method="magnitude").allocation  # untouched keys keep their defaults
    overridden = resolve_config(path, sparsity=0.8)
    assert (overridden.sparsity, overridden.pattern, overridden.seed) == (0.8, "2:4", 3)
    assert resolve_config(str(path), seed=9).seed == 9


def test_override_of_a_complete_config():
    base = SparsityConfig(method="magnitude", sparsity=0.3, seed=4)
    assert resolve_config(base) is base
    changed = resolve_config(base, sparsity=0.6)
    assert changed.sparsity == 0.6 and changed.seed == 4 and base.sparsity == 0.3


def test_resolve_rejects_unsupported_config_kind():
    with pytest.raises(ConfigError, match="int"):
        resolve_config(42)


# config files -----------------------------------------------------------------------------------------

def test_config_file_with_unknown_key_raises_naming_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sparsity: 0.5\nsparsty: 0.6\n")
    with pytest.raises(ConfigError, match="'sparsty'"):
        SparsityConfig.load(path)
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"methd": "magnitude"}))
    with pytest.raises(ConfigError, match="'methd'"):
        resolve_config(json_path)


@pytest.mark.parametrize("name, text", [
    ("broken.yaml", "sparsity: [0.5\npattern: 2:4\n"),
    ("tabs.yaml", "sparsity:\n\t- 0.5\n"),
    ("broken.json", "{\"sparsity\": 0.5,"),
])
def test_unparsable_config_file_raises(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="cannot be parsed") as info:
        SparsityConfig.load(path)
    assert name in str(info.value)


def test_config_file_that_is_not_a_mapping_raises(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 0.5\n- 0.9\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(path)


def test_missing_config_file_raises(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SparsityConfig.load(tmp_path / "absent.yaml")


def test_empty_config_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert SparsityConfig.load(path) == SparsityConfig()


def test_bad_value_in_config_file_raises_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sparsity: 1.5\n")
    with pytest.raises(ConfigError, match="1.5"):
        SparsityConfig.load(path)


# the shape: run fields + one section per part ----------------------------------------------------------

def test_a_section_and_flat_keys_give_the_same_config():
    nested = SparsityConfig(method="iee", iee={"alpha": 0.2, "end": 0.5}, distill={"lr": 0.02})
    flat = SparsityConfig(method="iee", iee_alpha=0.2, iee_end=0.5, distill_lr=0.02)
    assert nested == flat
    assert flat.iee_alpha == 0.2 and flat.settings_of("iee").alpha == 0.2 and flat.to_dict()["iee"]["alpha"] == 0.2


def test_a_saved_config_holds_sections_and_reads_back(tmp_path):
    config = resolve_config(None, method="unipts", unipts_search={"population": 8}, sparsity=0.8)
    path = tmp_path / "config.yaml"
    config.save(path)
    data = yaml.safe_load(path.read_text())
    assert data["unipts_search"]["population"] == 8 and "unipts_search_population" not in data
    assert SparsityConfig.load(path) == config


@pytest.mark.parametrize("old, new, value", [("lr", "distill_lr", 0.02),
                                             ("search_population", "unipts_search_population", 8),
                                             ("penalty_weight", "learned_thresholds_penalty_weight", 0.5)])
def test_a_moved_key_still_works_and_warns_where_it_moved(old, new, value):
    with pytest.warns(FutureWarning, match=f"config key '{old}' moved to {new}"):
        moved = resolve_config(None, **{old: value})
    assert moved == resolve_config(None, **{new: value})


def test_temperature_moved_to_every_part_it_drove():
    with pytest.warns(FutureWarning, match="moved to kd_logits_temperature and"):
        config = SparsityConfig(method="magnitude", temperature=2.0)
    assert (config.kd_logits_temperature, config.kd_blocks_temperature, config.base_decayed_temperature,
            config.unipts_search_temperature) == (2.0, 2.0, 2.0, 2.0)


def test_a_section_that_is_not_a_mapping_is_a_clear_error():
    with pytest.raises(ConfigError, match="key 'iee' holds the options of iee; give a mapping"):
        SparsityConfig(method="magnitude", iee=0.2)


def test_an_unknown_option_in_a_section_names_it():
    with pytest.raises(ConfigError, match="unknown option 'beta' of iee; its options: exploit_steps"):
        SparsityConfig(method="magnitude", iee={"beta": 0.2})


def test_a_stage_runs_its_preset_with_every_change_the_run_made():
    from ptsparse.config import stage_config

    run = resolve_config(None, method="iee", allocation="fcpts", sparsity=0.9, seed=3, include=["stages.*"],
                         distill_precision="bf16", distill_grad_checkpointing=True, learned_thresholds_density="kde")
    stage = stage_config(run, "fcpts")
    expected = resolve_config(None, method="fcpts", sparsity=0.9, seed=3, include=["stages.*"],
                              distill_precision="bf16", distill_grad_checkpointing=True,
                              learned_thresholds_density="kde")
    assert stage == expected
    # the run's own picks and its preset's settings stay out of the stage
    unipts = resolve_config(None, method="unipts", allocation="fcpts")
    assert stage_config(unipts, "fcpts") == resolve_config(None, method="fcpts")


def test_a_recovery_without_training_keeps_the_presets_masks_fixed():
    assert SparsityConfig(recovery="none").dynamics == "static"  # recommended tightens masks only while distilling
    assert SparsityConfig(recovery="layerwise", method="recommended").dynamics == "static"
    assert SparsityConfig().dynamics == "gradual"
