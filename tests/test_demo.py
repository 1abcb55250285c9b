"""`cogtune demo` end to end, as a user runs it: files, frame count, and the LoRA in diffusers."""

from __future__ import annotations

import logging

from cogtune.data.video import probe_video


def test_demo_end_to_end(demo_run, caplog):
    """`cogtune demo --output-dir DIR --steps 20`, run once for the suite (tests/conftest.py's `demo_run`)."""
    from diffusers import CogVideoXPipeline

    out, code, stdout, stderr = demo_run
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "look like noise" in " ".join((stdout + stderr).split())  # so nobody thinks it failed
    for relative in ("model/model_index.json", "data/prompts.txt", "data/videos.txt", "cache/manifest.json",
                     "run/pytorch_lora_weights.safetensors", "run/config.toml", "run/memory.json", "sample.mp4",
                     "run/heldout_items.json", "run/evaluation.json", "run/validation/final/base-vs-lora/00.mp4"):
        assert (out / relative).is_file(), relative
    assert probe_video(out / "sample.mp4").frames == 9

    pipe = CogVideoXPipeline.from_pretrained(out / "model")
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(out / "run")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    assert "transformer" in pipe.get_list_adapters()
