"""Config merging: defaults < TOML file < flags, with every error named."""

from __future__ import annotations

import dataclasses

import pytest

from cogtune.config import dump_toml, config_to_dict, load_config, read_toml, write_config
from cogtune.errors import ConfigError
from cogtune.train.config import TrainConfig

REQUIRED = {"model": "tiny", "data": "cache", "output_dir": "out"}


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_apply_when_nothing_is_given():
    config = load_config(TrainConfig, overrides=REQUIRED)
    assert config.steps == 1000
    assert config.lora.rank == 64
    assert config.lora.effective_alpha == 64.0
    assert config.optimizer.name == "adamw"


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = write(tmp_path, 'model = "tiny"\ndata = "c"\noutput_dir = "o"\nsteps = 50\n[lora]\nrank = 8\nalpha = 4\n')
    from_file = load_config(TrainConfig, path)
    assert (from_file.steps, from_file.lora.rank, from_file.lora.alpha) == (50, 8, 4.0)
    merged = load_config(TrainConfig, path, {"steps": 7, "lora.rank": 32, "lora.alpha": None})
    assert merged.steps == 7  # the flag wins
    assert merged.lora.rank == 32
    assert merged.lora.alpha == 4.0  # a flag left at None does not shadow the file


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, 'model = "tiny"\n[lora]\nrnak = 8\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'lora.rnak' \(did you mean 'lora.rank'\?\)"):
        load_config(TrainConfig, path)


def test_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path, 'model = "tiny"\ndata = "c"\noutput_dir = "o"\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"run.toml: steps: expected an integer, got 'many'"):
        load_config(TrainConfig, path)


def test_literal_choices_are_checked():
    with pytest.raises(ConfigError, match="not one of"):
        load_config(TrainConfig, overrides={**REQUIRED, "mixed_precision": "fp8"})


def test_cross_field_rules_run_after_merging(tmp_path):
    path = write(tmp_path, 'model = "tiny"\ndata = "c"\noutput_dir = "o"\n[validation]\nprompts = ["a", "b"]\n')
    with pytest.raises(ConfigError, match="2 validation prompts"):
        load_config(TrainConfig, path, {"task": "i2v", "validation.images": ("one.png",)})


def test_missing_required_setting():
    with pytest.raises(ConfigError, match="model is required"):
        load_config(TrainConfig, overrides={"data": "c", "output_dir": "o"})


def test_invalid_toml_is_a_config_error(tmp_path):
    path = write(tmp_path, "steps = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(TrainConfig, path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.toml")


def test_written_config_round_trips_and_documents_itself(tmp_path):
    config = load_config(TrainConfig, overrides={**REQUIRED, "lora.rank": 8, "validation.prompts": ('say "hi"\n',)})
    path = write_config(config, tmp_path)
    text = path.read_text()
    assert "# LoRA rank." in text
    assert "[lora]" in text and "[optimizer]" in text
    assert load_config(TrainConfig, path) == config
    assert read_toml(path)["validation"]["prompts"] == ['say "hi"\n']


def test_config_is_frozen():
    config = load_config(TrainConfig, overrides=REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3  # type: ignore[misc]


def test_dump_toml_handles_special_floats_and_keys():
    text = dump_toml({"a": float("inf"), "b": [1, 2.5, True], "weird key": "x"})
    assert "a = inf" in text and "b = [1, 2.5, true]" in text and '"weird key" = "x"' in text
    assert config_to_dict(load_config(TrainConfig, overrides=REQUIRED))["lora"]["target_modules"][0] == "to_q"
