"""Numbers that are not numbers (NaN, inf) or out of range are refused up front, naming the option or setting."""

from __future__ import annotations

import pytest

from cogtune.config import load_config
from cogtune.errors import ConfigError

TRAIN = ["train", "t2v", "--model", "tiny", "--data", "nowhere", "--output-dir", "nowhere"]
SAMPLE = ["sample", "--model", "tiny", "--prompt", "x", "--output", "nowhere.mp4"]
ENCODE = ["encode", "--model", "tiny", "--data-root", "nowhere", "--output-dir", "nowhere"]


@pytest.mark.parametrize("args, option, value", [
    (TRAIN, "--lr", "nan"),
    (TRAIN, "--lr", "inf"),
    (TRAIN, "--lr", "-1e-4"),
    (TRAIN, "--lora-alpha", "nan"),
    (TRAIN, "--lora-alpha", "0"),
    (TRAIN, "--max-grad-norm", "inf"),
    (TRAIN, "--max-grad-norm", "-1"),
    (TRAIN, "--caption-dropout", "nan"),
    (TRAIN, "--caption-dropout", "1.5"),
    (TRAIN, "--image-dropout", "-inf"),
    (SAMPLE, "--lora-scale", "nan"),
    (SAMPLE, "--lora-scale", "inf"),
    (SAMPLE, "--guidance", "nan"),
    (SAMPLE, "--guidance", "-2"),
    (SAMPLE, "--fps", "0"),
    (ENCODE, "--sample-fps", "nan"),
    (ENCODE, "--sample-fps", "0"),
    (["dataset", "validate", "nowhere"], "--sample-fps", "inf"),
    (["bench", "memory"], "--gpu-memory", "nan"),
    (["bench", "memory"], "--gpu-memory", "-24"),
])
def test_bad_float_options_are_usage_errors_naming_the_option(cli, args, option, value):
    result = cli(*args, option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_negative_lora_scale_is_allowed():
    """A negative scale subtracts the LoRA: a real use, unlike NaN."""
    from cogtune.cli.options import number
    from cogtune.sample import SampleConfig

    assert number()(-0.5) == -0.5
    assert SampleConfig(model="tiny", prompts=("x",), output="x.mp4", lora_scale=-0.5).lora_scale == -0.5


TRAIN_TOML = 'model = "tiny"\ndata = "c"\noutput_dir = "o"\n'


@pytest.mark.parametrize("body, expected", [
    ("[optimizer]\nlr = nan\n", "optimizer.lr: expected a finite number, got nan"),
    ("[optimizer]\nlr = inf\n", "optimizer.lr: expected a finite number, got inf"),
    ("[optimizer]\nweight_decay = -0.1\n", "optimizer.weight_decay must be >= 0"),
    ("[optimizer]\nbeta1 = nan\n", "optimizer.beta1: expected a finite number"),
    ("[optimizer]\nbeta2 = 1.0\n", "optimizer.beta2 must be < 1"),
    ("[optimizer]\neps = 0\n", "optimizer.eps must be > 0"),
    ("[optimizer]\nmax_grad_norm = inf\n", "optimizer.max_grad_norm: expected a finite number"),
    ("[lora]\ndropout = nan\n", "lora.dropout: expected a finite number"),
    ("[lora]\nalpha = -inf\n", "lora.alpha: expected a finite number"),
    ("[validation]\nguidance = nan\n", "validation.guidance: expected a finite number"),
    ("[validation]\nguidance = -1\n", "validation.guidance must be >= 0"),
    ("caption_dropout = nan\n", "caption_dropout: expected a finite number"),
    ("image_dropout = 2\n", "image_dropout must be <= 1"),
])
def test_bad_numbers_in_a_train_config_file_name_the_file_and_setting(tmp_path, body, expected):
    from cogtune.train import TrainConfig

    path = tmp_path / "run.toml"
    path.write_text(TRAIN_TOML + body)
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert info.value.message.startswith(str(path)) and expected in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("body, expected", [
    ("lora_scale = nan", "lora_scale: expected a finite number"),
    ("guidance = inf", "guidance: expected a finite number"),
    ("fps = 0", "fps must be >= 1"),
])
def test_bad_numbers_in_a_sample_config_file(tmp_path, body, expected):
    from cogtune.sample import SampleConfig

    path = tmp_path / "sample.toml"
    path.write_text(f'model = "tiny"\nprompts = ["x"]\noutput = "x.mp4"\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load_config(SampleConfig, path)
    assert expected in info.value.message


def test_dataclasses_refuse_non_finite_values_built_directly():
    """The Python API (no TOML, no flags) is held to the same rules."""
    from cogtune.bench.run import BenchConfig
    from cogtune.data.dataset import DatasetConfig
    from cogtune.sample import SampleConfig
    from cogtune.train.config import LoraConfig, OptimizerConfig, ValidationConfig

    for build, name in [
        (lambda: OptimizerConfig(lr=float("nan")), "optimizer.lr"),
        (lambda: OptimizerConfig(lr=float("inf")), "optimizer.lr"),
        (lambda: OptimizerConfig(weight_decay=float("nan")), "optimizer.weight_decay"),
        (lambda: OptimizerConfig(max_grad_norm=float("inf")), "optimizer.max_grad_norm"),
        (lambda: OptimizerConfig(eps=float("nan")), "optimizer.eps"),
        (lambda: LoraConfig(alpha=float("inf")), "lora.alpha"),
        (lambda: ValidationConfig(guidance=float("nan")), "validation.guidance"),
        (lambda: SampleConfig(model="tiny", prompts=("x",), output="x.mp4", lora_scale=float("nan")), "lora_scale"),
        (lambda: SampleConfig(model="tiny", prompts=("x",), output="x.mp4", guidance=float("inf")), "guidance"),
        (lambda: SampleConfig(model="tiny", prompts=("x",), output="x.mp4", fps=0), "fps"),
        (lambda: DatasetConfig(root="d", sample_fps=float("nan")), "sample_fps"),
        (lambda: BenchConfig(gpu_memory=float("inf")), "gpu_memory"),
    ]:
        with pytest.raises(ConfigError, match=name):
            build()
