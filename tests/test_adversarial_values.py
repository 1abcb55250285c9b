"""Values a careless or hostile user gives: each is refused up front in one line naming the option,
setting or file (exit 1, or Click's usage exit 2 for an option), never an "unexpected error"."""

from __future__ import annotations

import pytest

from cogtune.config import SEED_MAX, load_config
from cogtune.errors import ConfigError

TRAIN = ["train", "t2v", "--model", "tiny", "--data", "nowhere", "--output-dir", "nowhere"]
SAMPLE = ["sample", "--model", "tiny", "--prompt", "x", "--output", "nowhere.mp4"]


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("args, option", [(TRAIN, "--seed"), (TRAIN, "--validation-seed"), (SAMPLE, "--seed")])
@pytest.mark.parametrize("value", ["-1", str(SEED_MAX + 1)])
def test_seeds_outside_what_torch_generators_take_are_refused(cli, args, option, value):
    assert f"Invalid value for '{option}'" in one_line_error(cli(*args, option, value), code=2)


def test_the_largest_seed_is_accepted_and_each_video_keeps_a_valid_seed(cli, tmp_path):
    """torch's generators take 0 .. 2^64 - 1 (the oracle: torch itself refuses 2^64)."""
    import torch

    torch.Generator().manual_seed(SEED_MAX)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(SEED_MAX + 1)
    result = cli("sample", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--seed", str(SEED_MAX),
                 "--steps", "1", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 2


@pytest.mark.parametrize("toml, named", [
    ("[lora]\nrank = 100000000000000000000000\n", "lora.rank must be <= 4096"),
    ("steps = 100000000000000000000000\n", "steps must be <= 9223372036854775807"),
    ("seed = -1\n", "seed must be >= 0"),
])
def test_toml_integers_out_of_range_name_the_setting(cli, tmp_path, toml, named):
    from cogtune.train.config import TrainConfig

    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=named):
        load_config(TrainConfig, path, {"model": "tiny", "data": "d", "output_dir": "o"})
    assert named in one_line_error(cli(*TRAIN, "--config", path))


def test_a_binary_toml_and_a_folder_as_config_are_one_line(cli, tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert f"{binary}: not valid TOML" in one_line_error(cli(*TRAIN, "--config", binary))
    assert f"{tmp_path} is a folder, not a TOML config file" in one_line_error(cli(*TRAIN, "--config", tmp_path))


def test_an_output_dir_that_is_a_file_is_refused_and_left_alone(cli, tmp_path, tiny_cache):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for output in (blocker, blocker / "run"):
        stderr = one_line_error(cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", output,
                                    "--steps", "1"))
        assert f"{blocker} is a file" in stderr
        stderr = one_line_error(cli("encode", "--model", "tiny", "--data-root", tmp_path, "--output-dir", output))
        assert f"{blocker} is a file" in stderr
    assert blocker.read_text() == "mine"


def test_a_folder_as_prompts_file_is_one_line(cli, tmp_path):
    assert f"{tmp_path} is a folder, not a text file" in one_line_error(
        cli("sample", "--model", "tiny", "--prompts-file", tmp_path, "--output", tmp_path / "o.mp4"))


def test_a_validation_shape_off_the_models_grid_is_refused_even_without_prompts(cli, tmp_path, tiny_cache):
    """A shape given is checked before anything loads, whether or not the run has validation prompts."""
    base = ["train", "t2v", "--model", "tiny", "--data", tiny_cache, "--steps", "1"]
    stderr = one_line_error(cli(*base, "--output-dir", tmp_path / "a", "--validation-height", "70"))
    assert "height 70 must be a positive multiple of 16" in stderr
    stderr = one_line_error(cli(*base, "--output-dir", tmp_path / "b", "--validation-frames", "10"))
    assert "10 frames breaks tiny's frame rule 8k+1" in stderr
    assert not (tmp_path / "a" / "config.toml").exists()


def test_captions_with_control_characters_are_errors_naming_the_line(cli, tmp_path, synthetic_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    lines = (data / "prompts.txt").read_text().splitlines()
    lines[1] = "a red\x00circle"
    (data / "prompts.txt").write_text("\n".join(lines) + "\n")
    result = cli("dataset", "validate", data)
    assert result.exit_code == 1
    assert "[control-characters] prompts.txt:2" in result.stdout + result.stderr


def test_prepare_without_a_model_keeps_cogvideoxs_frame_rule(cli, tmp_path):
    (tmp_path / "raw").mkdir()
    stderr = one_line_error(cli("dataset", "prepare", tmp_path / "raw", tmp_path / "out", "--frames", "10",
                                "--fps", "8"))
    assert "--frames 10 breaks CogVideoX's frame rule 8k+1" in stderr and "nearest below: 9" in stderr
    assert not (tmp_path / "out").exists()


def test_a_lora_target_that_matches_no_module_is_refused_before_loading(cli, tmp_path, tiny_cache, monkeypatch):
    from cogtune.models import loading

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(loading, "load_transformer", no_load)
    stderr = one_line_error(cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir",
                                tmp_path / "run", "--steps", "1", "--lora-target", "to_q", "--lora-target", "to_qq"))
    assert "--lora-target to_qq matches no module of tiny's transformer" in stderr and "attn1.to_q" in stderr
    assert not (tmp_path / "run").exists()


def test_peft_matches_the_default_targets_on_every_family():
    """The check uses peft's own matching: every default target adapts some module of each family."""
    from cogtune.models.registry import TINY_PRESETS
    from cogtune.train.config import LoraConfig
    from cogtune.train.lora import check_lora_targets

    for spec in TINY_PRESETS.values():
        check_lora_targets(spec, LoraConfig())
