"""`dataset validate`: find every problem of a dataset up front, each with its file and line.

Videos are probed from their container (frame count, fps, size) rather than decoded, in a thread
pool, so that large datasets validate in seconds; `deep=True` decodes every frame.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.markup import escape

from cogtune import report
from cogtune.data.dataset import DatasetConfig, Entry, Problem, read_entries
from cogtune.data.video import VideoInfo, VideoReadError, probe_video, read_all_frames
from cogtune.models.registry import ModelSpec


@dataclasses.dataclass
class ValidationReport:
    items: int
    errors: list[Problem]
    warnings: list[Problem]
    stats: dict[str, Any]
    entries: list[Entry] = dataclasses.field(default_factory=list, repr=False)
    video_info: dict[int, VideoInfo] = dataclasses.field(default_factory=dict, repr=False)

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
        bad = {(p.path, p.line) for p in self.errors}
        return [e for e in self.entries if (e.source, e.line) not in bad]


def _probe(entry: Entry, deep: bool) -> tuple[Entry, VideoInfo | None, VideoReadError | None]:
    try:
        info = probe_video(entry.video)
        if deep:
            frames = read_all_frames(entry.video)
            info = dataclasses.replace(info, frames=int(frames.shape[0]))
        return entry, info, None
    except VideoReadError as exc:
        return entry, None, exc


def validate_dataset(
    config: DatasetConfig,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    model: ModelSpec | None = None,
    tokenizer: Any = None,
    deep: bool = False,
) -> ValidationReport:
    """Check a dataset against the requested clip shape and (optionally) a model's rules."""
    entries, problems = read_entries(config)
    root = Path(config.root)

    if model is not None:
        if frames is not None:
            problems += [Problem("frame-rule", "error", message) for message in model.frame_problems(frames)]
        if height is not None and width is not None:
            problems += [Problem("resolution-rule", "error", m) for m in model.resolution_problems(height, width)]
    min_frames = max(frames or 0, model.min_frames if model is not None else 1)

    seen: dict[str, int] = {}
    for entry in entries:
        key = str(entry.video)
        if key in seen:
            problems.append(Problem("duplicate-entry", "warning",
                                    f"'{entry.video_ref}' is also listed on line {seen[key]}", entry.source, entry.line))
        else:
            seen[key] = entry.line

    infos: dict[int, VideoInfo] = {}
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))
    with report.progress("validating", total=len(entries), unit="clips") as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for entry, info, failure in pool.map(lambda e: _probe(e, deep), entries):
            bar.advance()
            if failure is not None:
                message = failure.message.split(": ", 1)[-1]
                problems.append(Problem(failure.code, "error", f"'{entry.video_ref}': {message}", entry.source, entry.line))
                continue
            assert info is not None
            infos[entry.index] = info
            problems += _check_clip(entry, info, min_frames, height, width)
            if entry.image is not None:
                problems += _check_image(entry, config)

    if tokenizer is not None and model is not None:
        problems += _check_caption_lengths(entries, tokenizer, model.max_text_tokens, config)

    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    stats = _statistics(entries, infos, root)
    return ValidationReport(len(entries), errors, warnings, stats, entries, infos)


def _check_clip(entry: Entry, info: VideoInfo, min_frames: int, height: int | None, width: int | None) -> list[Problem]:
    found = []
    if info.frames < min_frames:
        found.append(Problem("too-few-frames", "error",
                             f"'{entry.video_ref}' has {info.frames} frames, fewer than the {min_frames} needed",
                             entry.source, entry.line))
    if (height is not None and info.height < height) or (width is not None and info.width < width):
        found.append(Problem("low-resolution", "warning",
                             f"'{entry.video_ref}' is {info.width}x{info.height}, below the target "
                             f"{width or info.width}x{height or info.height} (it will be upscaled)",
                             entry.source, entry.line))
    if info.fps <= 0:
        found.append(Problem("missing-fps", "warning", f"'{entry.video_ref}' has no frame rate", entry.source,
                             entry.line))
    elif info.fps < 5 or info.fps > 120:
        found.append(Problem("odd-fps", "warning", f"'{entry.video_ref}' runs at {info.fps:g} fps", entry.source,
                             entry.line))
    return found


def _check_image(entry: Entry, config: DatasetConfig) -> list[Problem]:
    from PIL import Image, UnidentifiedImageError

    assert entry.image is not None
    column = config.image_column or ""
    if not entry.image.is_file():
        return [Problem("missing-image", "error", f"image '{entry.image_ref}' not found", column, entry.line)]
    try:
        with Image.open(entry.image) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return [Problem("unreadable-image", "error", f"image '{entry.image_ref}' cannot be read ({exc})", column,
                        entry.line)]
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
                                 config.caption_column, entry.line))
    return found


def _statistics(entries: list[Entry], infos: dict[int, VideoInfo], root: Path) -> dict[str, Any]:
    clips = list(infos.values())
    words = [len(entry.caption.split()) for entry in entries]
    resolutions = collections.Counter(f"{i.width}x{i.height}" for i in clips)
    fps_values = collections.Counter(f"{i.fps:g}" for i in clips)
    return {
        "root": str(root),
        "clips": len(clips),
        "total_duration_s": round(sum(i.duration for i in clips), 3),
        "frames": _summary([i.frames for i in clips]),
        "fps": dict(fps_values.most_common()),
        "resolutions": dict(resolutions.most_common()),
        "caption_words": _summary(words),
    }


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def print_report(result: ValidationReport) -> None:
    """The human view: problems (capped), then a statistics table."""
    limit = 50
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
