"""Benchmark rows: a grid description that produces the runs (`TrainConfig`s) to size or measure.

A `BenchCase` is one run at its clip shapes; `grid` varies a base run along the axes given
(`--rank 16,64`, `--optimizer ...`) with `replace_settings`, so every combination passes the
run's own rules (`TrainConfig`'s checks) and a combination those rules refuse is left out.
`bench_cases` is a `BenchConfig`'s grid: its base run, the clip shapes, whether it validates.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cogtune.bench.config import BenchConfig
from cogtune.config import load_config, read_toml, replace_settings
from cogtune.data.clips import Bucket
from cogtune.encode.cache import MANIFEST_NAME, VideoLatentCache
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
    "base_weights": "memory.base_weights",
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
            changes["task"] = _task(str(changes["model"]))
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


def base_run(bench: BenchConfig) -> TrainConfig:
    """The run the grid varies: the run's TOML, else the defaults (with random weights: nothing downloaded).

    The TOML is read as `cogtune train --config` reads it, bench's options in the place of train's
    flags and with the same precedence: `--data` wins over the file, as each axis given does in
    every row (`grid`); where the file is silent on the model, the grid's first one fills it in.
    """
    first_model = bench.models[0] if bench.models else None
    if bench.run_config is None:
        model = first_model or "cogvideox-5b"
        return TrainConfig(task=_task(model), model=model, data=bench.data or "<bench>", output_dir="<bench>",
                           random_weights=True)
    given = read_toml(bench.run_config)
    overrides = {
        "random_weights": True,
        "output_dir": None if "output_dir" in given else "<bench>",
        "data": bench.data or (None if "data" in given else "<bench>"),
    }
    if first_model is not None and "model" not in given:
        overrides["model"] = first_model
        overrides["task"] = None if "task" in given else _task(first_model)
    return load_config(TrainConfig, bench.run_config, overrides)


def _task(model: str) -> str:
    return "i2v" if model_spec(model).is_i2v else "t2v"


def bench_cases(bench: BenchConfig) -> list[BenchCase]:
    """The rows of `bench`: its base run varied along its axes, at the clip shapes it names (`--shape`),
    else the cache's buckets, else each model's default clip."""
    base = base_run(bench)
    cache = VideoLatentCache(base.data) if (Path(base.data) / MANIFEST_NAME).is_file() else None
    if bench.shapes:
        shape_sets = [(Bucket.parse(s).shape,) for s in bench.shapes]
    elif cache is not None:
        shape_sets = [tuple(cache.bucket_shapes)]
    else:
        shape_sets = None
    validation = bench.validation
    if validation and bench.run_config is not None:  # as that run validates
        prompts = base.validation.prompts or (tuple(cache.validation_prompts) if cache is not None else ())
        validation = bool(prompts) and (base.validation.every > 0 or base.validation.final)
    axes = {name: getattr(bench, name) for name in AXES}
    return grid(base, axes, shape_sets, validation)  # type: ignore[arg-type]
