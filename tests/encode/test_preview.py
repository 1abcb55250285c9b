"""Previews: cached latents decoded back to mp4 and a PNG contact sheet per bucket.

The tiny model's VAE has random weights, so a preview does not look like its source clip; the
tests check what a preview must be instead: files imageio and PIL open, with the bucket's frame
count and size, and frames equal (up to H.264) to what diffusers' own decode path makes of the
cached posterior (`DiagonalGaussianDistribution.mode`, `vae.decode`, `VideoProcessor`).
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image

from cogtune.encode.cache import VideoLatentCache
from cogtune.encode.preview import preview_cache


def test_preview_writes_decodable_mp4s_and_contact_sheets(tiny_cache, tmp_path):
    results = preview_cache(tiny_cache, count=2, output=tmp_path / "preview", device="cpu")
    assert [r.bucket for r in results] == ["9x64x64"]
    videos = sorted((tmp_path / "preview" / "9x64x64").glob("*.mp4"))
    assert [v.name for v in videos] == ["000000.mp4", "000001.mp4"]
    for video in videos:
        assert iio.imread(video).shape == (9, 64, 64, 3)  # the bucket's frames x height x width
    with Image.open(tmp_path / "preview" / "9x64x64.png") as sheet:
        # 2 items in rows; 9 frames > 8 columns, so 8 frames spread from the first to the last.
        assert sheet.format == "PNG" and sheet.size == (8 * 64, 2 * 64)


def test_preview_matches_diffusers_decode_of_the_cached_posterior(tiny_cache, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLCogVideoX
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.video_processor import VideoProcessor

    import cogtune.data.video
    from cogtune.models.tiny import ensure_tiny_model
    from tests.rounding import UNIT_ROUNDOFF

    encoded = []  # the 8-bit frames handed to the H.264 encoder
    write_video = cogtune.data.video.write_video
    monkeypatch.setattr(cogtune.data.video, "write_video", lambda path, frames, fps: (
        encoded.append(np.asarray(frames)), write_video(path, frames, fps))[1])
    preview_cache(tiny_cache, count=1, output=tmp_path / "preview", device="cpu")
    vae = AutoencoderKLCogVideoX.from_pretrained(ensure_tiny_model("tiny") / "vae", torch_dtype=torch.float32)
    latent_dist = VideoLatentCache(tiny_cache).load_item(0)["latent_dist"]
    with torch.no_grad():
        decoded = vae.decode(DiagonalGaussianDistribution(latent_dist[None].float()).mode()).sample
    expected = VideoProcessor(vae_scale_factor=8).postprocess_video(video=decoded, output_type="np")[0] * 255
    written = iio.imread(tmp_path / "preview" / "9x64x64" / "000000.mp4").astype(np.float32)
    assert written.shape == expected.shape
    assert np.abs(written - expected).mean() < 8  # H.264 at high quality; a wrong scale or frame order is far off
    first = np.asarray(Image.open(tmp_path / "preview" / "9x64x64.png").convert("RGB"), np.float32)[:64, :64]
    assert np.abs(first - expected[0]).mean() < 1  # the sheet holds the decoded frames themselves (PNG: lossless)
    # Before H.264: the same VAE decode of the same latents, then rounded to 8 bits (half a level), after
    # cogtune's (x + 1) * 127.5 and diffusers' (x / 2 + 0.5) * 255 round differently (a few ulps of 255).
    (frames,) = encoded
    assert frames.dtype == np.uint8 and frames.shape == expected.shape
    assert np.abs(frames - expected).max() <= 0.5 + 8 * 255 * UNIT_ROUNDOFF
    assert np.array_equal(first, frames[0])  # PNG is lossless: the sheet's first cell is the first frame


def test_dataset_preview_command(cli, tiny_cache, tmp_path):
    result = cli("dataset", "preview", tiny_cache, "--count", "1", "--output", tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    assert iio.imread(tmp_path / "p" / "9x64x64" / "000000.mp4").shape == (9, 64, 64, 3)
    with Image.open(tmp_path / "p" / "9x64x64.png") as sheet:
        assert sheet.size == (8 * 64, 64)


def test_dataset_preview_errors_are_one_line(cli, tiny_cache, tmp_path):
    result = cli("dataset", "preview", tmp_path)
    assert result.exit_code == 1 and "not a cogtune cache" in result.stderr and "Traceback" not in result.stderr
    result = cli("dataset", "preview", tiny_cache, "--model", "tiny-1.5")
    assert result.exit_code == 1 and "incompatible" in result.stderr and "Traceback" not in result.stderr
    assert not (tiny_cache / "preview").exists()


def test_encode_preview_option(cli, tmp_path):
    from cogtune.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", count=1, frames=9, height=64, width=64)
    result = cli("encode", "--model", "tiny", "--data-root", data, "--output-dir", tmp_path / "cache",
                 "--buckets", "9x64x64", "--num-workers", "0", "--preview", "1")
    assert result.exit_code == 0, result.stderr
    assert iio.imread(tmp_path / "cache" / "preview" / "9x64x64" / "000000.mp4").shape == (9, 64, 64, 3)
    with Image.open(tmp_path / "cache" / "preview" / "9x64x64.png") as sheet:
        assert sheet.size == (8 * 64, 64)
