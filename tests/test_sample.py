"""`cogtune sample`: shape, seeds, LoRA scale, full fine-tunes, I2V, prompt files, previews, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import pytest

from cogtune.data.video import probe_video, read_all_frames
from cogtune.errors import ConfigError, DataError, ModelError
from cogtune.sample import SampleConfig, run_sample

PROMPT = "A red circle moves left."


def _config(tmp_path, name, **kwargs):
    return SampleConfig(model=kwargs.pop("model", "tiny"), prompts=kwargs.pop("prompts", (PROMPT,)),
                        output=str(tmp_path / name), steps=3, frames=9, height=64, width=64, **kwargs)


def _sample(tmp_path, name, **kwargs):
    (path,) = run_sample(_config(tmp_path, name, **kwargs))
    return path


def _frames(path):
    return read_all_frames(path).astype(int)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cache):
    """A LoRA and a full fine-tune of `tiny`, trained hard enough to change the output visibly."""
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import LoraConfig, OptimizerConfig, ValidationConfig

    root = tmp_path_factory.mktemp("trained")
    common = dict(model="tiny", data=str(tiny_cache), steps=15, optimizer=OptimizerConfig(lr=2e-2),
                  validation=ValidationConfig(final=False))
    lora = run_training(TrainConfig(output_dir=str(root / "lora"), lora=LoraConfig(rank=8), **common))
    full = run_training(TrainConfig(output_dir=str(root / "full"), full=True, **common))
    return lora.output_dir, full.output_dir


def test_sample_has_the_asked_shape(tmp_path):
    path = _sample(tmp_path, "a.mp4")
    info = probe_video(path)
    assert (info.frames, info.height, info.width, info.fps) == (9, 64, 64, 8.0)
    assert (tmp_path / "a.config.toml").is_file()


def test_same_seed_same_video_other_seed_other_video(tmp_path):
    a = _frames(_sample(tmp_path, "a.mp4", seed=1))
    b = _frames(_sample(tmp_path, "b.mp4", seed=1))
    c = _frames(_sample(tmp_path, "c.mp4", seed=2))
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1


def test_lora_scale_zero_is_the_base_model_and_the_lora_changes_it(tmp_path, trained):
    lora, _ = trained
    base = _frames(_sample(tmp_path, "base.mp4"))
    off = _frames(_sample(tmp_path, "off.mp4", lora=str(lora), lora_scale=0.0))
    on = _frames(_sample(tmp_path, "on.mp4", lora=str(lora)))
    assert np.array_equal(base, off)
    assert np.abs(base - on).mean() > 1


def test_full_fine_tune_via_transformer_folder(tmp_path, trained):
    _, full = trained
    base = _frames(_sample(tmp_path, "base.mp4"))
    tuned = _frames(_sample(tmp_path, "tuned.mp4", transformer=str(full)))
    assert np.abs(base - tuned).mean() > 1
    with pytest.raises(ModelError, match="does not fit tiny-rotary"):
        run_sample(_config(tmp_path, "x.mp4", model="tiny-rotary", transformer=str(full)))


def test_image_to_video(tmp_path):
    from PIL import Image

    Image.new("RGB", (80, 48), (30, 200, 30)).save(tmp_path / "green.png")
    path = _sample(tmp_path, "i2v.mp4", model="tiny-i2v", images=(str(tmp_path / "green.png"),))
    assert probe_video(path).frames == 9
    with pytest.raises(ConfigError, match="image-to-video model: pass --image"):
        run_sample(_config(tmp_path, "no-image.mp4", model="tiny-i2v"))
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot read image"):
        run_sample(_config(tmp_path, "bad.mp4", model="tiny-i2v", images=(str(tmp_path / "broken.png"),)))
    with pytest.raises(ConfigError, match="text-to-video model: --image"):
        run_sample(_config(tmp_path, "t2v.mp4", images=(str(tmp_path / "green.png"),)))


def test_prompts_file_writes_one_video_each(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffA red circle.\r\n\r\nA blue square.\r\nA green ball.\r\n")
    paths = run_sample(dataclasses.replace(_config(tmp_path, "out"), prompts=(), prompts_file=str(prompts)))
    assert [p.name for p in paths] == ["sample_000.mp4", "sample_001.mp4", "sample_002.mp4"]
    assert (tmp_path / "out" / "config.toml").is_file()
    with pytest.raises(ConfigError, match="need an output folder"):
        run_sample(dataclasses.replace(_config(tmp_path, "x.mp4"), prompts=(), prompts_file=str(prompts)))


def test_previews(tmp_path):
    from PIL import Image

    path = _sample(tmp_path, "p.mp4", preview="both")
    with Image.open(path.with_suffix(".gif")) as gif:
        assert gif.n_frames == 9 and gif.size == (64, 64)
    with Image.open(path.with_suffix(".png")) as sheet:
        assert sheet.size == (64 * 8, 64)


def test_dpm_scheduler_and_dynamic_cfg(tmp_path):
    path = _sample(tmp_path, "dpm.mp4", scheduler="dpm", dynamic_cfg=True)
    assert probe_video(path).frames == 9


def test_refuses_to_overwrite(tmp_path):
    _sample(tmp_path, "a.mp4")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        _sample(tmp_path, "a.mp4")
    _sample(tmp_path, "a.mp4", overwrite=True)


def test_checks_happen_before_loading(tmp_path):
    with pytest.raises(ModelError, match="frame rule"):
        run_sample(SampleConfig(model="tiny", prompts=("x",), output=str(tmp_path / "x.mp4"), frames=10))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        run_sample(_config(tmp_path, "x.mp4", offload="model"))
    with pytest.raises(DataError, match="LoRA weights not found"):
        run_sample(_config(tmp_path, "x.mp4", lora=str(tmp_path / "nope")))


def test_cli_errors_are_one_line(cli, tmp_path):
    result = cli("sample", "--model", "tiny-i2v", "--prompt", PROMPT, "--output", tmp_path / "x.mp4")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: tiny-i2v is an image-to-video model: pass --image"]


@pytest.mark.gpu
def test_memory_options_on_a_gpu(tmp_path):
    path = _sample(tmp_path, "gpu.mp4", base_weights="fp8", offload="model", vae_tiling=True, vae_slicing=True)
    assert probe_video(path).frames == 9


@pytest.mark.parametrize("tile", [(48, 40), (96, 80)])
def test_an_i2v_video_in_validation_tiles_has_the_asked_size(condition_image_64x128, tile):
    """The path validation and `sample` share (`generate_videos`), in tiles validation may use (heights in 48s,
    widths in 40s): the condition image's latents join the video's, and the video has the asked size."""
    from cogtune.generate import generate_videos, load_condition_image
    from cogtune.models.loading import build_pipeline, resolve_model
    from cogtune.train.config import MemoryConfig

    assert MemoryConfig(validation_vae_tile=f"{tile[0]}x{tile[1]}").validation_tile_size == tile
    model = resolve_model("tiny-1.5-i2v")
    pipe = build_pipeline(model)
    pipe.vae.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])
    embeds = torch.zeros(1, model.spec.max_text_tokens, model.spec.text_embed_dim)
    (video,) = generate_videos(pipe, model.spec, prompt_embeds=embeds, negative_prompt_embeds=embeds, frames=9,
                               height=64, width=128, steps=1, guidance=6.0, seed=0,
                               images=[load_condition_image(condition_image_64x128)])
    assert video.shape == (9, 64, 128, 3)


def test_diffusers_tiles_that_do_not_meet_change_the_size_so_they_are_refused():
    """diffusers' own tiled decode and encode, in 64x64 tiles (not a height in 48s nor a width in 40s): a 64x128
    video decodes 70x136 and encodes 17 latents wide, not 16 (an I2V pipeline then fails to join its image)."""
    from diffusers import AutoencoderKLCogVideoX

    from cogtune.models.tiny import ensure_tiny_model
    from cogtune.train.config import MemoryConfig

    with pytest.raises(ConfigError, match="H a multiple of 48 and W of 40"):
        MemoryConfig(validation_vae_tile="64x64")
    vae = AutoencoderKLCogVideoX.from_pretrained(ensure_tiny_model("tiny-1.5-i2v") / "vae")
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64)
    with torch.no_grad():
        decoded = vae.decode(torch.zeros(1, 4, 1, 8, 16)).sample
        encoded = vae.encode(torch.zeros(1, 3, 1, 64, 128)).latent_dist.mean
    assert decoded.shape[-2:] != (64, 128) and encoded.shape[-1] != 16


@pytest.fixture
def condition_image_64x128(tmp_path):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (128, 64), (200, 40, 40)).save(path)
    return path
