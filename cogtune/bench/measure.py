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
    device: str
    memory_gib: dict[str, float]  # the four moments: peak reserved on a GPU, peak RSS on a CPU
    allocated_peak_gib: float | None
    seconds_per_step: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"case": dataclasses.asdict(self.case), "label": self.case.label, "device": self.device,
                "memory_gib": self.memory_gib, "allocated_peak_gib": self.allocated_peak_gib,
                "seconds_per_step": None if self.seconds_per_step is None else round(self.seconds_per_step, 3)}


def measure_case(case: BenchCase, steps: int = 4, workdir: str | Path | None = None) -> CaseMeasurement:
    from cogtune.bench.synthetic import VALIDATION_PROMPT, write_synthetic_cache
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import CheckpointConfig, LoraConfig, MemoryConfig, OptimizerConfig, ValidationConfig

    spec = case.spec
    with tempfile.TemporaryDirectory(prefix="cogtune-measure-", dir=workdir) as tmp:
        root = Path(tmp)
        cache = write_synthetic_cache(spec, case.shape, items=max(2, case.batch_size), root=root / "cache")
        images: tuple[str, ...] = ()
        if spec.is_i2v:
            from PIL import Image

            frames, height, width = case.shape
            Image.new("RGB", (width, height)).save(root / "image.png")
            images = (str(root / "image.png"),)
        config = TrainConfig(
            task="i2v" if spec.is_i2v else "t2v", model=case.model, data=str(cache), output_dir=str(root / "run"),
            random_weights=not spec.tiny, full=case.method == "full", steps=steps, batch_size=case.batch_size,
            gradient_checkpointing=case.gradient_checkpointing, lora=LoraConfig(rank=case.rank),
            optimizer=OptimizerConfig(name=case.optimizer),
            memory=MemoryConfig(fp8_weights=case.fp8, offload_blocks=case.offload_blocks,
                                offload_activations=case.offload_activations),
            validation=ValidationConfig(prompts=(VALIDATION_PROMPT,) if case.validation else (), images=images,
                                        steps=2, final=case.validation),
            checkpointing=CheckpointConfig(every=0),
        )
        run_training(config)
        memory = json.loads((root / "run" / "memory.json").read_text())
        summary = json.loads((root / "run" / "training_summary.json").read_text())
    first = next(iter(memory.values()))
    gpu = "max_reserved_gib" in first
    key = "max_reserved_gib" if gpu else "max_rss_gib"
    figures = {moment.removeprefix("memory_"): values[key] for moment, values in memory.items()}
    for moment in ("before_validation", "after_validation"):  # no validation: the training peak stands in
        figures.setdefault(moment, figures["after_testing"])
    step_times = summary.get("step_seconds", [])[1:]
    return CaseMeasurement(
        case=case, device=first["device"], memory_gib=figures,
        allocated_peak_gib=memory["memory_after_testing"].get("max_allocated_gib") if gpu else None,
        seconds_per_step=statistics.median(step_times) if step_times else None,
    )
