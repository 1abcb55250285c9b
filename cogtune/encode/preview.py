"""See what trains: cached latents decoded back to video with the model's VAE.

For each bucket of a cache, the first `count` items are decoded (the posterior's mean, which is
what training samples around) and written as mp4, with a PNG contact sheet per bucket: one row
per item, its frames spread evenly over the columns. What shows is the crop, the bucket's size
and the frames sampled from each clip, exactly as the cache holds them::

    preview/49x480x720/000003.mp4     item 3 of the cache
    preview/49x480x720.png            the bucket's contact sheet

The VAE is the model the cache records (its preset, Hub id or folder; a random-weights cache
decodes with the same seeded random VAE); `model` names another copy of it, e.g. a folder the
weights were moved to, and must be compatible with the cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cogtune import report
from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import DataError

PREVIEW_FOLDER = "preview"
SHEET_COLUMNS = 8


@dataclasses.dataclass(frozen=True)
class BucketPreview:
    bucket: str
    videos: list[Path]
    sheet: Path


def preview_model(cache: VideoLatentCache, model: str | None = None):
    """The `ResolvedModel` whose VAE decodes `cache`: `model`, or the one the cache records."""
    from cogtune.models.loading import resolve_model

    if model is not None:
        resolved = resolve_model(model)
    else:
        recorded = cache.manifest.get("model") or {}
        source = recorded.get("source")
        # A local folder is recorded as given and as resolved: the resolved path survives a change of directory.
        reference = recorded.get("location") if source == "local" else recorded.get("reference")
        if not reference:
            raise DataError(f"cache {cache.root} does not record the model it was made with",
                            hint="name it with --model")
        resolved = resolve_model(str(reference), random_weights=source == "random",
                                 revision=recorded.get("revision"))
    cache.check_compatible(resolved.spec)
    return resolved


def sheet_columns(frames: int) -> list[int]:
    """The frame indices a contact sheet shows: all of them, or SHEET_COLUMNS spread from first to last."""
    if frames <= SHEET_COLUMNS:
        return list(range(frames))
    return [round(i * (frames - 1) / (SHEET_COLUMNS - 1)) for i in range(SHEET_COLUMNS)]


def contact_sheet(videos: list[Any], path: Path) -> Path:
    """A PNG grid: one row per video (F, H, W, 3) uint8, the `sheet_columns` frames across."""
    from cogtune.fsutil import atomic_path

    rows = [np.concatenate([video[i] for i in sheet_columns(len(video))], axis=1) for video in videos]
    grid = np.concatenate(rows, axis=0)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def decode_latent_dist(vae: Any, latent_dist: Any) -> Any:
    """(2C, F', H', W') posterior parameters -> (F, H, W, 3) uint8 frames of the posterior's mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = latent_dist[None].to(device=vae.device, dtype=vae.dtype)
    latents = DiagonalGaussianDistribution(parameters).mode()
    with torch.no_grad():
        frames = vae.decode(latents).sample[0]  # (3, F, H, W) in [-1, 1]
    frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def preview_cache(cache_dir: str | Path, count: int = 2, output: str | Path | None = None,
                  model: str | None = None, device: Any = None) -> list[BucketPreview]:
    """Decode the first `count` items of each bucket of the cache at `cache_dir` to mp4 and a contact sheet."""
    from cogtune.data.video import write_video
    from cogtune.models.loading import default_device, load_vae, torch_dtype

    if count < 1:
        raise DataError(f"preview count must be >= 1, got {count}")
    cache = VideoLatentCache(cache_dir)
    resolved = preview_model(cache, model)
    spec = resolved.spec
    if resolved.source == "random":
        report.warn("the cache was made with random weights: its previews decode with the same random VAE, "
                    "so they show shapes and frame counts, not pictures")
    out = Path(output) if output is not None else cache.root / PREVIEW_FOLDER
    device = device if device is not None else default_device()
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch_dtype(spec.weight_dtype)
    fps = cache.manifest.get("sample_fps") or spec.fps
    chosen = {bucket: [i for i, item in enumerate(cache.items) if item["bucket"] == bucket][:count]
              for bucket in cache.buckets}
    chosen = {bucket: indices for bucket, indices in chosen.items() if indices}
    with report.status(f"loading the VAE of {resolved.reference}"):
        vae = load_vae(resolved, dtype=dtype, device=device).eval()
    if (cache.manifest.get("vae") or {}).get("tiling"):
        vae.enable_tiling()  # the cache was encoded in tiles to save memory: decode the same way
    results = []
    with report.progress("decoding previews", total=sum(len(v) for v in chosen.values()), unit="clip") as bar:
        for bucket, indices in chosen.items():
            videos, paths = [], []
            for index in indices:
                latent_dist = cache.load_item(index)["latent_dist"]
                video = decode_latent_dist(vae, latent_dist)
                paths.append(write_video(out / bucket / f"{cache.items[index]['index']:06d}.mp4", video, fps=fps))
                videos.append(video)
                bar.advance()
            results.append(BucketPreview(bucket, paths, contact_sheet(videos, out / f"{bucket}.png")))
    report.table("previews", ["bucket", "clips", "contact sheet"],
                 [(p.bucket, len(p.videos), str(p.sheet)) for p in results], to_stderr=True, numeric=False)
    report.success(f"{report.plural(sum(len(p.videos) for p in results), 'preview')} in {out}")
    return results
