"""Reading a dataset's entries (caption, video, optional image) with every problem located.

The layout is a data root with a caption file and a video file of line-separated entries, paths
relative to the root (`prompts.txt` + `videos.txt` by default), and for I2V an optional image
file. Text files may carry a UTF-8 BOM, CRLF line ends and trailing blank lines. Every problem
is a `Problem` with a stable code, the file and the 1-based line it is about.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from cogtune.config import setting

Severity = Literal["error", "warning"]


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Where a dataset lives and how its files are named."""

    root: str = setting("", "Data root; entries are paths relative to it.")
    caption_column: str = setting("prompts.txt", "File of captions, one per line (relative to the root).")
    video_column: str = setting("videos.txt", "File of video paths, one per line (relative to the root).")
    image_column: str | None = setting(None, "I2V: file of condition-image paths; default: each clip's first frame.")
    allow_outside_root: bool = setting(False, "Accept entries that point outside the data root.")
    id_token: str | None = setting(None, "Token prepended to every caption (e.g. a trigger word).")


@dataclasses.dataclass(frozen=True)
class Problem:
    code: str
    severity: Severity
    message: str
    path: str | None = None
    line: int | None = None

    def as_json(self) -> dict:
        return {"code": self.code, "path": self.path, "line": self.line, "message": self.message}

    def located(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.message}" if where else self.message


@dataclasses.dataclass(frozen=True)
class Entry:
    """One training item as the dataset files describe it."""

    index: int
    caption: str
    video: Path  # absolute
    video_ref: str  # as written in the dataset file
    source: str  # the file (relative to the root) that listed the video
    line: int  # 1-based line of that file
    image: Path | None = None
    image_ref: str | None = None

    def caption_with(self, id_token: str | None) -> str:
        return f"{id_token} {self.caption}" if id_token else self.caption


def read_text_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (BOM and CR stripped, trailing blank lines dropped)."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def resolve_entry_path(root: Path, reference: str, allow_outside_root: bool) -> tuple[Path, str | None]:
    """The absolute path of `reference`, and an error code when it breaks the root rule."""
    candidate = Path(reference)
    if candidate.is_absolute():
        return candidate, None if allow_outside_root else "absolute-path"
    resolved = Path(os.path.normpath(root / candidate))
    try:
        resolved.relative_to(Path(os.path.normpath(root)))
    except ValueError:
        return resolved, None if allow_outside_root else "path-outside-root"
    return resolved, None


def read_entries(config: DatasetConfig) -> tuple[list[Entry], list[Problem]]:
    """The dataset's entries and the structural problems found while reading its files."""
    root = Path(config.root).expanduser()
    problems: list[Problem] = []
    if not root.is_dir():
        return [], [Problem("missing-root", "error", "data root is not a folder", str(root))]

    def read(column: str, code: str) -> list[str] | None:
        path = root / column
        if not path.is_file():
            problems.append(Problem(code, "error", f"{column} not found in the data root", column))
            return None
        try:
            return read_text_lines(path)
        except UnicodeDecodeError as exc:
            problems.append(Problem("bad-encoding", "error", f"not UTF-8 text (byte {exc.start})", column))
            return None

    captions = read(config.caption_column, "missing-caption-file")
    videos = read(config.video_column, "missing-video-file")
    images = read(config.image_column, "missing-image-file") if config.image_column else None
    if captions is None or videos is None or (config.image_column and images is None):
        return [], problems

    if len(captions) != len(videos):
        problems.append(Problem(
            "count-mismatch", "error",
            f"{len(captions)} captions in {config.caption_column} but {len(videos)} videos in {config.video_column}",
            config.video_column, min(len(captions), len(videos)) + 1,
        ))
    if images is not None and len(images) != len(videos):
        problems.append(Problem(
            "count-mismatch", "error",
            f"{len(images)} images in {config.image_column} but {len(videos)} videos in {config.video_column}",
            config.image_column, min(len(images), len(videos)) + 1,
        ))

    entries: list[Entry] = []
    for position, (caption, video_ref) in enumerate(zip(captions, videos)):
        line = position + 1
        caption = caption.strip()
        video_ref = video_ref.strip()
        if not caption:
            problems.append(Problem("empty-caption", "error", "caption is empty", config.caption_column, line))
        if not video_ref:
            problems.append(Problem("empty-path", "error", "video path is empty", config.video_column, line))
            continue
        video, code = resolve_entry_path(root, video_ref, config.allow_outside_root)
        if code is not None:
            problems.append(Problem(code, "error", _root_message(code, video_ref), config.video_column, line))
            continue
        image = image_ref = None
        if images is not None and position < len(images):
            image_ref = images[position].strip()
            image, code = resolve_entry_path(root, image_ref, config.allow_outside_root)
            if code is not None:
                problems.append(Problem(code, "error", _root_message(code, image_ref), config.image_column, line))
                continue
        entries.append(Entry(len(entries), caption, video, video_ref, config.video_column, line, image, image_ref))
    if not entries and not problems:
        problems.append(Problem("empty-dataset", "error", "the dataset lists no entries", config.video_column))
    return entries, problems


def _root_message(code: str, reference: str) -> str:
    if code == "absolute-path":
        return f"absolute path '{reference}' (paths must be relative to the data root; --allow-outside-root accepts it)"
    return f"'{reference}' escapes the data root (--allow-outside-root accepts it)"
