"""`cogtune encode`: turn a dataset into a latent cache, resumably.

Order of work: resolve the model and buckets (configs only), validate the dataset, plan which
files are missing or stale, then run the text encoder over the pending captions (and free it),
then the VAE over the pending clips, with decoding in worker processes overlapping encoding.
The manifest is written last; until it exists the cache is visibly incomplete.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

from cogtune import __version__, report
from cogtune.config import write_config
from cogtune.data.clips import Bucket, choose_bucket, load_clip, load_image, sampleable_frames
from cogtune.data.dataset import DatasetConfig, Entry
from cogtune.data.validate import ValidationReport, validate_dataset
from cogtune.encode.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    EMPTY_PROMPT_FILE,
    MANIFEST_NAME,
    VALIDATION_PROMPTS_FILE,
    compatibility,
    latent_file,
    read_metadata,
    stable_hash,
    text_file,
    write_safetensors,
)
from cogtune.encode.config import EncodeConfig
from cogtune.errors import DataError
from cogtune.fsutil import atomic_write_text, sweep_temporaries
from cogtune.models.loading import ResolvedModel, default_device, resolve_model


@dataclasses.dataclass(frozen=True)
class PlannedItem:
    index: int
    entry: Entry
    bucket: Bucket
    caption: str
    latent_key: str
    text_key: str


@dataclasses.dataclass
class EncodePlan:
    model: ResolvedModel
    buckets: list[Bucket]
    items: list[PlannedItem]
    pending_latents: list[PlannedItem]
    pending_text: list[PlannedItem]
    i2v: bool
    validation: ValidationReport
    target_fps: float

    def estimated_bytes(self) -> int:
        """Disk the whole cache takes (latents in the VAE dtype, text embeddings in the weight dtype)."""
        spec = self.model.spec
        bytes_per_value = 4 if spec.weight_dtype == "float32" else 2
        total = 0
        for item in self.items:
            frames = spec.latent_frames(item.bucket.frames)
            h = item.bucket.height // spec.spatial_compression
            w = item.bucket.width // spec.spatial_compression
            latent = 2 * spec.latent_channels * frames * h * w
            if self.i2v:
                latent += 2 * spec.latent_channels * h * w
            total += (latent + spec.max_text_tokens * spec.text_embed_dim) * bytes_per_value
        return total


def default_buckets(config: EncodeConfig, model: ResolvedModel, frames: int | None, height: int | None,
                    width: int | None) -> list[Bucket]:
    if config.buckets:
        return sorted({Bucket.parse(b) for b in config.buckets})
    spec = model.spec
    return [Bucket(frames or spec.default_frames, height or spec.default_height, width or spec.default_width)]


def plan_encode(config: EncodeConfig, frames: int | None = None, height: int | None = None,
                width: int | None = None) -> EncodePlan:
    """Resolve, validate and work out what is left to do; loads no weights."""
    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    buckets = default_buckets(config, model, frames, height, width)
    for bucket in buckets:
        spec.check_clip_shape(bucket.frames, bucket.height, bucket.width)
    i2v = spec.is_i2v if config.i2v is None else config.i2v

    validation = validate_dataset(config.data, frames=min(b.frames for b in buckets), model=spec)
    entries = _entries_to_encode(validation, config)
    target_fps = config.data.sample_fps or spec.fps

    root = Path(config.output_dir)
    compat = compatibility(spec)
    items: list[PlannedItem] = []
    for entry in entries:
        info = validation.video_info[entry.index]
        bucket = choose_bucket(info, buckets, sampleable_frames(info, config.data.frame_sampling, target_fps))
        if bucket is None:  # validation guarantees the smallest bucket fits; kept as a guard
            raise DataError(f"{entry.source}:{entry.line}: '{entry.video_ref}' fits no bucket")
        stat = entry.video.stat()
        image_stat = entry.image.stat() if entry.image is not None else None
        caption = entry.caption_with(config.data.id_token)
        latent_key = stable_hash({
            "video": str(entry.video), "size": stat.st_size, "mtime": stat.st_mtime_ns, "bucket": str(bucket),
            "resize": config.data.resize_mode, "sampling": config.data.frame_sampling, "fps": target_fps,
            "i2v": i2v, "compat": compat, "model": model.location,
            "image": [str(entry.image), image_stat.st_size, image_stat.st_mtime_ns] if image_stat else None,
        })
        text_key = stable_hash({"caption": caption, "compat": compat, "model": model.location})
        items.append(PlannedItem(entry.index, entry, bucket, caption, latent_key, text_key))

    def pending(files: str, key_name: str) -> list[PlannedItem]:
        todo = []
        for item in items:
            path = root / (latent_file(item.index) if files == "latents" else text_file(item.index))
            meta = None if config.overwrite else read_metadata(path)
            if meta is None or meta.get("key") != getattr(item, key_name):
                todo.append(item)
        return todo

    return EncodePlan(model, buckets, items, pending("latents", "latent_key"), pending("text", "text_key"), i2v,
                      validation, target_fps)


# Errors that make the whole listing untrustworthy: skipping entries cannot fix them.
_STRUCTURAL = {"count-mismatch", "columns-swapped", "frame-rule", "resolution-rule", "missing-root", "no-dataset",
               "missing-caption-file", "missing-video-file", "missing-image-file", "missing-dataset-file",
               "bad-dataset-file", "missing-column", "bad-encoding", "empty-dataset"}


def _entries_to_encode(validation: ValidationReport, config: EncodeConfig) -> list[Entry]:
    """All entries, or with `skip_invalid` those without errors; structural errors always stop."""
    errors = validation.errors
    if errors and (not config.skip_invalid or any(p.code in _STRUCTURAL for p in errors)):
        blocking = next((p for p in errors if p.code in _STRUCTURAL), errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        hint = f"see them all with `cogtune dataset validate {config.data.root}`"
        if blocking.code not in _STRUCTURAL:
            hint += "; --skip-invalid encodes the entries without errors"
        raise DataError(f"dataset has errors: {blocking.located()}{more}", hint=hint)
    entries = validation.usable_entries()
    if errors:
        report.warn(f"skipping {len(validation.entries) - len(entries)} entries with errors (--skip-invalid); "
                    f"first: {errors[0].located()}")
    if not entries:
        raise DataError("no usable entries left to encode")
    return entries


def print_plan(plan: EncodePlan) -> None:
    counts: dict[str, int] = defaultdict(int)
    for item in plan.items:
        counts[str(item.bucket)] += 1
    rows = [
        ("model", f"{plan.model.reference} ({plan.model.spec.family})"),
        ("items", len(plan.items)),
        ("buckets", ", ".join(f"{b} ({counts.get(str(b), 0)})" for b in plan.buckets)),
        ("clips to encode", len(plan.pending_latents)),
        ("captions to encode", len(plan.pending_text)),
        ("image latents (I2V)", "yes" if plan.i2v else "no"),
        ("cache size", _human_bytes(plan.estimated_bytes())),
    ]
    report.key_values("encode plan", rows, to_stderr=True)


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class _ClipDataset:
    """Decodes the clips of planned items; runs in DataLoader workers."""

    def __init__(self, items: list[PlannedItem], data: DatasetConfig, target_fps: float, i2v: bool,
                 infos: dict[int, Any]):
        self.items = items
        self.data = data
        self.target_fps = target_fps
        self.i2v = i2v
        self.infos = infos

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        pixels = load_clip(item.entry.video, item.bucket, self.data.resize_mode, self.infos.get(item.entry.index),
                           self.data.frame_sampling, self.target_fps)
        sample: dict[str, Any] = {"position": position, "pixels": pixels}
        if self.i2v:
            if item.entry.image is not None:
                sample["image"] = load_image(item.entry.image, item.bucket.height, item.bucket.width,
                                             self.data.resize_mode)
            else:
                sample["image"] = pixels[0]
        return sample


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    batch: dict[str, Any] = {"positions": [s["position"] for s in samples]}
    batch["pixels"] = torch.stack([s["pixels"] for s in samples])
    if "image" in samples[0]:
        batch["image"] = torch.stack([s["image"] for s in samples])
    return batch


def _bucket_batches(items: list[PlannedItem], batch_size: int) -> list[list[int]]:
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_bucket[item.bucket].append(position)
    batches = []
    for bucket in sorted(by_bucket):
        positions = by_bucket[bucket]
        batches += [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    return batches


def encode_dataset(config: EncodeConfig, frames: int | None = None, height: int | None = None,
                   width: int | None = None, dry_run: bool = False) -> EncodePlan:
    """Encode (or finish encoding) a dataset into the cache at `config.output_dir`."""
    plan = plan_encode(config, frames, height, width)
    print_plan(plan)
    if dry_run:
        return plan
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(root)
    for sub in ("latents", "text"):
        sweep_temporaries(root / sub)
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # the cache is incomplete until the end
    write_config(config, root)

    import torch

    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    device = torch.device(default_device())
    _encode_text(plan, config, root, device)
    _encode_latents(plan, config, root, device)
    _write_manifest(plan, config, root)
    report.success(f"cache ready: {root} ({len(plan.items)} items)")
    return plan


def _encode_text(plan: EncodePlan, config: EncodeConfig, root: Path, device: Any) -> None:
    import torch

    from cogtune.models.loading import load_text_encoder, load_tokenizer
    from cogtune.models.text import encode_prompts

    spec = plan.model.spec
    validation_key = stable_hash({"prompts": list(config.validation_prompts), "compat": compatibility(spec),
                                  "model": plan.model.location})
    empty_key = stable_hash({"prompt": "", "compat": compatibility(spec), "model": plan.model.location})
    need_empty = (read_metadata(root / EMPTY_PROMPT_FILE) or {}).get("key") != empty_key or config.overwrite
    need_validation = bool(config.validation_prompts) and (
        (read_metadata(root / VALIDATION_PROMPTS_FILE) or {}).get("key") != validation_key or config.overwrite)
    if not plan.pending_text and not need_empty and not need_validation:
        return
    tokenizer = load_tokenizer(plan.model)
    dtype = _encode_dtype(plan.model, device)
    text_encoder = load_text_encoder(plan.model, dtype=dtype, device=device).eval()
    max_tokens = spec.max_text_tokens
    batch = 8
    with report.progress("encoding captions", total=len(plan.pending_text), unit="captions") as bar:
        for start in range(0, len(plan.pending_text), batch):
            chunk = plan.pending_text[start : start + batch]
            embeds, counts = encode_prompts(tokenizer, text_encoder, [i.caption for i in chunk], max_tokens, device)
            for item, embed, count in zip(chunk, embeds, counts):
                write_safetensors(root / text_file(item.index), {"prompt_embeds": embed},
                                  {"key": item.text_key, "caption": item.caption, "num_tokens": count})
            bar.advance(len(chunk))
    if need_empty:
        embeds, counts = encode_prompts(tokenizer, text_encoder, [""], max_tokens, device)
        write_safetensors(root / EMPTY_PROMPT_FILE, {"prompt_embeds": embeds[0]}, {"key": empty_key, "num_tokens": counts[0]})
    if need_validation:
        embeds, counts = encode_prompts(tokenizer, text_encoder, list(config.validation_prompts), max_tokens, device)
        write_safetensors(root / VALIDATION_PROMPTS_FILE, {"prompt_embeds": embeds},
                          {"key": validation_key, "prompts": list(config.validation_prompts), "num_tokens": counts})
    del text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _encode_dtype(model: ResolvedModel, device: Any):
    import torch

    from cogtune.models.loading import torch_dtype

    if device.type == "cpu":
        return torch.float32  # half-precision convolutions are slow or missing on CPUs
    return torch_dtype(model.spec.weight_dtype)


def _encode_latents(plan: EncodePlan, config: EncodeConfig, root: Path, device: Any) -> None:
    import torch
    from torch.utils.data import DataLoader

    from cogtune.models.loading import load_vae

    if not plan.pending_latents:
        return
    dtype = _encode_dtype(plan.model, device)
    vae = load_vae(plan.model, dtype=dtype, device=device).eval()
    if config.vae_slicing:
        vae.enable_slicing()
    if config.vae_tiling:
        vae.enable_tiling()
    items = plan.pending_latents
    dataset = _ClipDataset(items, config.data, plan.target_fps, plan.i2v, plan.validation.video_info)
    loader = DataLoader(
        dataset,
        batch_sampler=_bucket_batches(items, config.batch_size),
        num_workers=min(config.num_workers, len(items)),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    with report.progress("encoding clips", total=len(items), unit="clips") as bar, torch.no_grad():
        for batch in loader:
            pixels = batch["pixels"].to(device=device, dtype=dtype).permute(0, 2, 1, 3, 4)  # B, C, F, H, W
            moments = vae.encode(pixels).latent_dist.parameters
            image_moments = None
            if "image" in batch:
                image = batch["image"].to(device=device, dtype=dtype).unsqueeze(2)  # B, C, 1, H, W
                image_moments = vae.encode(image).latent_dist.parameters
            for row, position in enumerate(batch["positions"]):
                item = items[position]
                tensors = {"latent_dist": moments[row]}
                if image_moments is not None:
                    tensors["image_latent_dist"] = image_moments[row]
                write_safetensors(root / latent_file(item.index), tensors,
                                  {"key": item.latent_key, "bucket": str(item.bucket), "video": item.entry.video_ref})
            bar.advance(len(batch["positions"]))
    del vae


def _dataset_fingerprint(plan: EncodePlan) -> str:
    return stable_hash([[item.entry.video_ref, item.caption, item.latent_key] for item in plan.items])


def _library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"cogtune": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _write_manifest(plan: EncodePlan, config: EncodeConfig, root: Path) -> None:
    import json

    spec = plan.model.spec
    items = []
    for item in plan.items:
        text_meta = read_metadata(root / text_file(item.index)) or {}
        if read_metadata(root / latent_file(item.index)) is None or not text_meta:
            raise DataError(f"cache item {item.index} was not written; re-run `cogtune encode`")
        items.append({
            "index": item.index,
            "latent_file": latent_file(item.index),
            "text_file": text_file(item.index),
            "bucket": str(item.bucket),
            "caption": item.caption,
            "video": item.entry.video_ref,
            "source": item.entry.source,
            "line": item.entry.line,
            "num_tokens": int(text_meta.get("num_tokens", 0)),
        })
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_VERSION,
        "complete": True,
        "created_by": _library_versions(),
        "model": plan.model.describe(),
        "compatibility": compatibility(spec),
        "vae": {
            "scaling_factor": spec.scaling_factor,
            "invert_scale_latents": spec.invert_scale_latents,
            "latent_channels": spec.latent_channels,
            "spatial_compression": spec.spatial_compression,
            "temporal_compression": spec.temporal_compression,
            "stored": "unscaled posterior parameters (mean, logvar) on the channel axis",
        },
        "text": {"max_tokens": spec.max_text_tokens, "embed_dim": spec.text_embed_dim},
        "buckets": [str(b) for b in plan.buckets],
        "resize_mode": config.data.resize_mode,
        "frame_sampling": config.data.frame_sampling,
        "sample_fps": plan.target_fps if config.data.frame_sampling == "fps" else None,
        "frame_rule": spec.frame_rule,
        "id_token": config.data.id_token,
        "i2v": plan.i2v,
        "dataset": {"root": str(Path(config.data.root).resolve()), "fingerprint": _dataset_fingerprint(plan),
                    "items": len(plan.items)},
        "empty_prompt_file": EMPTY_PROMPT_FILE,
        "validation_prompts": list(config.validation_prompts),
        "items": items,
    }
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
