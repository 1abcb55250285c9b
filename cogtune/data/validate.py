"""`dataset validate`: find every problem of a dataset up front, each with its file and line.

Videos are probed from their container (frame count, fps, size, sample aspect ratio; the first and
last frames decoded, which catches files cut short) rather than decoded whole, in a thread pool,
with one ffmpeg run reading the container headers of 16 clips, so that large datasets validate in
seconds; `deep=True` decodes every frame. Problem codes are
stable (see `CODES`); `path` is the file a problem is about and `line` the line (or table row) of
the listing (`source`) that names it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.markup import escape

from cogtune import report
from cogtune.data.clips import sampleable_frames
from cogtune.data.dataset import DatasetConfig, Entry, Problem, is_placeholder_caption, read_entries
from cogtune.data.dataset_config import DatasetSource, load_dataset_sources
from cogtune.data.video import (
    VideoInfo,
    VideoReadError,
    count_decodable_frames,
    probe_image,
    probe_video,
    stream_headers,
)
from cogtune.errors import DataError
from cogtune.models.registry import PRESETS, ModelSpec

# Every code `validate` can report, and what it means.
CODES = {
    "missing-root": "the data root is not a folder",
    "no-dataset": "no recognised layout in the data root",
    "missing-caption-file": "the caption file is missing",
    "missing-video-file": "the video-path file is missing",
    "missing-image-file": "the image-path file is missing",
    "missing-dataset-file": "the --dataset-file is missing",
    "bad-dataset-file": "the dataset file is not valid CSV/JSON/JSONL",
    "missing-column": "a named (or the default) column is not in the dataset file",
    "bad-encoding": "a text file is not UTF-8 (nor UTF-16 with its byte-order mark)",
    "count-mismatch": "caption, video (and image) files list different numbers of entries",
    "columns-swapped": "captions look like paths: caption and video columns are swapped",
    "empty-dataset": "the dataset lists no entries",
    "empty-caption": "a caption is empty",
    "control-characters": "a caption holds NUL or another control character (a binary or mis-encoded file)",
    "placeholder-caption": "a caption is the placeholder `dataset prepare` writes for a clip it could not caption",
    "missing-caption": "a clip has no same-named .txt caption (folder layout)",
    "empty-path": "a video or image path is empty",
    "absolute-path": "a path is absolute (needs --allow-outside-root)",
    "path-outside-root": "a path leads outside the data root (needs --allow-outside-root)",
    "missing-file": "a listed video does not exist (or is a dangling symlink)",
    "not-a-file": "a listed video is a folder",
    "permission-denied": "a video cannot be read: permission denied",
    "empty-video": "a video file has 0 bytes",
    "unreadable-video": "a video cannot be decoded (corrupt, truncated or unsupported)",
    "no-video-stream": "a file has no video stream (e.g. audio only)",
    "too-few-frames": "a clip has fewer frames than asked or than the model's minimum",
    "frame-rule": "--frames breaks the model's frame rule",
    "resolution-rule": "--height/--width break the model's resolution rule",
    "missing-image": "a listed condition image does not exist",
    "unreadable-image": "a condition image or a still image cannot be read",
    "not-an-image": "a dataset of kind 'images' lists a file that is not an image",
    "still-image-i2v": "an image-to-video dataset lists a still image (it would be its own condition image)",
    "low-resolution": "(warning) a clip is smaller than the target and will be upscaled",
    "missing-fps": "(warning; error with fps sampling) a clip has no frame rate",
    "odd-fps": "(warning) a clip's frame rate is unusual (< 5 or > 120)",
    "duplicate-entry": "(warning) the same video is listed twice",
    "caption-truncated": "(warning) a caption has more tokens than the model reads",
    "skipped-file": "(warning) the folder layout skipped a file: a GIF, a dangling symlink, a folder named like a video",
}


@dataclasses.dataclass
class ValidationReport:
    items: int
    errors: list[Problem]
    warnings: list[Problem]
    stats: dict[str, Any]
    entries: list[Entry] = dataclasses.field(default_factory=list, repr=False)
    video_info: dict[int, VideoInfo] = dataclasses.field(default_factory=dict, repr=False)
    bad_entries: set[int] = dataclasses.field(default_factory=set, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "items": self.items,
            "errors": [p.as_json() for p in self.errors],
            "warnings": [p.as_json() for p in self.warnings],
            "stats": self.stats,
        }

    def usable_entries(self) -> list[Entry]:
        """Entries with no error of their own."""
        return [e for e in self.entries if e.index not in self.bad_entries]


# Clips whose container headers one ffmpeg run reads: starting ffmpeg once per clip took most of the time.
_HEADER_BATCH = 16


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:  # gone meanwhile, or not ours to read: `probe_video` says which
        return False


def _probe_batch(batch: list[Entry], deep: bool) -> list[tuple[Entry, VideoInfo | None, VideoReadError | None]]:
    clips = [e for e in batch if not e.still and _nonempty_file(e.video)]
    headers = dict(zip((e.index for e in clips), stream_headers([e.video for e in clips])))
    results = []
    for entry in batch:
        try:
            if entry.still:
                info = probe_image(entry.video)
            else:
                info = probe_video(entry.video, header=headers.get(entry.index))
                if deep:
                    info = dataclasses.replace(info, frames=count_decodable_frames(entry.video, info=info))
            results.append((entry, info, None))
        except VideoReadError as exc:
            results.append((entry, None, exc))
    return results


def validate_dataset(
    config: DatasetConfig,
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    model: ModelSpec | None = None,
    tokenizer: Any = None,
    deep: bool = False,
    i2v: bool = False,
) -> ValidationReport:
    """Check a dataset against the requested clip shape and (optionally) a model's rules.

    With `i2v`, still images are errors, found from their names before any file is read.
    """
    entries, problems = read_entries(config)
    bad: set[int] = set()

    def flag(entry: Entry, problem: Problem) -> None:
        problems.append(problem)
        if problem.severity == "error":
            bad.add(entry.index)

    problems += _model_rule_problems(model, frames, height, width)
    # Without a model, the fewest frames any CogVideoX accepts: a 1-frame "video" (an image renamed .mp4) is no clip.
    min_frames = max(frames or 0, model.min_frames if model is not None else min(p.min_frames for p in PRESETS.values()))
    target_fps = config.sample_fps or (model.fps if model is not None else None)
    if config.frame_sampling == "fps" and target_fps is None:
        raise DataError("frame_sampling 'fps' needs --sample-fps (or --model, whose fps is the default)")
    problems += _duplicate_entries(entries)

    if i2v:
        for entry in [e for e in entries if e.still]:
            flag(entry, Problem("still-image-i2v", "error", "a still image cannot train image-to-video: it would be "
                                "its own condition image, leaving nothing to generate", entry.video_ref, entry.line,
                                entry.source))
        to_probe = [e for e in entries if not e.still]
    else:
        to_probe = entries
    infos = _probe_and_check(to_probe, flag, config, deep=deep, min_frames=min_frames, height=height, width=width,
                             target_fps=target_fps)

    if tokenizer is not None and model is not None:
        problems += _check_caption_lengths(entries, tokenizer, model.max_text_tokens, config)
    bad.update(entry.index for entry in entries if not entry.caption or is_placeholder_caption(entry.caption))

    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    return ValidationReport(len(entries), errors, warnings, _statistics(entries, infos, Path(config.root)),
                            entries, infos, bad)


def _model_rule_problems(model: ModelSpec | None, frames: int | None, height: int | None,
                         width: int | None) -> list[Problem]:
    """The requested clip shape against the model's frame and resolution rules."""
    if model is None:
        return []
    problems = []
    if frames is not None:
        problems += [Problem("frame-rule", "error", message) for message in model.frame_problems(frames)]
    if height is not None and width is not None:
        problems += [Problem("resolution-rule", "error", m) for m in model.resolution_problems(height, width)]
    return problems


def _duplicate_entries(entries: list[Entry]) -> list[Problem]:
    """A warning for each entry whose video an earlier entry lists too."""
    problems = []
    first_listing: dict[str, int | None] = {}
    for entry in entries:
        key = str(entry.video)
        if key in first_listing:
            where = f"line {first_listing[key]}" if first_listing[key] is not None else "another entry"
            problems.append(Problem("duplicate-entry", "warning", f"also listed on {where}", entry.video_ref,
                                    entry.line, entry.source))
        else:
            first_listing[key] = entry.line
    return problems


def _probe_and_check(to_probe: list[Entry], flag: Callable[[Entry, Problem], None], config: DatasetConfig, *,
                     deep: bool, min_frames: int, height: int | None, width: int | None,
                     target_fps: float | None) -> dict[int, VideoInfo]:
    """Probe the clips (and stills) in a thread pool, in batches, and check each: its problems go to `flag`.
    Returns what was probed, by entry index."""
    infos: dict[int, VideoInfo] = {}
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))
    with report.progress("validating", total=len(to_probe), unit="clips") as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        batches = [to_probe[i : i + _HEADER_BATCH] for i in range(0, len(to_probe), _HEADER_BATCH)]
        probed = (result for results in pool.map(lambda b: _probe_batch(b, deep), batches) for result in results)
        for entry, info, failure in probed:
            bar.advance()
            if failure is not None:
                message = failure.message.removeprefix(f"{entry.video}: ")
                if failure.code == "missing-file" and "://" in entry.video_ref:
                    message = "URLs are not read; download the videos into the data root first"
                flag(entry, Problem(failure.code, "error", message, entry.video_ref, entry.line, entry.source))
                continue
            assert info is not None
            infos[entry.index] = info
            for problem in _check_clip(entry, info, min_frames=min_frames, height=height, width=width, config=config,
                                       target_fps=target_fps):
                flag(entry, problem)
            if entry.image is not None:
                for problem in _check_image(entry):
                    flag(entry, problem)
    return infos


def validate_dataset_config(
    path: str | Path,
    defaults: DatasetConfig | None = None,
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    model: ModelSpec | None = None,
    tokenizer: Any = None,
    deep: bool = False,
    i2v: bool = False,
) -> list[tuple[DatasetSource, ValidationReport]]:
    """Check each dataset of a dataset config file; a dataset with its own buckets is checked against those."""
    from cogtune.data.clips import Bucket

    results = []
    for source in load_dataset_sources(path, defaults):
        shape: tuple[int | None, int | None, int | None] = (frames, height, width)
        if source.buckets:
            video_frames = [b.frames for b in map(Bucket.parse, source.buckets) if b.frames > 1]
            shape = (min(video_frames) if video_frames else None, None, None)
        if source.data.kind == "images":
            shape = (None, shape[1], shape[2])
        results.append((source, validate_dataset(source.data, frames=shape[0], height=shape[1], width=shape[2],
                                                 model=model, tokenizer=tokenizer, deep=deep, i2v=i2v)))
    return results


def _check_clip(entry: Entry, info: VideoInfo, *, min_frames: int, height: int | None, width: int | None,
                config: DatasetConfig, target_fps: float | None) -> list[Problem]:
    found = []

    def problem(code: str, severity: str, message: str) -> None:
        found.append(Problem(code, severity, message, entry.video_ref, entry.line, entry.source))  # type: ignore[arg-type]

    if info.backend == "image":  # a still: one frame, no frame rate
        if (height is not None and info.height < height) or (width is not None and info.width < width):
            problem("low-resolution", "warning", f"image is {info.width}x{info.height}, below the target "
                                                 f"{width or info.width}x{height or info.height} (it will be upscaled)")
        return found
    if config.frame_sampling == "fps" and info.fps <= 0:
        problem("missing-fps", "error", "clip has no frame rate, so it cannot be sampled at a target fps")
        return found
    available = sampleable_frames(info, config.frame_sampling, target_fps)
    if available < min_frames:
        detail = f" at {target_fps:g} fps" if config.frame_sampling == "fps" else ""
        problem("too-few-frames", "error",
                f"clip gives {available} frames{detail} ({info.frames} at {info.fps:g} fps), "
                f"fewer than the {min_frames} needed")
    if (height is not None and info.height < height) or (width is not None and info.width < width):
        problem("low-resolution", "warning", f"clip is {info.width}x{info.height}, below the target "
                                             f"{width or info.width}x{height or info.height} (it will be upscaled)")
    if info.fps <= 0:
        problem("missing-fps", "warning", "clip has no frame rate")
    elif info.fps < 5 or info.fps > 120:
        problem("odd-fps", "warning", f"clip runs at {info.fps:g} fps")
    return found


def _check_image(entry: Entry) -> list[Problem]:
    assert entry.image is not None
    location = dict(path=entry.image_ref, line=entry.line, source=entry.image_source)
    if not entry.image.is_file():
        return [Problem("missing-image", "error", "condition image not found", **location)]
    try:
        probe_image(entry.image)  # decodes the pixels: PIL's verify() passes a JPEG cut short
    except VideoReadError as exc:
        reason = exc.message.removeprefix(f"{entry.image}: ")
        return [Problem("unreadable-image", "error", f"condition image: {reason}", **location)]
    return []


def _check_caption_lengths(entries: list[Entry], tokenizer: Any, limit: int, config: DatasetConfig) -> list[Problem]:
    found = []
    captions = [entry.caption_with(config.id_token) for entry in entries]
    if not captions:
        return found
    for entry, ids in zip(entries, tokenizer(captions, add_special_tokens=True).input_ids):
        if len(ids) > limit:
            found.append(Problem("caption-truncated", "warning",
                                 f"caption has {len(ids)} tokens; the model reads the first {limit}",
                                 entry.caption_source, entry.line, entry.caption_source))
    return found


def _statistics(entries: list[Entry], infos: dict[int, VideoInfo], root: Path) -> dict[str, Any]:
    clips = [i for i in infos.values() if i.backend != "image"]
    images = [i for i in infos.values() if i.backend == "image"]
    words = [len(entry.caption.split()) for entry in entries]
    characters = [len(entry.caption) for entry in entries]
    resolutions = collections.Counter(f"{i.width}x{i.height}" for i in clips)
    fps_values = collections.Counter(f"{i.fps:g}" for i in clips)
    return {
        "root": str(root),
        "clips": len(clips),
        "images": len(images),
        "total_duration_s": round(sum(i.duration for i in clips), 3),
        "frames": _summary([i.frames for i in clips]),
        "duration_s": _summary([round(i.duration, 3) for i in clips]),
        "fps": dict(fps_values.most_common()),
        "resolutions": dict(resolutions.most_common()),
        "caption_words": _summary(words),
        "caption_characters": _summary(characters),
    }


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def print_report(result: ValidationReport, limit: int = 50) -> None:
    """The human view: problems (capped at `limit`), then a statistics table."""
    for problem in (result.errors + result.warnings)[:limit]:
        colour = "red" if problem.severity == "error" else "yellow"
        report.stderr.print(f"[{colour}]{problem.severity}[/] {escape(f'[{problem.code}] {problem.located()}')}")
    hidden = len(result.errors) + len(result.warnings) - limit
    if hidden > 0:
        report.stderr.print(f"... and {hidden} more (use --json for the full list)")
    stats = result.stats
    rows = [
        ("items", result.items),
        ("readable clips", stats["clips"]),
        *([("readable images", stats["images"])] if stats.get("images") else []),
        ("total duration", f"{stats['total_duration_s']:.1f} s"),
        ("frames (min / median / max)", _fmt_summary(stats["frames"])),
        ("fps", ", ".join(f"{k} ({v})" for k, v in stats["fps"].items()) or "-"),
        ("resolutions", ", ".join(f"{k} ({v})" for k, v in list(stats["resolutions"].items())[:6]) or "-"),
        ("caption words (min / median / max)", _fmt_summary(stats["caption_words"])),
        ("errors", len(result.errors)),
        ("warnings", len(result.warnings)),
    ]
    report.key_values(f"dataset {stats['root']}", rows)


def _fmt_summary(summary: dict[str, float] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['min']:g} / {summary['median']:g} / {summary['max']:g}"
