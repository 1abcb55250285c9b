"""Reading a dataset's entries (caption, video, optional image) with every problem located.

Three layouts go through this one reader:

- a data root with a caption file and a video file of line-separated entries, paths relative to
  the root (`prompts.txt` + `videos.txt` by default), and for I2V an optional image file;
- a table (`--dataset-file` CSV, JSON list of objects, or JSONL) whose columns are named by
  `caption_column` / `video_column` / `image_column` (default `caption`, `video`, `image`, with the
  usual aliases such as `prompt` or `file_name`);
- a folder of clips (or, with `kind = "images"`, of still images) with a same-named `.txt` caption
  beside each.

A listing may name still images as well as videos: each still trains as a one-frame item.

Text may carry a UTF-8 BOM (or be UTF-16 with its BOM), CRLF line ends, trailing blank lines, and
(CSV) quoted fields with commas and newlines; other text (Latin-1, say) is an error naming its
line. Every problem is a `Problem` with a stable code, the file it is about, and
the 1-based line (or table row) of the listing that names it.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Literal

from cogtune.config import check_settings, setting
from cogtune.errors import ConfigError, DataError

Severity = Literal["error", "warning"]

DEFAULT_CAPTION_FILE = "prompts.txt"
DEFAULT_VIDEO_FILE = "videos.txt"
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CAPTION_ALIASES = ("caption", "prompt", "text", "description", "captions", "prompts")
_VIDEO_ALIASES = ("video", "video_path", "file_name", "filename", "path", "file", "videos")
_IMAGE_ALIASES = ("image", "image_path", "condition_image", "first_frame")
# What `dataset prepare` writes for a clip it has no caption for; `validate` reports it (placeholder-caption).
CAPTION_PLACEHOLDER = "[caption needed]"


def is_placeholder_caption(caption: str | None) -> bool:
    return (caption or "").strip().startswith(CAPTION_PLACEHOLDER)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Where a dataset lives, how its files are named, and how clips are read from it."""

    root: str = setting("", "Data root; entries are paths relative to it.", flag="--data-root", path=True)
    caption_column: str = setting(DEFAULT_CAPTION_FILE, "Caption file (one per line), or the caption column of a dataset "
                                  "file.", flag="--caption-column", metavar="FILE|COLUMN")
    video_column: str = setting(DEFAULT_VIDEO_FILE, "Video-path file (one per line), or the video column of a dataset "
                                "file.", flag="--video-column", metavar="FILE|COLUMN")
    image_column: str | None = setting(None, "I2V: condition-image file or column; default: each clip's first frame.",
                                       flag="--image-column", metavar="FILE|COLUMN")
    dataset_file: str | None = setting(None, "A CSV, JSON (list of objects) or JSONL table instead of the line files.",
                                       flag="--dataset-file", path=True)
    allow_outside_root: bool = setting(False, "Accept entries that are absolute or point outside the data root.",
                                       flag="--allow-outside-root")
    id_token: str | None = setting(None, "Token prepended to every caption (e.g. a trigger word).", flag="--id-token")
    frame_sampling: Literal["uniform", "fps"] = setting(
        "uniform", "uniform: spread the frames over the whole clip; fps: take them at the sample fps from the clip's "
                   "middle.",
        flag="--frame-sampling")
    sample_fps: float | None = setting(None, "Frame rate of fps frame sampling; default: the model's.",
                                       flag="--sample-fps", low=0, low_open=True)
    resize_mode: Literal["crop", "stretch"] = setting("crop", "Keep aspect ratio and center-crop, or stretch.",
                                                      flag="--resize-mode")
    kind: Literal["videos", "images"] = setting(
        "videos", "What the folder layout collects: video clips, or still images (each a 1-frame item). "
                  "Listings may name both.", flag="--kind")
    frame_extraction: Literal["uniform", "head", "chunk", "slide"] = setting(
        "uniform", "Items per clip. uniform: one, frames spread by --frame-sampling; head: one, from the first frame; "
                   "chunk: consecutive non-overlapping windows; slide: a window every --frame-stride frames. "
                   "Windows take every frame (or, with --frame-sampling fps, frames at --sample-fps).",
        flag="--frame-extraction")
    frame_stride: int | None = setting(None, "slide: frames from one window's start to the next's (in the frames "
                                             "taken).", flag="--frame-stride", low=1)
    caption_extension: str = setting(".txt", "Folder layout: the extension of the caption file beside each clip.",
                                     flag="--caption-extension")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.dataset_file is not None and Path(self.dataset_file).suffix.lower() not in (".csv", ".json", ".jsonl"):
            raise ConfigError(f"dataset file {self.dataset_file} must be .csv, .json or .jsonl")
        if self.frame_extraction == "slide" and self.frame_stride is None:
            raise ConfigError("frame_extraction 'slide' needs frame_stride (--frame-stride)")
        if self.frame_extraction != "slide" and self.frame_stride is not None:
            raise ConfigError(f"frame_stride applies to frame_extraction 'slide', not '{self.frame_extraction}'")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(f"caption_extension '{self.caption_extension}' must start with a dot, e.g. .txt")


@dataclasses.dataclass(frozen=True)
class Problem:
    code: str
    severity: Severity
    message: str
    path: str | None = None  # the file the problem is about: a clip, an image, or the listing itself
    line: int | None = None  # 1-based line (or table row) of `source` that names it
    source: str | None = None  # the listing file: prompts.txt, videos.txt, metadata.csv, clip.txt

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "path": self.path, "line": self.line, "message": self.message,
                "source": self.source}

    def located(self) -> str:
        """`source:line: path: message`, the form editors and terminals make clickable."""
        parts = []
        if self.source is not None:
            parts.append(f"{self.source}:{self.line}" if self.line is not None else self.source)
        if self.path is not None and self.path != self.source:
            parts.append(self.path)
        return ": ".join([*parts, self.message])


@dataclasses.dataclass(frozen=True)
class Entry:
    """One training item as the dataset files describe it."""

    index: int
    caption: str
    video: Path  # absolute
    video_ref: str  # as written in the dataset
    source: str  # the listing that names the video (relative to the root)
    line: int | None  # its 1-based line or row there
    image: Path | None = None
    image_ref: str | None = None
    image_source: str | None = None
    caption_source: str | None = None  # where the caption text lives (for caption problems)

    def caption_with(self, id_token: str | None) -> str:
        return f"{id_token} {self.caption}" if id_token else self.caption

    @property
    def still(self) -> bool:
        """Whether the entry's media is a still image (a 1-frame item) rather than a video."""
        return self.video.suffix.lower() in IMAGE_EXTENSIONS


def decode_text(data: bytes) -> str:
    """UTF-8 with or without BOM (or UTF-16 with its BOM, Windows Notepad's "Unicode"), any line ending,
    as one string with `\\n` line ends."""
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    text = data.decode("utf-16") if utf16 else data.decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def encoding_problem(exc: UnicodeDecodeError) -> str:
    """Where a text file stops being UTF-8 (Latin-1 or Windows-1252 text, say), for a one-line error."""
    line = bytes(exc.object[: exc.start]).count(b"\n") + 1
    return f"not UTF-8 text (line {line}, byte {exc.start}); save it as UTF-8"


def read_text_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (BOM and CR stripped, trailing blank lines dropped).

    A folder where a file is expected is a `DataError` naming it (every caller's files come from the user).
    """
    if Path(path).is_dir():
        raise DataError(f"{path} is a folder, not a text file")
    lines = decode_text(Path(path).read_bytes()).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def resolve_entry_path(root: Path, reference: str, allow_outside_root: bool) -> tuple[Path, str | None]:
    """The absolute path of `reference`, and an error code when it breaks the root rule.

    Windows separators (`videos\\a.mp4`, from datasets made on Windows) are read as `/` when the
    literal name does not exist.
    """
    if "\\" in reference and not (root / reference).exists():
        reference = reference.replace("\\", "/")
    candidate = Path(reference).expanduser() if reference.startswith("~") else Path(reference)
    if candidate.is_absolute():
        return candidate, None if allow_outside_root else "absolute-path"
    normalized_root = Path(os.path.normpath(root.absolute()))
    resolved = Path(os.path.normpath(normalized_root / candidate))
    if not resolved.is_relative_to(normalized_root):
        return resolved, None if allow_outside_root else "path-outside-root"
    # A symlink inside the root may still lead outside it.
    if not allow_outside_root and resolved.exists() and not resolved.resolve().is_relative_to(normalized_root.resolve()):
        return resolved, "path-outside-root"
    return resolved, None


def _root_message(code: str, reference: str) -> str:
    if code == "absolute-path":
        return f"absolute path '{reference}': paths must be relative to the data root (--allow-outside-root accepts it)"
    return f"'{reference}' leads outside the data root (--allow-outside-root accepts it)"


@dataclasses.dataclass(frozen=True)
class _Row:
    """One record of any layout, before paths are resolved."""

    caption: str | None
    video: str | None
    image: str | None
    source: str
    line: int | None
    caption_source: str
    image_source: str | None


def read_entries(config: DatasetConfig) -> tuple[list[Entry], list[Problem]]:
    """The dataset's entries and the structural problems found while reading its files."""
    root = Path(config.root).expanduser()
    if not root.is_dir():
        return [], [Problem("missing-root", "error", "data root is not a folder", str(root))]
    problems: list[Problem] = []
    if config.dataset_file is not None:
        rows = _read_table(root, config, problems)
    elif _uses_line_files(root, config):
        rows = _read_line_files(root, config, problems)
    else:
        rows = _read_clip_folder(root, config, problems)
    if rows is None:
        return [], problems
    entries = _resolve_rows(root, rows, config, problems)
    if config.kind == "images":
        for entry in [e for e in entries if not e.still]:
            problems.append(Problem("not-an-image", "error", f"kind is 'images' but '{entry.video_ref}' is not an "
                                    f"image ({', '.join(IMAGE_EXTENSIONS)})", entry.video_ref, entry.line,
                                    entry.source))
        entries = [e for e in entries if e.still]
    if not rows and not problems:
        problems.append(Problem("empty-dataset", "error", "the dataset lists no entries", str(root)))
    _check_swapped_columns(rows, problems)
    return entries, problems


def _uses_line_files(root: Path, config: DatasetConfig) -> bool:
    custom = (config.caption_column, config.video_column) != (DEFAULT_CAPTION_FILE, DEFAULT_VIDEO_FILE)
    return custom or (root / config.caption_column).exists() or (root / config.video_column).exists()


def _read_line_files(root: Path, config: DatasetConfig, problems: list[Problem]) -> list[_Row] | None:
    def read(column: str, code: str) -> list[str] | None:
        path = root / column
        if not path.is_file():
            problems.append(Problem(code, "error", f"{column} not found in the data root", column, source=column))
            return None
        try:
            return read_text_lines(path)
        except UnicodeDecodeError as exc:
            problems.append(Problem("bad-encoding", "error", encoding_problem(exc), column,
                                    source=column))
            return None

    captions = read(config.caption_column, "missing-caption-file")
    videos = read(config.video_column, "missing-video-file")
    images = read(config.image_column, "missing-image-file") if config.image_column else None
    if captions is None or videos is None or (config.image_column and images is None):
        return None
    for other, label, column in ((captions, "captions", config.caption_column),
                                 (images, "images", config.image_column)):
        if other is not None and len(other) != len(videos):
            longer = column if len(other) > len(videos) else config.video_column
            problems.append(Problem(
                "count-mismatch", "error",
                f"{len(other)} {label} in {column} but {len(videos)} videos in {config.video_column}",
                longer, min(len(other), len(videos)) + 1, longer,
            ))
    rows = []
    for position in range(min(len(captions), len(videos))):
        # A line missing from a short image file is already a count mismatch: no second error for it.
        has_image = images is not None and position < len(images)
        rows.append(_Row(captions[position], videos[position], images[position] if has_image else None,
                         config.video_column, position + 1, config.caption_column,
                         config.image_column if has_image else None))
    return rows


def _pick_column(columns: list[str], wanted: str | None, aliases: tuple[str, ...], default: str | None,
                 source: str, kind: str, problems: list[Problem], required: bool) -> str | None:
    if wanted is not None and wanted != default:
        if wanted in columns:
            return wanted
        problems.append(Problem("missing-column", "error",
                                f"no {kind} column '{wanted}' (columns: {', '.join(columns) or 'none'})", source,
                                source=source))
        return None
    lowered = {c.lower(): c for c in columns}
    for alias in aliases:
        if alias in lowered:
            return lowered[alias]
    if required:
        problems.append(Problem("missing-column", "error",
                                f"no {kind} column (looked for {', '.join(aliases[:4])}; columns: "
                                f"{', '.join(columns) or 'none'}); name it with --{kind}-column", source,
                                source=source))
    return None


def _table_records(path: Path, name: str, problems: list[Problem]) -> list[tuple[int, dict[str, Any]]] | None:
    """(row number, record) pairs of a CSV/JSON/JSONL file; the row is the CSV line or JSON position."""
    try:
        text = decode_text(path.read_bytes())
    except UnicodeDecodeError as exc:
        problems.append(Problem("bad-encoding", "error", encoding_problem(exc), name, source=name))
        return None
    suffix = path.suffix.lower()
    records: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        start = 2  # the header is line 1; a quoted field may span lines, so track where each record starts
        try:
            for record in reader:
                if any((value or "").strip() for value in record.values() if isinstance(value, str)):
                    records.append((start, record))
                start = reader.line_num + 1
        except csv.Error as exc:
            problems.append(Problem("bad-dataset-file", "error", f"CSV error: {exc}", name, reader.line_num, name))
            return None
        return records
    if suffix == ".jsonl":
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem("bad-dataset-file", "error", f"invalid JSON: {exc.msg}", name, number, name))
                continue
            if not isinstance(record, dict):
                problems.append(Problem("bad-dataset-file", "error", "expected a JSON object", name, number, name))
                continue
            records.append((number, record))
        return records
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(Problem("bad-dataset-file", "error", f"invalid JSON: {exc.msg} (line {exc.lineno})", name,
                                source=name))
        return None
    if not isinstance(document, list):
        problems.append(Problem("bad-dataset-file", "error", "expected a JSON list of objects", name, source=name))
        return None
    for number, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            problems.append(Problem("bad-dataset-file", "error", "expected a JSON object", name, number, name))
            continue
        records.append((number, record))
    return records


def _read_table(root: Path, config: DatasetConfig, problems: list[Problem]) -> list[_Row] | None:
    assert config.dataset_file is not None
    given = Path(config.dataset_file)
    # Relative names are looked up in the data root first, then in the working directory.
    candidates = [given] if given.is_absolute() else [root / given, given]
    path = next((c for c in candidates if c.is_file()), candidates[0])
    name = config.dataset_file
    if not path.is_file():
        problems.append(Problem("missing-dataset-file", "error", f"{name} not found", name, source=name))
        return None
    records = _table_records(path, name, problems)
    if records is None:
        return None
    columns: list[str] = []
    for _, record in records:
        columns += [key for key in record if key not in columns]
    caption_key = _pick_column(columns, config.caption_column, _CAPTION_ALIASES, DEFAULT_CAPTION_FILE, name,
                               "caption", problems, required=True)
    video_key = _pick_column(columns, config.video_column, _VIDEO_ALIASES, DEFAULT_VIDEO_FILE, name, "video",
                             problems, required=True)
    image_key = None
    if config.image_column is not None:
        image_key = _pick_column(columns, config.image_column, _IMAGE_ALIASES, None, name, "image", problems,
                                 required=True)
    if caption_key is None or video_key is None or (config.image_column is not None and image_key is None):
        return None

    def cell(record: dict[str, Any], key: str | None) -> str | None:
        if key is None or record.get(key) is None:
            return None
        return str(record[key])

    return [_Row(cell(r, caption_key), cell(r, video_key), cell(r, image_key), name, number, name,
                 name if image_key else None) for number, r in records]


def _skip_reason(path: Path) -> str | None:
    """Why the folder layout does not take a video-named `path` as a clip (None: it does)."""
    if path.is_symlink() and not path.exists():
        return "skipped: a dangling symlink (its target does not exist)"
    if path.is_dir():
        return "skipped: a folder named like a video"
    if path.suffix.lower() == ".gif":
        return ("skipped: the folder layout does not take GIFs (often previews); "
                "list it in videos.txt or a --dataset-file to train on it")
    if not path.is_file():
        return "skipped: not a regular file"
    return None


def _read_clip_folder(root: Path, config: DatasetConfig, problems: list[Problem]) -> list[_Row] | None:
    clips = []
    extensions = IMAGE_EXTENSIONS if config.kind == "images" else (*VIDEO_EXTENSIONS, ".gif")
    for path in sorted(root.rglob("*")):
        relative_parts = path.relative_to(root).parts
        if path.suffix.lower() not in extensions or any(p.startswith(".") for p in relative_parts):
            continue
        if config.kind == "images":
            reason = None if path.is_file() else "skipped: not a regular file (a folder or a dangling symlink)"
        else:
            reason = _skip_reason(path)
        if reason is None:
            clips.append(path)
        else:
            relative = path.relative_to(root).as_posix()
            problems.append(Problem("skipped-file", "warning", reason, relative, source=relative))
    if not clips:
        what = "images" if config.kind == "images" else "clips"
        problems.append(Problem(
            "no-dataset", "error",
            f"no dataset found: expected {DEFAULT_CAPTION_FILE} + {DEFAULT_VIDEO_FILE}, a --dataset-file, "
            f"or {what} with a same-named {config.caption_extension} caption beside each", str(root),
        ))
        return None
    rows = []
    for clip in clips:
        relative = clip.relative_to(root).as_posix()
        caption_file = clip.with_suffix(config.caption_extension)
        caption_ref = caption_file.relative_to(root).as_posix()
        if not caption_file.is_file():
            problems.append(Problem("missing-caption", "error", f"no caption file {caption_ref} beside the clip",
                                    relative, source=relative))
            continue
        try:
            caption = " ".join(line.strip() for line in read_text_lines(caption_file) if line.strip())
        except UnicodeDecodeError as exc:
            problems.append(Problem("bad-encoding", "error", encoding_problem(exc), caption_ref,
                                    source=caption_ref))
            continue
        rows.append(_Row(caption, relative, None, relative, None, caption_ref, None))
    return rows


def _control_character(text: str) -> str | None:
    """The first control character (NUL, escape, ...) in `text`; tabs and line breaks (a quoted CSV field) are fine."""
    return next((char for char in text if char not in "\t\n\r" and unicodedata.category(char) == "Cc"), None)


def _resolve_rows(root: Path, rows: list[_Row], config: DatasetConfig, problems: list[Problem]) -> list[Entry]:
    entries: list[Entry] = []
    for row in rows:
        caption = (row.caption or "").strip()
        video_ref = (row.video or "").strip()
        if not caption:
            problems.append(Problem("empty-caption", "error", "caption is empty", row.caption_source, row.line,
                                    row.caption_source))
        elif _control_character(caption) is not None:
            problems.append(Problem("control-characters", "error",
                                    f"caption holds the control character {_control_character(caption)!r} (a binary "
                                    "or mis-encoded file?)", row.caption_source, row.line, row.caption_source))
        elif is_placeholder_caption(caption):
            problems.append(Problem("placeholder-caption", "error",
                                    f"caption is the placeholder {CAPTION_PLACEHOLDER!r} that `dataset prepare` "
                                    "wrote: write the caption", row.caption_source, row.line, row.caption_source))
        if not video_ref:
            problems.append(Problem("empty-path", "error", "video path is empty", row.source, row.line, row.source))
            continue
        video, code = resolve_entry_path(root, video_ref, config.allow_outside_root)
        if code is not None:
            problems.append(Problem(code, "error", _root_message(code, video_ref), video_ref, row.line, row.source))
            continue
        image = image_ref = None
        if row.image is not None:
            image_ref = row.image.strip()
            if not image_ref:
                problems.append(Problem("empty-path", "error", "image path is empty", row.image_source, row.line,
                                        row.image_source))
                continue
            image, code = resolve_entry_path(root, image_ref, config.allow_outside_root)
            if code is not None:
                problems.append(Problem(code, "error", _root_message(code, image_ref), image_ref, row.line,
                                        row.image_source))
                continue
        elif config.image_column is not None and row.image_source is not None:
            problems.append(Problem("empty-path", "error", "image path is missing", row.image_source, row.line,
                                    row.image_source))
            continue
        entries.append(Entry(len(entries), caption, video, video_ref, row.source, row.line, image, image_ref,
                             row.image_source, row.caption_source))
    return entries


def _check_swapped_columns(rows: list[_Row], problems: list[Problem]) -> None:
    """Captions that look like video paths (and the reverse) mean the columns were swapped."""
    if len(rows) < 2:
        return
    looks_like_path = sum(1 for r in rows if (r.caption or "").strip().lower().endswith(VIDEO_EXTENSIONS))
    if looks_like_path * 2 > len(rows):
        problems.append(Problem(
            "columns-swapped", "error",
            f"{looks_like_path} of {len(rows)} captions look like video paths; are the caption and video columns swapped?",
            rows[0].caption_source, source=rows[0].caption_source,
        ))
