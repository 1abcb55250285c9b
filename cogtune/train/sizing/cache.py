"""Estimates kept on disk, so that a repeated grid row or a training run's pre-flight check costs nothing.

An estimate depends on the run's settings, its clip shapes and validation shape, the model's
architecture and the code that traces it. The key is all of these: every setting of the `TrainConfig`
except those that change no tensor (`NOT_MEMORY_RELEVANT`: paths, seeds, learning-rate schedule,
logging, checkpoint cadence; a setting added later is in the key until it is listed here), the model's
configs (a local folder's as well as a preset's), the shapes, the cogtune, torch, diffusers and peft
versions, and a digest of cogtune's own sources (an edited estimator, or anything it runs, misses).
Entries are JSON files under `$COGTUNE_HOME/estimates/`, written atomically; one that cannot be read
is a miss. The cache only ever saves time: a failure to write it is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from cogtune.config import flatten_settings
from cogtune.errors import StorageError
from cogtune.train.config import TrainConfig
from cogtune.train.sizing.estimate import MemoryFigures, RunEstimate, Shape, model_spec

CACHE_FORMAT = 1
# Settings that change no tensor the estimate traces, by their dotted names.
NOT_MEMORY_RELEVANT = frozenset({
    "data", "output_dir", "random_weights", "seed", "steps", "resume", "overwrite", "report_to", "push_to_hub",
    "hub_private", "lora.save_format", "optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps",
    "optimizer.lr_schedule", "optimizer.warmup_steps", "validation.prompts", "validation.images", "validation.every",
    "validation.steps", "validation.seed", "validation.final", "checkpointing.every", "checkpointing.keep",
    "memory.profile", "memory.check",
})


def estimates_folder() -> Path:
    from cogtune.models.tiny import cogtune_home

    return cogtune_home() / "estimates"


def cached_estimate(config: TrainConfig, shapes: Sequence[Shape], validation_shape: Shape | None = None,
                    use_cache: bool = True, fsdp_gpus: int = 1) -> RunEstimate:
    """`estimate_run(config, shapes, validation_shape, fsdp_gpus=...)`, from the cache where it holds this
    estimate."""
    from cogtune.train.sizing import estimate  # looked up per call: tests record its calls

    sharded = {"fsdp_gpus": fsdp_gpus} if fsdp_gpus != 1 else {}
    if not use_cache:
        return estimate.estimate_run(config, shapes, validation_shape, **sharded)
    key = estimate_key(config, shapes, validation_shape, fsdp_gpus)
    path = estimates_folder() / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"
    found = _read(path, key, config, shapes, validation_shape)
    if found is not None:
        return found
    result = estimate.estimate_run(config, shapes, validation_shape, **sharded)
    _write(path, key, result)
    return result


def estimate_key(config: TrainConfig, shapes: Sequence[Shape], validation_shape: Shape | None,
                 fsdp_gpus: int = 1) -> str:
    """Everything an estimate depends on, as one canonical JSON text."""
    spec = model_spec(config.model)
    document = {
        "format": CACHE_FORMAT,
        "settings": {name: value for name, value in flatten_settings(config).items()
                     if name not in NOT_MEMORY_RELEVANT},
        "model": {field.name: getattr(spec, field.name) for field in dataclasses.fields(spec) if field.name != "name"},
        "shapes": [list(shape) for shape in shapes], "validation_shape": list(validation_shape) if validation_shape
        else None, "versions": _versions(),
    }
    if fsdp_gpus != 1:  # one GPU's share of a sharded run (one process: as keys were before)
        document["fsdp_gpus"] = fsdp_gpus
    return json.dumps(document, sort_keys=True, default=dict)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import version  # not importing diffusers and peft: a hit costs no import of theirs

    import torch

    import cogtune
    from cogtune import __version__

    sources = hashlib.sha256()
    root = Path(cogtune.__file__).parent
    for path in sorted(root.rglob("*.py")):
        sources.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return {"cogtune": __version__, "sources": sources.hexdigest(), "torch": torch.__version__,
            "diffusers": version("diffusers"), "peft": version("peft")}


def _read(path: Path, key: str, config: TrainConfig, shapes: Sequence[Shape],
          validation_shape: Shape | None) -> RunEstimate | None:
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key:
            return None
        saved = dict(entry["estimate"])
        if set(saved) != set(_SAVED_FIELDS):  # written by a version with other fields
            return None
        saved["shape"], saved["memory"] = tuple(saved["shape"]), MemoryFigures(**saved["memory"])
        return RunEstimate(config=config, shapes=tuple(shapes), validation_shape=validation_shape, **saved)
    except (OSError, ValueError, KeyError, TypeError):  # absent, partly written by an old version, unreadable
        return None


def _write(path: Path, key: str, result: RunEstimate) -> None:
    from cogtune.fsutil import atomic_write_text

    saved = {name: getattr(result, name) for name in _SAVED_FIELDS}
    saved["shape"], saved["memory"] = list(result.shape), dataclasses.asdict(result.memory)
    try:
        atomic_write_text(path, json.dumps({"key": key, "estimate": saved}))
    except (OSError, StorageError):  # a read-only or full home: the estimate still stands
        pass


# What an entry keeps: every field of an estimate but those the caller gives (the run's config and shapes).
_SAVED_FIELDS = tuple(field.name for field in dataclasses.fields(RunEstimate)
                      if field.name not in ("config", "shapes", "validation_shape"))
