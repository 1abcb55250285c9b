"""A launch whose strategy cannot run is refused in one line before any weight loads."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def _train(cli, cache, tmp_path, *extra):
    return cli("train", "t2v", "--model", "tiny", "--data", cache, "--output-dir", tmp_path / "run", "--steps", "1",
               *extra)


def _one_error_line(result) -> str:
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_deepspeed_without_the_package(cli, tiny_cache, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec  # the test extra installs deepspeed: hide it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    line = _one_error_line(_train(cli, tiny_cache, tmp_path))
    assert line.startswith("error: this launch uses DeepSpeed") and "(hint: pip install 'cogtune[deepspeed]')" in line
    assert not (tmp_path / "run").exists()


def test_deepspeed_fp16_without_cuda(cli, tiny_cache, tmp_path, monkeypatch):
    """DeepSpeed runs on the CPU (tests/distributed/test_deepspeed.py), but its CPU accelerator refuses fp16
    ("Type fp16 is not supported on your device", once the weights are loaded): refused before, in one line."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real_find_spec(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    line = _one_error_line(_train(cli, tiny_cache, tmp_path, "--mixed-precision", "fp16"))
    assert line.startswith("error: DeepSpeed trains in fp16 on CUDA GPUs only")
    assert "(hint: use --mixed-precision bf16 or no on the CPU)" in line
    assert not (tmp_path / "run").exists()


def test_fsdp1_is_refused(cli, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    line = _one_error_line(_train(cli, tiny_cache, tmp_path))
    assert "cogtune trains with FSDP2 only" in line and "fsdp_version: 2" in line


@pytest.mark.parametrize(("flags", "named"), [(("--fp8",), "--base-weights fp8"), (("--base-weights", "nf4"),
                                                                                  "--base-weights nf4")])
def test_a_float8_or_quantized_base_does_not_combine_with_fsdp(cli, tiny_cache, tmp_path, monkeypatch, flags, named):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    line = _one_error_line(_train(cli, tiny_cache, tmp_path, *flags))
    assert f"{named} does not combine with FSDP" in line


def test_the_launch_config_cannot_change_gradient_accumulation(cli, tiny_cache, tmp_path, monkeypatch):
    """`accelerate launch` exports a config's gradient_accumulation_steps; `--gradient-accumulation` still decides."""
    from safetensors.torch import load_file

    args = ("--rank", "4", "--lr", "1e-3", "--steps", "2", "--gradient-accumulation", "2")
    assert _train(cli, tiny_cache, tmp_path / "plain", *args).exit_code == 0
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    assert _train(cli, tiny_cache, tmp_path / "launched", *args).exit_code == 0
    plain = load_file(tmp_path / "plain" / "run" / "pytorch_lora_weights.safetensors")
    launched = load_file(tmp_path / "launched" / "run" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(plain[k], launched[k]) for k in plain)


def test_a_launch_config_naming_another_precision_is_warned_about(cli, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # the file's mixed_precision; a CPU run trains in float32
    result = _train(cli, tiny_cache, tmp_path)
    assert result.exit_code == 0
    assert "warning: the accelerate config says mixed precision bf16; cogtune trains with no" in result.stderr
