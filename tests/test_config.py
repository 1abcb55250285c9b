"""Config merging: defaults < TOML file < flags, with every error named."""

from __future__ import annotations

import dataclasses
from typing import Literal

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


def test_settings_declare_their_bounds_and_choices_once():
    """`setting(...)` holds a field's checks; `check_settings` enforces them, naming the field."""
    from cogtune.config import check_settings, require, setting

    @dataclasses.dataclass(frozen=True)
    class Section:
        name: str = setting("a", "Name.", flag="--name", choices=("a", "b"))
        mode: Literal["x", "y"] = setting("x", "Mode.")
        rate: float = setting(0.5, "A rate.", low=0, high=1, high_open=True)
        scale: float = setting(1.0, "Any finite number.")
        count: int | None = setting(None, "A count.", low=1)
        path: str = setting("", "Needed.", flag="--path")

        def __post_init__(self):
            check_settings(self, "section.")

    assert Section(count=3).count == 3
    for kwargs, message in [
        ({"name": "c"}, "section.name 'c' is not one of a, b"),
        ({"mode": "z"}, "section.mode 'z' is not one of x, y"),
        ({"rate": 1.0}, "section.rate must be < 1, got 1"),
        ({"scale": float("nan")}, "section.scale must be a finite number, got nan"),
        ({"count": 0}, "section.count must be >= 1, got 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Section(**kwargs)
    with pytest.raises(ConfigError, match=r"path is required \(--path, or `path = ...` in the --config file\)"):
        require(Section(), "path")
    with pytest.raises(TypeError):
        setting([], "Lists are not frozen.")


def test_an_override_key_must_name_a_setting_even_when_not_given():
    """A command's stale override key fails on every run, not only when its flag is typed."""
    with pytest.raises(ConfigError, match="unknown setting 'lora.rnak'"):
        load_config(TrainConfig, overrides={**REQUIRED, "lora.rnak": None})
    with pytest.raises(ConfigError, match="unknown setting 'nosuch.rank'"):
        load_config(TrainConfig, overrides={**REQUIRED, "nosuch.rank": None})
