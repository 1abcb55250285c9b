"""`cogtune encode`: turn a dataset into a latent cache, resumably.

Order of work: resolve the model and buckets (configs only), validate the dataset, plan which
files are missing or stale, then run the text encoder over the pending captions (and free it),
then the VAE over the pending clips, with decoding in worker processes overlapping encoding.
The manifest is written last; until it exists the cache is visibly incomplete.

I2V: CogVideoX trains with pixel-space noise on the condition image (sigma drawn per step from
exp(N(-3, 0.5))) and sometimes drops the image. The noise must be added before the VAE, which
training does not load, so the cache stores, besides the clean condition latent, the posteriors
of `image_noise_samples` noisy copies (each with its own sigma); every training step samples one
copy and a latent from its posterior, and applies the image dropout itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from cogtune import __version__, report
from cogtune.config import write_config
from cogtune.data.clips import Bucket, choose_bucket, clip_windows, load_clip, load_image, sampleable_frames
from cogtune.data.dataset import DatasetConfig, Entry, read_entries
from cogtune.data.dataset_config import DatasetSource, load_dataset_sources
from cogtune.data.validate import ValidationReport, validate_dataset
from cogtune.data.video import VideoInfo
from cogtune.encode.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    EMPTY_PROMPT_FILE,
    INTEGRITY_KEY,
    MANIFEST_NAME,
    VALIDATION_PROMPTS_FILE,
    compatibility,
    file_record,
    finished_file_problem,
    latent_file,
    read_metadata,
    stable_hash,
    text_file,
    write_safetensors,
)
from cogtune.encode.config import EncodeConfig
from cogtune.errors import ConfigError, DataError
from cogtune.fsutil import OutputLock, atomic_write_text, sweep_temporaries
from cogtune.launch import is_main_launch_process
from cogtune.interrupt import StopRequest, leave_stopping_to_the_parent, rerun_command
from cogtune.models.loading import ResolvedModel, resolve_model


@dataclasses.dataclass(frozen=True)
class PlannedItem:
    index: int
    entry: Entry
    bucket: Bucket
    caption: str
    latent_key: str
    text_key: str
    info: VideoInfo | None = None
    data: DatasetConfig | None = None  # the options it is read with (its dataset's)
    frames: tuple[int, ...] | None = None  # the source frames it is made of
    source: DatasetSource | None = None  # its [[datasets]] table, with --dataset-config

    @property
    def frame_range(self) -> list[int] | None:
        """[first, last + 1) source frames of a window (head, chunk, slide); None for other items."""
        if self.frames is None or self.data is None or self.data.frame_extraction == "uniform":
            return None
        return [self.frames[0], self.frames[-1] + 1]


@dataclasses.dataclass
class EncodePlan:
    model: ResolvedModel
    buckets: list[Bucket]
    items: list[PlannedItem]
    pending_latents: list[PlannedItem]
    pending_text: list[PlannedItem]
    i2v: bool
    validations: list[ValidationReport]
    target_fps: float
    image_noise_samples: int = 0
    sources: list[DatasetSource] = dataclasses.field(default_factory=list)  # with --dataset-config

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
                latent += 2 * spec.latent_channels * h * w * (1 + self.image_noise_samples)
            total += (latent + spec.max_text_tokens * spec.text_embed_dim) * bytes_per_value
        return total


def default_buckets(config: EncodeConfig, model: ResolvedModel) -> list[Bucket]:
    """The config's buckets, or one of its frames x height x width (each defaulting to the model's)."""
    if config.buckets:
        return sorted({Bucket.parse(b) for b in config.buckets})
    spec = model.spec
    return [Bucket(config.frames or spec.default_frames, config.height or spec.default_height,
                   config.width or spec.default_width)]


def source_buckets(source: DatasetSource, run_buckets: list[Bucket]) -> list[Bucket]:
    """A dataset's buckets: its own, else the run's; a dataset of images takes their 1xHxW."""
    buckets = sorted({Bucket.parse(b) for b in source.buckets}) if source.buckets else list(run_buckets)
    if source.data.kind == "images":
        return sorted({Bucket(1, b.height, b.width) for b in buckets})
    if not any(b.frames == 1 for b in buckets):  # stills named in a listing take the 1-frame shapes
        buckets += sorted({Bucket(1, b.height, b.width) for b in buckets})
    return buckets


def plan_encode(config: EncodeConfig) -> EncodePlan:
    """Resolve, validate and work out what is left to do; loads no weights."""
    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    run_buckets = default_buckets(config, model)
    i2v = spec.is_i2v if config.i2v is None else config.i2v
    if config.dataset_config:
        sources = load_dataset_sources(config.dataset_config, config.data)
    else:
        sources = [DatasetSource(data=config.data)]
    bucket_sets = [source_buckets(source, run_buckets) for source in sources]
    spec.check_clip_shapes({f"bucket {b}": b.shape for buckets in bucket_sets for b in buckets})

    root = Path(config.output_dir)
    compat = compatibility(spec)
    items: list[PlannedItem] = []
    validations: list[ValidationReport] = []
    used_buckets: set[Bucket] = set()
    next_index = 0  # each entry keeps its numbers whether or not it is usable, so that a resume finds its files
    for source, buckets in zip(sources, bucket_sets):
        data = source.data
        video_frames = [b.frames for b in buckets if b.frames > 1]
        # A still is known from its name: refused before any file is read (with --skip-invalid, validation
        # reports each one as `still-image-i2v` and it is skipped like any entry with an error).
        still = next((e for e in read_entries(data)[0] if e.still), None) if i2v and not config.skip_invalid else None
        if still is not None:
            raise ConfigError(f"{source.origin or data.root}: '{still.video_ref}' is a still image, which "
                              "cannot train image-to-video: it would be its own condition image, leaving "
                              "nothing to generate", hint="train images with a text-to-video model")
        validation = validate_dataset(data, frames=min(video_frames) if video_frames else None, model=spec, i2v=i2v)
        validations.append(validation)
        usable = {entry.index for entry in _entries_to_encode(validation, config, source)}
        target_fps = data.sample_fps or spec.fps
        for entry in validation.entries:
            if entry.index not in usable:
                next_index += 1
                continue
            info = validation.video_info[entry.index]
            bucket = choose_bucket(info, buckets, sampleable_frames(info, data.frame_sampling, target_fps))
            if bucket is None:  # validation guarantees the smallest bucket fits; kept as a guard
                raise DataError(f"{entry.source}:{entry.line}: '{entry.video_ref}' fits no bucket")
            used_buckets.add(bucket)
            stat = entry.video.stat()
            image_stat = entry.image.stat() if entry.image is not None else None
            caption = entry.caption_with(data.id_token)
            windows = clip_windows(info, bucket.frames, data.frame_extraction, data.frame_sampling, target_fps,
                                   data.frame_stride)
            for frames in windows:
                latent_key = stable_hash({
                    "video": str(entry.video), "size": stat.st_size, "mtime": stat.st_mtime_ns, "bucket": str(bucket),
                    "resize": data.resize_mode, "sampling": data.frame_sampling, "fps": target_fps,
                    "i2v": i2v, "noised": config.image_noise_samples if i2v else 0, "compat": compat,
                    "model": model.location,
                    "image": [str(entry.image), image_stat.st_size, image_stat.st_mtime_ns] if image_stat else None,
                    # anamorphic clips are cropped as displayed, VFR clips sampled by timestamp: new keys for those only
                    **({"sar": info.sar} if info.sar != 1.0 else {}),
                    **({"timed": True} if info.timestamps and data.frame_sampling == "fps" else {}),
                    # a window's frames are part of what the item is (resume re-encodes a moved window)
                    **({"frames": list(frames)} if data.frame_extraction != "uniform" else {}),
                })
                text_key = stable_hash({"caption": caption, "compat": compat, "model": model.location})
                items.append(PlannedItem(next_index, entry, bucket, caption, latent_key, text_key, info, data,
                                         tuple(frames), source if config.dataset_config else None))
                next_index += 1
    # The manifest lists the buckets items took (plus, for one --data-root, the configured ones, as always).
    buckets = sorted(used_buckets if config.dataset_config else used_buckets | set(run_buckets))

    latents = _to_encode(items, [root / latent_file(item.index) for item in items],
                         [item.latent_key for item in items], config.overwrite)
    texts = _to_encode(items, [root / text_file(item.index) for item in items],
                       [item.text_key for item in items], config.overwrite)
    return EncodePlan(model, buckets, items, latents, texts, i2v,
                      validations, config.data.sample_fps or spec.fps, config.image_noise_samples if i2v else 0,
                      sources if config.dataset_config else [])


def _to_encode(items: list[PlannedItem], paths: list[Path], keys: list[str], overwrite: bool) -> list[PlannedItem]:
    """The items whose file is missing, of another key (other settings or data), or damaged.

    A re-run verifies the files it keeps (`finished_file_problem`): a damaged one is encoded again,
    with a warning naming it.
    """
    todo = []
    for item, path, key in zip(items, paths, keys):
        meta = None if overwrite else read_metadata(path)
        if meta is None or meta.get("key") != key:
            if meta is None and not overwrite and path.exists():
                report.warn(f"{path} cannot be read (damaged header): encoding it again")
            todo.append(item)
            continue
        problem = finished_file_problem(path)
        if problem:
            report.warn(f"{path} {problem}: encoding it again")
            todo.append(item)
    return todo


# Errors that make the whole listing untrustworthy: skipping entries cannot fix them.
_STRUCTURAL = {"count-mismatch", "columns-swapped", "frame-rule", "resolution-rule", "missing-root", "no-dataset",
               "missing-caption-file", "missing-video-file", "missing-image-file", "missing-dataset-file",
               "bad-dataset-file", "missing-column", "bad-encoding", "empty-dataset"}


def _entries_to_encode(validation: ValidationReport, config: EncodeConfig, source: DatasetSource) -> list[Entry]:
    """All entries, or with `skip_invalid` those without errors; structural errors always stop."""
    errors = validation.errors
    dataset = f"dataset '{source.name}'" if config.dataset_config else "dataset"
    if errors and (not config.skip_invalid or any(p.code in _STRUCTURAL for p in errors)):
        blocking = next((p for p in errors if p.code in _STRUCTURAL), errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        hint = f"see them all with `cogtune dataset validate {config.data.root}`"
        if config.dataset_config:
            hint = f"see them all with `cogtune dataset validate --dataset-config {config.dataset_config}`"
        if blocking.code not in _STRUCTURAL:
            hint += "; --skip-invalid encodes the entries without errors"
        raise DataError(f"{dataset} has errors: {blocking.located()}{more}", hint=hint)
    entries = validation.usable_entries()
    if errors:
        report.warn(f"skipping {len(validation.entries) - len(entries)} entries with errors (--skip-invalid); "
                    f"first: {errors[0].located()}")
    if not entries:
        raise DataError("no usable entries left to encode" + (f" in {dataset}" if config.dataset_config else ""))
    return entries


def print_plan(plan: EncodePlan) -> None:
    counts: dict[str, int] = defaultdict(int)
    for item in plan.items:
        counts[str(item.bucket)] += 1
    rows = [
        ("model", f"{plan.model.reference} ({plan.model.spec.family})"),
        ("items", len(plan.items)),
        *([("datasets", ", ".join(f"{s.name} ({sum(1 for i in plan.items if i.source is s)} items, repeats "
                                  f"{s.repeats})" for s in plan.sources))] if plan.sources else []),
        ("buckets", ", ".join(f"{b} ({counts.get(str(b), 0)})" for b in plan.buckets)),
        ("clips to encode", len(plan.pending_latents)),
        ("captions to encode", len(plan.pending_text)),
        ("image latents (I2V)", "yes" if plan.i2v else "no"),
        ("cache size", report.binary_size(plan.estimated_bytes())),
    ]
    report.key_values("encode plan", rows, to_stderr=True)


class _ClipDataset:
    """Decodes the clips of planned items; runs in DataLoader workers."""

    def __init__(self, items: list[PlannedItem], i2v: bool):
        self.items = items
        self.i2v = i2v

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        # A clip that fails here (cut short, damaged) comes back as a failure, not an exception: raised in a
        # DataLoader worker, it would reach the user as "Caught VideoReadError in DataLoader worker process 1",
        # without the file; the main process names it (with --skip-invalid, skips it).
        try:
            return self._load(position)
        except Exception as exc:  # anything a decoder or resize can raise
            return {"position": position, "error": _failure_reason(exc, self.items[position].entry)}

    def _load(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        assert item.data is not None
        pixels = load_clip(item.entry.video, item.bucket, mode=item.data.resize_mode, info=item.info,
                           indices=item.frames)
        sample: dict[str, Any] = {"position": position, "pixels": pixels}
        if self.i2v:
            if item.entry.image is not None:
                try:
                    sample["image"] = load_image(item.entry.image, item.bucket.height, item.bucket.width,
                                                 item.data.resize_mode)
                except OSError as exc:
                    raise DataError(f"condition image {item.entry.image_ref} cannot be read ({exc})") from exc
            else:
                sample["image"] = pixels[0]
        return sample


def _failure_reason(exc: Exception, entry: Entry) -> str:
    """One line for the user, without the path (the caller adds listing, line and path)."""
    from cogtune.errors import CogtuneError
    from cogtune.quiet import debug_enabled

    if isinstance(exc, CogtuneError):
        return exc.message.removeprefix(f"{entry.video}: ")
    detail = f" [{type(exc).__name__}: {' '.join(str(exc).split())[:200]}]" if debug_enabled() else ""
    return f"the clip cannot be decoded or resized{detail}"


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "error" not in s]
    batch: dict[str, Any] = {"positions": [s["position"] for s in good],
                             "failures": [(s["position"], s["error"]) for s in samples if "error" in s]}
    batch["pixels"] = torch.stack([s["pixels"] for s in good]) if good else None
    if good and "image" in good[0]:
        batch["image"] = torch.stack([s["image"] for s in good])
    return batch


def _skip_marker(root: Path, index: int) -> Path:
    """Left by `--skip-invalid` for a clip that failed while encoding, so the manifest leaves it out."""
    return root / "latents" / f"{index:06d}.skipped.json"


def _handle_failures(failures: list[tuple[int, str]], items: list[PlannedItem], config: EncodeConfig,
                     root: Path) -> None:
    from cogtune.data.dataset import Problem

    for position, reason in failures:
        item = items[position]
        entry = item.entry
        where = Problem("unreadable-video", "error", reason, entry.video_ref, entry.line, entry.source).located()
        if not config.skip_invalid:
            raise DataError(f"cannot encode {where}",
                            hint="--skip-invalid skips clips that fail and encodes the rest")
        report.warn(f"skipped (--skip-invalid): {where}")
        atomic_write_text(_skip_marker(root, item.index),
                          json.dumps({"key": item.latent_key, "video": entry.video_ref, "reason": reason}) + "\n")


def _bucket_batches(items: list[PlannedItem], batch_size: int) -> list[list[int]]:
    by_bucket: dict[Bucket, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_bucket[item.bucket].append(position)
    batches = []
    for bucket in sorted(by_bucket):
        positions = by_bucket[bucket]
        batches += [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    return batches


def encode_dataset(config: EncodeConfig, dry_run: bool = False) -> EncodePlan:
    """Encode (or finish encoding) a dataset into the cache at `config.output_dir`, one run at a time."""
    if dry_run:
        return _encode_dataset(config, dry_run)
    # A second encode into the same cache is refused, naming the first; only a launch's main process locks.
    with OutputLock(config.output_dir, main=is_main_launch_process()):
        return _encode_dataset(config, dry_run)


def _encode_dataset(config: EncodeConfig, dry_run: bool = False) -> EncodePlan:
    """Encode (or finish encoding) a dataset into the cache at `config.output_dir`.

    Under `torchrun`/`accelerate launch` every process plans the same work, takes every N-th
    pending item, and the main process writes the manifest once all of them are done.

    The first Ctrl-C (or SIGTERM) lets each process finish the batch it is encoding, stops the
    decoding workers, and ends with `Interrupted`: how many items the cache holds and the command
    that finishes it (the same one: a re-run skips finished items). Every file is written
    atomically and the manifest only at the end, so a second Ctrl-C, stopping at once, leaves a
    valid, incomplete cache too. The launcher forwards the signal to every process; they agree
    before the manifest, so all of them stop (one that got no signal finishes its share first).
    """
    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    from cogtune.distributed import process_state

    state = process_state()
    report.set_main_process(state.is_main_process)
    plan = plan_encode(config)
    print_plan(plan)
    if dry_run:
        return plan
    root = Path(config.output_dir)
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for folder in (root, root / "latents", root / "text"):
            sweep_temporaries(folder)  # leftovers of a killed run; nothing else writes yet
        (root / MANIFEST_NAME).unlink(missing_ok=True)  # the cache is incomplete until the end
        write_config(config, root)
    state.wait_for_everyone()

    rank, world = state.process_index, state.num_processes
    if world > 1:
        report.info(f"{world} processes: each encodes every {world}th pending item")
    stop = StopRequest()
    with stop.listening(enabled=True, stopping="stopping after the clips being encoded; the cache keeps every "
                                                "finished item"):
        finished = _encode_text(plan, config, root, state.device, plan.pending_text[rank::world],
                                state.is_main_process, stop) \
            and _encode_latents(plan, config, root, state.device, plan.pending_latents[rank::world], stop)
        if not _finished_on_every_process(state, finished):
            raise _interrupted(plan, config, root, stop)
    if state.is_main_process:
        _write_manifest(plan, config, root)
        skipped = sum(1 for item in plan.items if _skipped_while_encoding(root, item))
        report.success(f"cache ready: {root} ({len(plan.items) - skipped} items"
                       + (f"; {skipped} skipped because they failed to decode" if skipped else "") + ")")
        if config.preview:
            from cogtune.encode.preview import preview_cache

            preview_cache(root, count=config.preview, device=state.device)
    state.wait_for_everyone()
    return plan


def _finished_on_every_process(state: Any, finished: bool) -> bool:
    """Whether no process stopped early (a collective: every process has written all it will)."""
    if state.num_processes == 1:
        return finished
    return all(gather_object([finished]))


def _interrupted(plan: EncodePlan, config: EncodeConfig, root: Path, stop: StopRequest) -> Exception:
    """The one line an interrupted encode ends with: what the cache holds and how to finish it."""
    done = sum(1 for item in plan.items
               if (read_metadata(root / latent_file(item.index)) or {}).get("key") == item.latent_key
               and (read_metadata(root / text_file(item.index)) or {}).get("key") == item.text_key
               or _skipped_while_encoding(root, item))
    # The same command finishes the cache; with --overwrite it would start it over.
    command = rerun_command(report.invocation, drop=("--overwrite", "--no-overwrite"),
                            append=("--no-overwrite",) if config.overwrite else ())
    return stop.interrupted(f"interrupted: {done} of {report.plural(len(plan.items), 'item')} encoded in {root}",
                            hint=f"resume with: {command or 'the same `cogtune encode` command'}")


def _encode_text(plan: EncodePlan, config: EncodeConfig, root: Path, device: Any, items: list[PlannedItem],
                 shared: bool, stop: StopRequest) -> bool:
    """Caption embeddings of `items`; with `shared`, also the empty and validation prompts.

    False when `stop` was requested before all were written."""
    from cogtune.models.loading import load_text_encoder, load_tokenizer
    from cogtune.models.text import encode_prompts, text_encoder_dtype

    spec = plan.model.spec
    validation_key = stable_hash({"prompts": list(config.validation_prompts), "compat": compatibility(spec),
                                  "model": plan.model.location})
    empty_key = stable_hash({"prompt": "", "compat": compatibility(spec), "model": plan.model.location})
    need_empty = shared and (config.overwrite or (read_metadata(root / EMPTY_PROMPT_FILE) or {}).get("key") != empty_key)
    need_validation = shared and bool(config.validation_prompts) and (
        config.overwrite or (read_metadata(root / VALIDATION_PROMPTS_FILE) or {}).get("key") != validation_key)
    if not items and not need_empty and not need_validation:
        return True
    tokenizer = load_tokenizer(plan.model)
    text_encoder = load_text_encoder(plan.model, dtype=text_encoder_dtype(spec, device), device=device).eval()
    max_tokens = spec.max_text_tokens
    batch = 8
    with report.progress("encoding captions", total=len(items), unit="captions") as bar:
        for start in range(0, len(items), batch):
            if stop.requested:
                return False
            chunk = items[start : start + batch]
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
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return True


def _encode_dtype(model: ResolvedModel, device: Any):
    from cogtune.models.loading import torch_dtype

    if torch.device(device).type == "cpu":
        return torch.float32  # half-precision convolutions are slow or missing on CPUs
    return torch_dtype(model.spec.weight_dtype)


# CogVideoX's I2V training noises the condition image in pixel space: sigma ~ exp(N(-3, 0.5)).
IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD = -3.0, 0.5


def noised_condition_images(images: Any, keys: list[str], samples: int) -> tuple[Any, Any]:
    """`samples` noisy copies of each condition image (B, 3, H, W) -> (B, K, 3, H, W) and sigmas (B, K).

    The noise depends only on the item's cache key, so a resumed or sharded encode writes
    exactly the bytes an uninterrupted one would.
    """
    noisy, sigmas = [], []
    for image, key in zip(images, keys):
        generator = torch.Generator().manual_seed(int(key[:15], 16))
        sigma = torch.exp(torch.normal(IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD, (samples,), generator=generator))
        noise = torch.randn((samples, *image.shape), generator=generator)
        noisy.append(image.float().cpu()[None] + noise * sigma[:, None, None, None])
        sigmas.append(sigma)
    return torch.stack(noisy), torch.stack(sigmas)


def _encode_latents(plan: EncodePlan, config: EncodeConfig, root: Path, device: Any,
                    items: list[PlannedItem], stop: StopRequest) -> bool:
    """Latents of `items`, decoded in worker processes; False when `stop` came before all were written."""
    from cogtune.models.loading import load_vae

    if not items:
        return True
    dtype = _encode_dtype(plan.model, device)
    vae = load_vae(plan.model, dtype=dtype, device=device).eval()
    if config.vae_slicing:
        vae.enable_slicing()
    if config.vae_tiling:
        vae.enable_tiling()
    dataset = _ClipDataset(items, plan.i2v)
    loader = DataLoader(
        dataset,
        batch_sampler=_bucket_batches(items, config.batch_size),
        num_workers=min(config.num_workers, len(items)),
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
        worker_init_fn=leave_stopping_to_the_parent,
    )
    batches = _BatchesUntilStopped(loader, stop)

    def encode(pixels: Any) -> Any:  # (B, F, 3, H, W) in [-1, 1] -> posterior parameters (B, 2C, F', H', W')
        return vae.encode(pixels.to(device=device, dtype=dtype).permute(0, 2, 1, 3, 4)).latent_dist.parameters

    samples = config.image_noise_samples
    with report.progress("encoding clips", total=len(items), unit="clips") as bar, torch.no_grad():
        for batch in batches:
            _handle_failures(batch["failures"], items, config, root)
            bar.advance(len(batch["failures"]))
            if not batch["positions"]:
                continue
            moments = encode(batch["pixels"])
            keys = [items[position].latent_key for position in batch["positions"]]
            extra: dict[str, Any] = {}
            if "image" in batch:
                extra["image_latent_dist"] = encode(batch["image"][:, None])
                if samples:
                    noisy, sigmas = noised_condition_images(batch["image"], keys, samples)
                    flat = encode(noisy.flatten(0, 1)[:, None])
                    extra["image_latent_dist_noised"] = flat.unflatten(0, (len(keys), samples))
                    extra["image_noise_sigma"] = sigmas
            for row, position in enumerate(batch["positions"]):
                item = items[position]
                tensors = {"latent_dist": moments[row], **{name: value[row] for name, value in extra.items()}}
                write_safetensors(root / latent_file(item.index), tensors,
                                  {"key": item.latent_key, "bucket": str(item.bucket), "video": item.entry.video_ref})
                _skip_marker(root, item.index).unlink(missing_ok=True)
            bar.advance(len(batch["positions"]))
    return batches.all_done


class _BatchesUntilStopped:
    """A DataLoader's batches until a stop is requested (the batch being encoded then is finished).

    Batches decoded ahead are left for the re-run. The decoding workers are shut down on the way
    out (each finishes the clip in hand), also when a second Ctrl-C stops at once.
    """

    def __init__(self, loader: Any, stop: StopRequest):
        self.loader = loader
        self.stop = stop
        self.all_done = False

    def __iter__(self) -> Any:
        batches = iter(self.loader)
        remaining = len(self.loader)
        try:
            while not self.stop.requested:
                try:
                    batch = next(batches)
                except StopIteration:
                    self.all_done = True
                    return
                except Exception:
                    # A SIGTERM to the whole process group ends the workers too (see leave_stopping_to_the_parent);
                    # what they decoded can then not be fetched ("worker exited unexpectedly", EOFError).
                    if self.stop.requested:
                        return
                    raise
                if self.stop.requested:
                    return
                yield batch
                remaining -= 1
                if remaining == 0:  # a stop asked for after the last batch stops nothing
                    self.all_done = True
                    return
        finally:
            del batches  # the last reference: torch shuts the workers down now, not at exit


def _skipped_while_encoding(root: Path, item: PlannedItem) -> bool:
    """Whether `--skip-invalid` skipped this very clip (same cache key) because it failed to decode."""
    try:
        return json.loads(_skip_marker(root, item.index).read_text()).get("key") == item.latent_key
    except (OSError, ValueError, AttributeError):
        return False


def _dataset_fingerprint(plan: EncodePlan) -> str:
    return stable_hash([[item.entry.video_ref, item.caption, item.latent_key] for item in plan.items])


def _library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"cogtune": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _dataset_record(plan: EncodePlan, config: EncodeConfig) -> dict[str, Any]:
    where = {"config": str(Path(config.dataset_config).resolve())} if config.dataset_config else \
        {"root": str(Path(config.data.root).resolve())}
    return {**where, "fingerprint": _dataset_fingerprint(plan), "items": len(plan.items)}


def _sources_record(plan: EncodePlan, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each [[datasets]] table as the manifest records it: where, its options, its weight, its item count."""
    from cogtune.config import config_to_dict

    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item["dataset"]] += 1
    return [{"name": source.name, "repeats": source.repeats, "buckets": list(source.buckets), "items": counts[source.name],
             **config_to_dict(source.data)} for source in plan.sources]


def _common_id_token(plan: EncodePlan, config: EncodeConfig) -> str | None:
    """The id token every item's caption starts with, if they share one (the model card names it)."""
    tokens = {source.data.id_token for source in plan.sources} if plan.sources else {config.data.id_token}
    return tokens.pop() if len(tokens) == 1 else None


def _write_manifest(plan: EncodePlan, config: EncodeConfig, root: Path) -> None:
    spec = plan.model.spec
    items = []
    for item in plan.items:
        text_meta = read_metadata(root / text_file(item.index)) or {}
        latent_meta = read_metadata(root / latent_file(item.index)) or {}
        if latent_meta.get("key") != item.latent_key and _skipped_while_encoding(root, item):
            continue
        if latent_meta.get("key") != item.latent_key or text_meta.get("key") != item.text_key:
            raise DataError(f"cache item {item.index} was not written; re-run `cogtune encode` to finish the cache")
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
            **({"dataset": item.source.name, "repeats": item.source.repeats} if item.source is not None else {}),
            **({"frame_range": item.frame_range} if item.frame_range is not None else {}),
            # size, digest, dtypes and shapes: checked when training first loads each file
            INTEGRITY_KEY: {name: file_record(root / name) for name in (latent_file(item.index), text_file(item.index))},
        })
    if not items:
        raise DataError("no clip could be encoded: every one failed to decode (see the warnings above)")
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
            "slicing": config.vae_slicing,
            "tiling": config.vae_tiling,
            "stored": "unscaled posterior parameters (mean, logvar) on the channel axis",
        },
        "text": {"max_tokens": spec.max_text_tokens, "embed_dim": spec.text_embed_dim},
        "buckets": [str(b) for b in plan.buckets],
        "resize_mode": config.data.resize_mode,
        "frame_sampling": config.data.frame_sampling,
        "sample_fps": plan.target_fps if config.data.frame_sampling == "fps" else None,
        "frame_rule": spec.frame_rule,
        "id_token": _common_id_token(plan, config),
        "i2v": plan.i2v,
        "image_augmentation": {
            "noised_samples": config.image_noise_samples,
            "sigma": f"exp(N({IMAGE_NOISE_LOG_MEAN}, {IMAGE_NOISE_LOG_STD}))",
            "space": "pixels in [-1, 1], before the VAE",
        } if plan.i2v else None,
        "dataset": _dataset_record(plan, config),
        **({"datasets": _sources_record(plan, items)} if plan.sources else {}),
        "empty_prompt_file": EMPTY_PROMPT_FILE,
        "validation_prompts": list(config.validation_prompts),
        INTEGRITY_KEY: {name: file_record(root / name) for name in (EMPTY_PROMPT_FILE, VALIDATION_PROMPTS_FILE)
                        if (root / name).is_file() and (name != VALIDATION_PROMPTS_FILE or config.validation_prompts)},
        "items": items,
    }
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
