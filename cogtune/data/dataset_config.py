"""A dataset config file: several data roots, mixed in one cache (`--dataset-config datasets.toml`).

Each `[[datasets]]` table is one data root, read exactly as `--data-root` reads one (line files, a
CSV/JSON/JSONL table, or a folder with a caption beside each clip or image), with the dataset
options of `DatasetConfig` as keys, plus `name`, `repeats` and `buckets`::

    [[datasets]]
    name = "walks"
    root = "data/walks"            # relative to this file's folder
    repeats = 3                    # each item is drawn 3 times per epoch
    frame_extraction = "slide"
    frame_stride = 16

    [[datasets]]
    root = "data/stills"
    kind = "images"                # each image trains as a 1-frame item

A table's unset options take the command's dataset options (`--resize-mode`, `[data]` in `--config`).
Every problem is one line naming the file and the line: an unknown key (with the closest known
one), a value of the wrong type, a root that is not a folder, two datasets of one name, and two
datasets that would give identical items (same root, same options: raise `repeats` instead).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any

from cogtune.config import _coerce, check_settings, field_types, read_toml, setting
from cogtune.data.dataset import DatasetConfig
from cogtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """One `[[datasets]]` table: where its items come from, their weight and the shapes they may take."""

    data: DatasetConfig
    name: str = setting("", "Name recorded with each item in the cache's manifest; default: the root folder's name.")
    repeats: int = setting(1, "Weight in the training schedule: each item is drawn this many times per epoch.", low=1)
    buckets: tuple[str, ...] = setting((), "This dataset's shapes FxHxW; default: the encode's buckets (for images, "
                                           "their 1xHxW).")
    origin: str = ""  # `datasets.toml:12`, where the table starts

    def __post_init__(self) -> None:
        check_settings(self)


_OWN_KEYS = ("name", "repeats", "buckets")
# Names other trainers' dataset configs use, and the setting that says it here.
# The names other trainers' dataset files use for the same settings, accepted as they are.
# `fps` (a dataset's target frame rate) also turns frame sampling by fps on, unless the table sets it.
KEY_ALIASES = {"fps": "sample_fps", "target_fps": "sample_fps", "stride": "frame_stride", "num_repeats": "repeats",
               "image_directory": "root", "video_directory": "root"}
_HEADER = re.compile(r"^\s*\[\[\s*datasets\s*\]\]")
_TABLE = re.compile(r"^\s*\[")


def _key_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")


class _Lines:
    """Line numbers of a TOML file's `[[datasets]]` tables and of the keys in them (tomllib gives none)."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.headers = [n for n, line in enumerate(self.lines, start=1) if _HEADER.match(line)]

    def top_level(self, key: str) -> int | None:
        pattern = _key_pattern(key)
        for number, line in enumerate(self.lines, start=1):
            if _TABLE.match(line):
                return None
            if pattern.match(line):
                return number
        return None

    def table(self, position: int) -> int | None:
        return self.headers[position] if position < len(self.headers) else None

    def key(self, position: int, key: str) -> int | None:
        start = self.table(position)
        if start is None:
            return None
        pattern = _key_pattern(key)
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if _TABLE.match(line):
                return None
            if pattern.match(line):
                return number
        return None


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def load_dataset_sources(path: str | Path, defaults: DatasetConfig | None = None) -> list[DatasetSource]:
    """The `[[datasets]]` of a dataset config file, each checked; `defaults` gives unset dataset options."""
    from cogtune.data.clips import Bucket  # numpy: kept out of the command line's imports
    from cogtune.errors import DataError

    path = Path(path)
    document = read_toml(path)
    lines = _Lines(path.read_text(encoding="utf-8-sig"))
    for key in document:
        if key != "datasets":
            close = difflib.get_close_matches(key, ["datasets"], n=1)
            suggestion = f" (did you mean '{close[0]}'?)" if close else " (a dataset config holds [[datasets]] tables)"
            raise ConfigError(f"{_where(path, lines.top_level(key))}: unknown setting '{key}'{suggestion}")
    tables = document.get("datasets")
    if not tables:
        raise ConfigError(f"{path}: no [[datasets]] table; each names a data root with `root = \"...\"`")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{_where(path, lines.top_level('datasets'))}: 'datasets' must be [[datasets]] tables")

    defaults = defaults or DatasetConfig()
    data_hints = field_types(DatasetConfig)
    own_hints = field_types(DatasetSource)
    known = [*_OWN_KEYS, *(f.name for f in dataclasses.fields(DatasetConfig))]
    sources: list[DatasetSource] = []
    seen_names: dict[str, str] = {}
    seen_items: dict[str, DatasetSource] = {}
    for position, table in enumerate(tables):
        header = lines.table(position)
        origin = _where(path, header)
        data_values: dict[str, Any] = {}
        own_values: dict[str, Any] = {}
        for written, value in table.items():
            at = _where(path, lines.key(position, written) or header)
            key = KEY_ALIASES.get(written, written)
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                suggestion = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{at}: unknown setting '{key}' in [[datasets]]{suggestion}")
            if key != written and key in table:
                raise ConfigError(f"{at}: '{written}' and '{key}' name the same setting; give one of them")
            hint = own_hints[key] if key in _OWN_KEYS else data_hints[key]
            coerced = _coerce(value, hint, f"{at}: {written}")
            (own_values if key in _OWN_KEYS else data_values)[key] = coerced
        if "sample_fps" in data_values and "frame_sampling" not in data_values:
            data_values["frame_sampling"] = "fps"  # a target frame rate given is a frame rate to sample at
        root_text = data_values.pop("root", "")
        if not root_text:
            raise ConfigError(f"{origin}: this [[datasets]] table needs a root (`root = \"data/clips\"`)")
        root = Path(root_text).expanduser()
        root = root if root.is_absolute() else path.parent / root
        root_at = _where(path, lines.key(position, "root") or header)
        if not root.is_dir():
            raise ConfigError(f"{root_at}: root '{root_text}' is not a folder ({root.absolute()})")
        try:
            data = dataclasses.replace(defaults, root=str(root.resolve()), **data_values)
            source = DatasetSource(data=data, origin=origin, **{"name": root.resolve().name, **own_values})
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc.message}", exc.hint) from exc
        for bucket_text in source.buckets:
            try:
                bucket = Bucket.parse(bucket_text)
            except DataError as exc:
                raise ConfigError(f"{_where(path, lines.key(position, 'buckets') or header)}: {exc.message}") from exc
            if data.kind == "images" and bucket.frames != 1:
                raise ConfigError(f"{_where(path, lines.key(position, 'buckets') or header)}: bucket {bucket_text} "
                                  "has several frames; a dataset of images takes 1xHxW buckets")
        identity = items_identity(source)
        if identity in seen_items:
            first = seen_items[identity]
            raise ConfigError(f"{origin}: dataset '{source.name}' gives the same items as '{first.name}' "
                              f"({first.origin}): same root and options",
                              hint="list it once and raise its `repeats` to weight it more")
        seen_items[identity] = source
        if source.name in seen_names:
            raise ConfigError(f"{origin}: dataset name '{source.name}' is already used ({seen_names[source.name]}); "
                              "give each [[datasets]] its own `name`")
        seen_names[source.name] = origin
        sources.append(source)
    return sources


def items_identity(source: DatasetSource) -> str:
    """What decides a dataset's items: its root and every option, not its name or weight."""
    return json.dumps({"data": dataclasses.asdict(source.data), "buckets": sorted(source.buckets)}, sort_keys=True)
