"""Benchmark rows: a grid description that produces the runs (`TrainConfig`s) to size or measure.

A `BenchCase` is one run at its clip shapes; `grid` varies a base run along the axes given
(`--rank 16,64`, `--optimizer ...`) with `replace_settings`, so every combination passes the
run's own rules (`TrainConfig`'s checks) and a combination those rules refuse is left out.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from cogtune.config import replace_settings
from cogtune.errors import ConfigError
from cogtune.train.config import TrainConfig
from cogtune.train.sizing.estimate import Shape, largest_shape, model_spec, run_label
from cogtune.train.validation import first_video_bucket, validation_shape_from

# Grid axes: the bench option, and the run setting it varies.
AXES = {
    "models": "model",
    "methods": "full",
    "ranks": "lora.rank",
    "optimizers": "optimizer.name",
    "gradient_checkpointing": "gradient_checkpointing",
    "batch_sizes": "batch_size",
    "fp8": "memory.fp8_weights",
    "offload_blocks": "memory.offload_blocks",
    "offload_activations": "memory.offload_activations",
}


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One row of a memory table: a run and the clip shapes it trains (the largest decides its peak)."""

    config: TrainConfig
    shapes: tuple[Shape, ...]
    validation_shape: Shape | None

    @property
    def label(self) -> str:
        return run_label(self.config, largest_shape(model_spec(self.config.model), self.shapes))


def parse_list(text: str | None, kind: type, name: str) -> list:
    """`"16,64,256"` -> [16, 64, 256]; `"on,off"` -> [True, False] for booleans."""
    if text is None:
        return []
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if kind is bool:
            if item.lower() not in ("on", "off", "true", "false", "yes", "no"):
                raise ConfigError(f"--{name}: '{item}' is not on or off")
            values.append(item.lower() in ("on", "true", "yes"))
        else:
            try:
                values.append(kind(item))
            except ValueError as exc:
                raise ConfigError(f"--{name}: '{item}' is not a {kind.__name__}") from exc
    return values


def grid(base: TrainConfig, axes: dict[str, Sequence[Any]], shape_sets: Sequence[tuple[Shape, ...]] | None,
         validation: bool) -> list[BenchCase]:
    """Every combination of the given axes over `base` (an empty axis keeps the base run's value).

    `shape_sets`: one row per set of clip shapes (a cache's buckets, or one `--shape`); None: each
    model's default clip. `validation`: whether the runs render validation videos (at the shape the
    trainer would use).
    """
    names = [name for name in AXES if axes.get(name)]
    cases = []
    for values in itertools.product(*(axes[name] for name in names)):
        changes = {AXES[name]: value for name, value in zip(names, values)}
        if "full" in changes:
            changes["full"] = changes["full"] == "full"
        if "model" in changes:
            changes["task"] = "i2v" if model_spec(str(changes["model"])).is_i2v else "t2v"
        try:
            config = replace_settings(base, changes)
        except ConfigError:
            continue  # a combination the run's own rules refuse (e.g. fp8 storage with full fine-tuning)
        if config.full and "lora.rank" in changes and changes["lora.rank"] != axes["ranks"][0]:
            continue  # the rank does not apply to full fine-tuning: one row
        spec = model_spec(config.model)
        for run_shapes in shape_sets or [((spec.default_frames, spec.default_height, spec.default_width),)]:
            validation_shape = validation_shape_from(config, first_video_bucket(run_shapes)) if validation else None
            cases.append(BenchCase(config, tuple(run_shapes), validation_shape))  # type: ignore[arg-type]
    return list(dict.fromkeys(cases))
