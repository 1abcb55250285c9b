"""`bench memory --measure`: the same configurations, trained for real on the present accelerator.

Each case runs `cogtune.train.run_training` with random weights (`--random-weights`, nothing
downloaded) on a synthetic cache of the case's clip shape for a few steps and a validation pass,
and reads back what the trainer itself records: the four memory moments (`memory.json`, peak
reserved and allocated) and the per-step times (the first step, which includes warm-up, is left out).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from cogtune.bench.cases import BenchCase


@dataclasses.dataclass(frozen=True)
class CaseMeasurement:
    case: BenchCase
    shape: tuple[int, int, int]  # the clip shape it trained
    device: str
    memory_gib: dict[str, float]  # the four moments: peak reserved on a GPU, peak RSS on a CPU
    allocated_peak_gib: float | None
    seconds_per_step: float | None
    # a GPU run's host side at its end: peak RSS, and torch's pinned allocator's peak where torch reports it
    host_gib: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        from cogtune.train.sizing.estimate import run_summary

        return {"case": run_summary(self.case.config, self.shape, self.case.validation_shape), "label": self.case.label,
                "device": self.device, "shape": list(self.shape),
                "memory_gib": self.memory_gib, "allocated_peak_gib": self.allocated_peak_gib,
                "seconds_per_step": None if self.seconds_per_step is None else round(self.seconds_per_step, 3),
                "host_gib": self.host_gib}


def measure_case(case: BenchCase, steps: int = 4, workdir: str | Path | None = None) -> CaseMeasurement:
    """Train `case.config` for `steps` steps (and its validation pass) at the case's largest clip shape."""
    from cogtune.bench.synthetic import VALIDATION_PROMPT, write_synthetic_cache
    from cogtune.config import replace_settings
    from cogtune.train import run_training
    from cogtune.train.run_folder import RunFolder
    from cogtune.train.sizing.estimate import largest_shape, model_spec

    spec = model_spec(case.config.model)
    shape = largest_shape(spec, case.shapes)
    with tempfile.TemporaryDirectory(prefix="cogtune-measure-", dir=workdir) as tmp:
        root = Path(tmp)
        run = RunFolder(root / "run")
        cache = write_synthetic_cache(spec, shape, items=max(2, case.config.batch_size), root=root / "cache")
        images: tuple[str, ...] = ()
        validating = case.validation_shape is not None
        if spec.is_i2v and validating:
            from PIL import Image

            _, height, width = case.validation_shape  # type: ignore[misc]
            Image.new("RGB", (width, height)).save(root / "image.png")
            images = (str(root / "image.png"),)
        frames, height, width = case.validation_shape or shape
        config = replace_settings(case.config, {
            "data": str(cache), "output_dir": str(run.root), "random_weights": not spec.tiny, "steps": steps,
            "resume": None, "report_to": "none", "push_to_hub": None, "checkpointing.every": 0,
            "validation.prompts": (VALIDATION_PROMPT,) if validating else (), "validation.images": images,
            "validation.every": 0, "validation.steps": 2, "validation.final": validating,
            "validation.frames": frames, "validation.height": height, "validation.width": width,
        })
        run_training(config)
        memory = json.loads(run.memory.read_text())
        summary = json.loads(run.summary.read_text())
    first = next(iter(memory.values()))
    gpu = "max_reserved_gib" in first
    key = "max_reserved_gib" if gpu else "max_rss_gib"
    figures = {moment.removeprefix("memory_"): values[key] for moment, values in memory.items()}
    for moment in ("before_validation", "after_validation"):  # no validation: the training peak stands in
        figures.setdefault(moment, figures["after_testing"])
    step_times = summary.get("step_seconds", [])[1:]
    last = memory["memory_after_testing"]
    host = {key.removeprefix("max_"): last[key] for key in ("max_rss_gib", "max_pinned_gib") if key in last}
    return CaseMeasurement(
        case=case, shape=shape, device=first["device"], memory_gib=figures,
        allocated_peak_gib=last.get("max_allocated_gib") if gpu else None,
        seconds_per_step=statistics.median(step_times) if step_times else None,
        host_gib=host if gpu else None,
    )
