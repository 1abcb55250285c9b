"""The held-out items: which items a run scores its LoRA on and keeps out of training, decided before weights load.

`--eval-split FRACTION` holds out that share of the cache's items (picked from the run's seed); `--eval-data
CACHE` scores on another cache's items instead, and trains on all of `--data`. The run records the held-out
items by id (their cache file) in `RunFolder.heldout_items`; a resumed run reads them back from there, so it
keeps the split it started with, and a resume whose split setting differs is refused. Held-out items get a
weight of 0 in the batch schedule (`BatchSchedule.for_cache`): they never come in a training batch.

Without held-out items, the run still measures the LoRA's effect (`cogtune.train.evaluation`) on a few
training items, the probe: no loss is reported for them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from cogtune import report
from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import ConfigError, DataError
from cogtune.fsutil import atomic_write_text
from cogtune.models.registry import ModelSpec
from cogtune.train.config import TrainConfig
from cogtune.train.run_folder import RunFolder
from cogtune.train.step import derive_seed

PROBE_ITEMS = 1  # training items the LoRA's effect is measured on when nothing is held out


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The items evaluation scores: `indices` into `cache` (the training cache, or `--eval-data`'s)."""

    cache: VideoLatentCache
    indices: tuple[int, ...]
    excluded: frozenset[int]  # items of the training cache kept out of training
    held_out: bool  # False: a probe of training items, for the effect only (no held-out loss)

    def item_id(self, index: int) -> str:
        """An item's id: its file in its cache (stable across runs and resumes of the same cache)."""
        return str(self.cache.items[index]["latent_file"])


def _check_apart(training: VideoLatentCache, held_out: VideoLatentCache) -> None:
    """`--eval-data` must hold no clip `--data` trains on: none of the same source files (encoded at any size)
    and none of the same latents (a copy of a clip, encoded alike)."""

    def identities(cache: VideoLatentCache) -> dict[str, str]:
        root = Path(cache.manifest.get("dataset", {}).get("root") or cache.root)
        found = {}
        for item in cache.items:
            found[f"file {(root / item['video']).resolve()}"] = item["video"]
            digest = item.get("integrity", {}).get(item["latent_file"], {}).get("sha256")
            if digest:
                found[f"latents {digest}"] = item["video"]
        return found

    ours, theirs = identities(held_out), identities(training)
    shared = sorted({ours[key] for key in ours.keys() & theirs.keys()})
    if shared:
        raise ConfigError(f"--eval-data {held_out.root} holds {report.plural(len(shared), 'clip')} that --data "
                          f"{training.root} trains on too (e.g. {shared[0]}): its loss would not be held out",
                          hint="give --eval-data a cache of other clips, or use --eval-split")


def plan_held_out(config: TrainConfig, spec: ModelSpec, cache: VideoLatentCache, resuming: bool) -> HeldOut:
    """The run's held-out items (checked before any weight loads); a resumed run's are the ones it recorded."""
    evaluation = config.evaluation
    if evaluation.data:
        other = VideoLatentCache(evaluation.data)
        other.check_compatible(spec, needs_image_latents=config.task == "i2v")
        spec.check_clip_shapes({f"--eval-data bucket {bucket}": shape
                                for bucket, shape in zip(other.buckets, other.bucket_shapes)})
        _check_apart(cache, other)
        held = HeldOut(other, tuple(range(len(other))), frozenset(), held_out=True)
    elif evaluation.split:
        held = _split(cache, evaluation.split, config.seed)
    else:
        held = HeldOut(cache, tuple(range(min(PROBE_ITEMS, len(cache)))), frozenset(), held_out=False)
    record = read_record(RunFolder.of(config).heldout_items) if resuming else None
    if resuming:
        _check_same_split(config, record)
    if record is not None and held.held_out:
        held = dataclasses.replace(held, indices=_recorded_indices(held.cache, record))
        if not evaluation.data:
            held = dataclasses.replace(held, excluded=frozenset(held.indices))
    return held


def _split(cache: VideoLatentCache, fraction: float, seed: int) -> HeldOut:
    count = max(1, round(fraction * len(cache)))
    if count >= len(cache):
        raise ConfigError(f"--eval-split {fraction:g} holds out {count} of the cache's {len(cache)} items, leaving "
                          "none to train on", hint="lower --eval-split, or give a held-out cache with --eval-data")
    picked = sorted(random.Random(derive_seed(seed, "eval-split")).sample(range(len(cache)), count))
    return HeldOut(cache, tuple(picked), frozenset(picked), held_out=True)


def _setting(config: TrainConfig) -> dict[str, Any]:
    """The split setting a record keeps and a resume must repeat."""
    return {"split": config.evaluation.split, "data": config.evaluation.data}


def _describe(setting: dict[str, Any]) -> str:
    if setting.get("data"):
        return f"--eval-data {setting['data']}"
    return f"--eval-split {setting['split']:g}" if setting.get("split") else "no held-out items"


def _check_same_split(config: TrainConfig, record: dict[str, Any] | None) -> None:
    """A resumed run keeps its split: the same held-out setting, and the items it recorded."""
    theirs = {key: record.get(key) for key in ("split", "data")} if record else {"split": 0.0, "data": None}
    ours = _setting(config)
    if (theirs["data"] or None, float(theirs["split"] or 0)) != (ours["data"] or None, float(ours["split"] or 0)):
        raise ConfigError(f"the run being resumed trained with {_describe(theirs)}, this resume asks for "
                          f"{_describe(ours)}: a run keeps its held-out items", hint=f"resume with {_describe(theirs)}"
                          if theirs["data"] or theirs["split"] else "resume without --eval-split/--eval-data")


def _recorded_indices(cache: VideoLatentCache, record: dict[str, Any]) -> tuple[int, ...]:
    by_id = {str(item["latent_file"]): index for index, item in enumerate(cache.items)}
    ids = [str(item.get("id")) for item in record.get("items", []) if isinstance(item, dict)]
    missing = [item_id for item_id in ids if item_id not in by_id]
    if missing or not ids:
        raise DataError(f"the run's held-out items are not in {cache.root} ({missing[0] if missing else 'none recorded'})",
                        hint="resume with the cache the run started with")
    return tuple(by_id[item_id] for item_id in ids)


def read_record(path: Path) -> dict[str, Any] | None:
    """A run's held-out record (`RunFolder.heldout_items`), or None when there is none."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc})", hint="resume with the file the run wrote") from exc
    if not isinstance(record, dict) or not isinstance(record.get("items"), list):
        raise DataError(f"{path} is not a held-out record cogtune wrote")
    return record


def held_out_of_training(config: TrainConfig) -> int:
    """How many of the training cache's items the run in `config`'s folder held out (for the model card)."""
    try:
        record = read_record(RunFolder.of(config).heldout_items)
    except DataError:
        return 0
    return len(record["items"]) if record is not None and not record.get("data") else 0


def write_record(config: TrainConfig, held: HeldOut) -> None:
    """Record the held-out items by id (main process; a run without held-out items writes none)."""
    if not held.held_out:
        return
    items = [{"index": index, "id": held.item_id(index), "source": held.cache.describe_item(index)}
             for index in held.indices]
    record = {**_setting(config), "cache": str(held.cache.root), "items": items}
    atomic_write_text(RunFolder.of(config).heldout_items, json.dumps(record, indent=2) + "\n")
