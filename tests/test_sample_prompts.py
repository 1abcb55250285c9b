"""`cogtune sample --prompts-file`: prompts are embedded a chunk at a time, and truncation is summarised."""

from __future__ import annotations

import pytest
import torch

import cogtune.models.text as text_module
import cogtune.sample as sample_module
from cogtune.models.registry import TINY_PRESETS
from cogtune.sample import SampleConfig, run_sample
from tests.rounding import UNIT_ROUNDOFF, denoising_tolerance, t5_chain

LONG = "a red circle moves left across a dark background while a blue square spins slowly " * 3  # > 32 tokens


def _config(tmp_path, prompts_file, name="out", **kwargs):
    return SampleConfig(model="tiny", prompts_file=str(prompts_file), output=str(tmp_path / name), steps=2,
                        frames=9, height=64, width=64, **kwargs)


@pytest.fixture
def events(monkeypatch):
    """What the run does, in order: `encode N` per T5 call, `generate` per video."""
    seen: list[str] = []
    real_encode, real_generate = text_module.encode_prompts, sample_module.generate_videos

    def encode(tokenizer, encoder, prompts, *args, **kwargs):
        seen.append(f"encode {len(prompts)}")
        return real_encode(tokenizer, encoder, prompts, *args, **kwargs)

    def generate(*args, **kwargs):
        seen.append("generate")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(text_module, "encode_prompts", encode)
    monkeypatch.setattr(sample_module, "generate_videos", generate)
    return seen


def test_prompts_are_encoded_a_chunk_at_a_time_just_before_generation(tmp_path, monkeypatch, events, sampled,
                                                                     capsys):
    monkeypatch.setattr(sample_module, "PROMPT_CHUNK", 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"A red circle.\n{LONG}\n\nA blue square.\nA green ball.\n{LONG}\n")
    paths = run_sample(_config(tmp_path, prompts))
    assert len(paths) == 5
    # the negative prompt once, then each chunk of prompts right before its videos
    assert events == ["encode 1", "encode 2", "generate", "generate", "encode 2", "generate", "generate",
                      "encode 1", "generate"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: 2 prompts were longer than 32 tokens and were truncated (first: line 2 of "
                        "prompts.txt)"]

    # the same videos as one chunk makes: video i depends on prompt i and seed + i only. T5 embeds a
    # batch of 2 or of 5 in other float32 orders, so the prompts' embeddings and the denoised latents
    # agree to the rounding bound of `tests.rounding` (a swapped prompt or seed differs by whole units).
    monkeypatch.setattr(sample_module, "PROMPT_CHUNK", 16)
    whole = run_sample(_config(tmp_path, prompts, name="whole"))
    assert len(whole) == 5 and len(sampled.latents) == len(sampled.prompt_embeds) == 10
    spec = TINY_PRESETS["tiny"]
    text = spec.max_text_tokens
    for index in range(5):
        chunked, single = sampled.prompt_embeds[index], sampled.prompt_embeds[5 + index]
        scale = single.abs().max().item()
        torch.testing.assert_close(chunked, single, rtol=0, atol=2 * t5_chain(spec.text_encoder_config, text)
                                   * UNIT_ROUNDOFF * scale)
        chunked, single = sampled.latents[index], sampled.latents[5 + index]
        tolerance = denoising_tolerance(spec, 2, frames=9, height=64, width=64, text_tokens=text)
        torch.testing.assert_close(chunked, single, rtol=0, atol=tolerance * single.abs().max().item())
    assert (sampled.latents[5] - sampled.latents[6]).abs().max() > 100 * tolerance * sampled.latents[6].abs().max()


def test_one_truncated_prompt_is_one_line_naming_it(tmp_path, events, capsys):
    config = SampleConfig(model="tiny", prompts=("A red circle.", LONG), output=str(tmp_path / "o"), steps=1,
                          frames=9, height=64, width=64)
    run_sample(config)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: 1 prompt was longer than 32 tokens and was truncated (first: --prompt 2)"]
    assert events[:2] == ["encode 1", "encode 2"]  # one chunk: all prompts first, as before
