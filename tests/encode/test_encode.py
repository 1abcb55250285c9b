"""The latent cache: contents, manifest, resume, and the compatibility check."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cogtune.data.dataset import DatasetConfig
from cogtune.encode import EncodeConfig, VideoLatentCache, encode_dataset
from cogtune.encode.cache import MANIFEST_NAME
from cogtune.errors import DataError
from cogtune.models.registry import PRESETS, TINY_PRESETS


def test_cache_contents(tiny_cache):
    manifest = json.loads((tiny_cache / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["model"]["family"] == "1.0-sincos"
    assert manifest["buckets"] == ["9x64x64"] and len(manifest["items"]) == 4
    assert manifest["items"][0]["line"] == 1 and manifest["items"][0]["video"] == "videos/clip_000.mp4"
    latents = load_file(tiny_cache / manifest["items"][0]["latent_file"])
    text = load_file(tiny_cache / manifest["items"][0]["text_file"])
    # posterior mean and logvar of 4 latent channels, 3 latent frames, 8x8
    assert latents["latent_dist"].shape == (8, 3, 8, 8)
    assert text["prompt_embeds"].shape == (32, 32)
    assert (tiny_cache / "config.toml").is_file()


def test_cache_reader(tiny_cache):
    cache = VideoLatentCache(tiny_cache)
    assert len(cache) == 4
    assert cache.validation_prompts == ["A red circle moves left."]
    assert cache.validation_prompt_embeds().shape == (1, 32, 32)
    assert cache.empty_prompt_embeds().shape == (32, 32)
    item = cache.load_item(2)
    assert set(item) == {"latent_dist", "prompt_embeds"}


def test_text_embeddings_match_the_pipeline(tiny_cache, tiny_model_dir):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    cache = VideoLatentCache(tiny_cache)
    caption = cache.items[0]["caption"]
    expected, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=32)
    torch.testing.assert_close(cache.load_item(0)["prompt_embeds"], expected[0])


def test_rerun_skips_finished_items(tmp_path, synthetic_data):
    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(synthetic_data)),
                          buckets=("9x64x64",), num_workers=0)
    first = encode_dataset(config)
    assert len(first.pending_latents) == 4
    stamp = (tmp_path / "c" / "latents" / "000000.safetensors").stat().st_mtime_ns
    second = encode_dataset(config)
    assert second.pending_latents == [] and second.pending_text == []
    assert (tmp_path / "c" / "latents" / "000000.safetensors").stat().st_mtime_ns == stamp


def test_incompatible_model_is_refused(tiny_cache):
    cache = VideoLatentCache(tiny_cache)
    cache.check_compatible(TINY_PRESETS["tiny"])
    with pytest.raises(DataError, match="incompatible with cogvideox-5b"):
        cache.check_compatible(PRESETS["cogvideox-5b"])
    with pytest.raises(DataError, match="no condition-image latents"):
        cache.check_compatible(TINY_PRESETS["tiny"], needs_image_latents=True)


def test_not_a_cache(tmp_path):
    with pytest.raises(DataError, match="not a cogtune cache"):
        VideoLatentCache(tmp_path)


def test_dataset_errors_stop_before_any_weight_is_loaded(tmp_path, synthetic_data):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "prompts.txt").write_text("a\nb\n")
    (tmp_path / "d" / "videos.txt").write_text("x.mp4\n")
    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(tmp_path / "d")))
    with pytest.raises(DataError, match=r"dataset has errors: prompts.txt:2: 2 captions in prompts.txt but 1 videos"):
        encode_dataset(config)
    assert not (tmp_path / "c").exists()


def test_skip_invalid_encodes_the_good_entries(tmp_path, synthetic_data):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synthetic_data, root)
    (root / "videos" / "bad.mp4").write_bytes(b"junk" * 100)
    with open(root / "prompts.txt", "a") as handle:
        handle.write("broken\n")
    with open(root / "videos.txt", "a") as handle:
        handle.write("videos/bad.mp4\n")
    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(root)),
                          buckets=("9x64x64",), num_workers=0)
    with pytest.raises(DataError, match=r"videos.txt:5: videos/bad.mp4") as info:
        encode_dataset(config)
    assert "--skip-invalid" in info.value.hint
    plan = encode_dataset(dataclasses.replace(config, skip_invalid=True))
    assert len(plan.items) == 4 and len(VideoLatentCache(tmp_path / "c")) == 4


def test_bucket_against_model_rule(tmp_path, synthetic_data):
    from cogtune.errors import ModelError

    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(synthetic_data)),
                          buckets=("12x64x64",))
    with pytest.raises(ModelError, match="frame rule"):
        encode_dataset(config)


def test_dry_run_writes_nothing(tmp_path, synthetic_data):
    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(synthetic_data)),
                          buckets=("9x64x64",))
    plan = encode_dataset(config, dry_run=True)
    assert len(plan.items) == 4 and plan.estimated_bytes() > 0
    assert not (tmp_path / "c").exists()


def test_i2v_cache_holds_clean_and_noised_condition_latents(tmp_path, synthetic_data):
    from PIL import Image

    root = tmp_path / "d"
    import shutil

    shutil.copytree(synthetic_data, root)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "red.png")
    (root / "images.txt").write_text("red.png\n" * 4)
    config = EncodeConfig(model="tiny-i2v", output_dir=str(tmp_path / "c"),
                          data=DatasetConfig(root=str(root), image_column="images.txt"), buckets=("9x64x64",),
                          image_noise_samples=3, num_workers=0)
    encode_dataset(config)
    cache = VideoLatentCache(tmp_path / "c")
    item = cache.load_item(0)
    assert item["image_latent_dist"].shape == (8, 1, 8, 8)
    assert item["image_latent_dist_noised"].shape == (3, 8, 1, 8, 8)
    sigmas = item["image_noise_sigma"]
    assert sigmas.shape == (3,) and bool(((sigmas > 0.005) & (sigmas < 0.5)).all())
    # noise is small: the noisy encodes stay close to the clean one, but differ from it
    difference = (item["image_latent_dist_noised"][:, :4] - item["image_latent_dist"][:4]).abs().mean()
    assert 0 < difference < 1
    manifest = cache.manifest
    assert manifest["i2v"] and manifest["image_augmentation"]["noised_samples"] == 3
    cache.check_compatible(TINY_PRESETS["tiny-i2v"], needs_image_latents=True)


def test_i2v_without_image_column_uses_the_first_frame(tmp_path, synthetic_data):
    from cogtune.data.clips import Bucket, load_clip

    config = EncodeConfig(model="tiny-i2v", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(synthetic_data)),
                          buckets=("9x64x64",), image_noise_samples=0, num_workers=0)
    plan = encode_dataset(config)
    cache = VideoLatentCache(tmp_path / "c")
    item = cache.load_item(0)
    assert "image_latent_dist_noised" not in item
    from cogtune.models.loading import load_vae, resolve_model

    vae = load_vae(resolve_model("tiny-i2v"), dtype=torch.float32)
    first = load_clip(plan.items[0].entry.video, Bucket(9, 64, 64))[0]
    with torch.no_grad():
        expected = vae.encode(first[None, :, None]).latent_dist.parameters[0]
    torch.testing.assert_close(item["image_latent_dist"], expected, rtol=1e-4, atol=1e-5)


def test_cache_loads_with_safetensors_alone(tiny_cache):
    """Nothing of cogtune is needed to read a cache: plain JSON and plain safetensors."""
    from safetensors import safe_open

    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    for item in manifest["items"]:
        for key in ("latent_file", "text_file"):
            with safe_open(str(tiny_cache / item[key]), framework="pt") as handle:
                assert handle.keys() and handle.metadata()["key"]
    with safe_open(str(tiny_cache / manifest["empty_prompt_file"]), framework="pt") as handle:
        assert handle.get_tensor("prompt_embeds").shape == (32, 32)


def test_overwrite_recomputes(tmp_path, synthetic_data):
    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(synthetic_data)),
                          buckets=("9x64x64",), num_workers=0)
    encode_dataset(config)
    again = encode_dataset(dataclasses.replace(config, overwrite=True))
    assert len(again.pending_latents) == 4 and len(again.pending_text) == 4


def test_changed_caption_recomputes_only_its_text(tmp_path, synthetic_data):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synthetic_data, root)
    config = EncodeConfig(model="tiny", output_dir=str(tmp_path / "c"), data=DatasetConfig(root=str(root)),
                          buckets=("9x64x64",), num_workers=0)
    encode_dataset(config)
    lines = (root / "prompts.txt").read_text().splitlines()
    lines[2] = "A changed caption."
    (root / "prompts.txt").write_text("\n".join(lines) + "\n")
    plan = encode_dataset(config)
    assert [i.index for i in plan.pending_text] == [2] and plan.pending_latents == []
    assert VideoLatentCache(tmp_path / "c").items[2]["caption"] == "A changed caption."


def test_train_refuses_an_incompatible_cache(cli, tiny_cache, tmp_path):
    result = cli("train", "t2v", "--model", "tiny-rotary", "--data", tiny_cache, "--output-dir", tmp_path / "run")
    assert result.exit_code == 1
    assert "was made for tiny, which is incompatible with tiny-rotary (scaling_factor" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_caches_config_reproduces_a_run_given_by_flags(cli, tmp_path, synthetic_data):
    """--frames/--height/--width are settings: the config.toml written into the cache alone plans the same run."""
    from cogtune.config import load_config
    from cogtune.encode import plan_encode

    out = tmp_path / "cache"
    result = cli("encode", "--model", "tiny", "--data-root", synthetic_data, "--output-dir", out,
                 "--frames", "17", "--height", "32", "--width", "32", "--num-workers", "0")
    assert result.exit_code == 0, result.stderr
    config = load_config(EncodeConfig, out / "config.toml")
    assert (config.frames, config.height, config.width) == (17, 32, 32)
    plan = plan_encode(config)
    assert [str(bucket) for bucket in plan.buckets] == ["17x32x32"]
    assert plan.pending_latents == [] and plan.pending_text == []  # the same run: nothing left to do


def test_buckets_and_a_single_shape_exclude_each_other(synthetic_data):
    from cogtune.errors import ConfigError

    with pytest.raises(ConfigError, match="buckets and frames/height/width exclude each other"):
        EncodeConfig(model="tiny", output_dir="c", data=DatasetConfig(root=str(synthetic_data)),
                     buckets=("9x64x64",), frames=17)
