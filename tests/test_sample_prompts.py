"""`cogtune sample --prompts-file`: prompts are embedded a chunk at a time, and truncation is summarised."""

from __future__ import annotations

import numpy as np
import pytest

import cogtune.models.text as text_module
import cogtune.sample as sample_module
from cogtune.data.video import read_all_frames
from cogtune.sample import SampleConfig, run_sample

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


def test_prompts_are_encoded_a_chunk_at_a_time_just_before_generation(tmp_path, monkeypatch, events, capsys):
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

    # the same videos as one chunk makes: video i depends on prompt i and seed + i only
    monkeypatch.setattr(sample_module, "PROMPT_CHUNK", 16)
    whole = run_sample(_config(tmp_path, prompts, name="whole"))
    for chunked, single in zip(paths, whole):
        assert np.abs(read_all_frames(chunked).astype(int) - read_all_frames(single).astype(int)).max() <= 2


def test_one_truncated_prompt_is_one_line_naming_it(tmp_path, events, capsys):
    config = SampleConfig(model="tiny", prompts=("A red circle.", LONG), output=str(tmp_path / "o"), steps=1,
                          frames=9, height=64, width=64)
    run_sample(config)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: 1 prompt was longer than 32 tokens and was truncated (first: --prompt 2)"]
    assert events[:2] == ["encode 1", "encode 2"]  # one chunk: all prompts first, as before
