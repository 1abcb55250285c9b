"""Tiny presets: real diffusers pipeline folders, built offline and deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cogtune.models.registry import TINY_PRESETS
from cogtune.models.tiny import build_tiny_tokenizer, ensure_tiny_model


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_each_tiny_preset_loads_and_runs_in_its_diffusers_pipeline(name):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from PIL import Image

    spec = TINY_PRESETS[name]
    folder = ensure_tiny_model(name)
    index = json.loads((folder / "model_index.json").read_text())
    cls = CogVideoXImageToVideoPipeline if spec.is_i2v else CogVideoXPipeline
    assert index["_class_name"] == cls.__name__
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="A red circle moves left.", num_frames=9, height=64, width=64, num_inference_steps=2,
                  guidance_scale=6.0, output_type="np", max_sequence_length=spec.max_text_tokens,
                  generator=torch.Generator().manual_seed(0))
    if spec.is_i2v:
        kwargs["image"] = Image.new("RGB", (64, 64), (200, 30, 30))
    frames = pipe(**kwargs).frames
    assert frames.shape == (1, 9, 64, 64, 3)
    assert np.isfinite(frames).all()
    assert pipe.transformer.config.use_rotary_positional_embeddings == (spec.positional_embedding == "rotary")


def test_tiny_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    first = ensure_tiny_model("tiny-rotary", tmp_path / "a")
    second = ensure_tiny_model("tiny-rotary", tmp_path / "b")
    for part in ("transformer", "vae", "text_encoder"):
        (a,) = (first / part).glob("*.safetensors")
        (b,) = (second / part).glob("*.safetensors")
        left, right = load_file(a), load_file(b)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)


def test_tiny_model_is_cached_once(cogtune_home):
    path = ensure_tiny_model("tiny")
    assert path.is_relative_to(cogtune_home)
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model("tiny") == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from cogtune.errors import ModelError

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="refusing to overwrite"):
        ensure_tiny_model("tiny", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_tiny_tokenizer_is_t5_like():
    tokenizer = build_tiny_tokenizer(32)
    ids = tokenizer("A red circle moves left.").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.unk_token_id not in ids
    padded = tokenizer("A red circle", padding="max_length", max_length=32, truncation=True).input_ids
    assert len(padded) == 32 and padded[-1] == tokenizer.pad_token_id == 0
    assert max(tokenizer("Zebra! 42 ~ {x}").input_ids) < 512


def test_building_a_tiny_model_keeps_library_logs_off_stdout(tmp_path, synthetic_data):
    """The first use of a tiny preset builds and saves it; accelerate's unwrapping then imports DeepSpeed
    (when installed), which logs to stdout: `--json` output must still be one JSON document."""
    from tests.conftest import run_subprocess

    result = run_subprocess("dataset", "validate", synthetic_data, "--model", "tiny", "--json",
                            env={"COGTUNE_HOME": str(tmp_path / "home")})
    assert (tmp_path / "home" / "models").is_dir()  # the model was built in this process
    assert json.loads(result.stdout)["ok"] is True, result.stdout[:300]
