"""`cogtune bench memory`: a grid of configurations, estimated or measured, reported four ways."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch

from cogtune import report
from cogtune.bench import METHODS
from cogtune.bench.cases import AXES, BenchCase, grid
from cogtune.train.sizing.estimate import model_spec
from cogtune.config import setting, write_config
from cogtune.data.clips import Bucket
from cogtune.encode.cache import MANIFEST_NAME
from cogtune.errors import ConfigError
from cogtune.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    run_config: str | None = setting(None, "A run's TOML file, as `cogtune train --config` takes it: size exactly that run.")
    data: str | None = setting(None, "The run's cache: its buckets (the largest decides the peak) and validation prompts.")
    models: tuple[str, ...] = setting((), "Models to size; default: the run's, else cogvideox-5b.")
    methods: tuple[str, ...] = setting((), "lora and/or full; default: the run's (LoRA).")
    ranks: tuple[int, ...] = setting((), "LoRA ranks; default: the run's (64).")
    optimizers: tuple[str, ...] = setting((), "Optimizers; default: the run's (adamw).")
    gradient_checkpointing: tuple[bool, ...] = setting((), "Gradient checkpointing on and/or off; default: the run's.")
    batch_sizes: tuple[int, ...] = setting((), "Batch sizes; default: the run's (1).")
    shapes: tuple[str, ...] = setting((), "Clip shapes FxHxW, one row each; default: the cache's buckets, else the "
                                          "model's default clip.")
    fp8: tuple[bool, ...] = setting((), "Float8 storage of the frozen weights (LoRA); default: the run's.")
    offload_blocks: tuple[bool, ...] = setting((), "Frozen weights offloaded to the CPU (LoRA); default: the run's.")
    offload_activations: tuple[bool, ...] = setting((), "Saved activations offloaded to the CPU; default: the run's.")
    validation: bool = setting(True, "Include the validation pass (with a run's TOML: as that run validates).")
    mode: Literal["estimate", "measure"] = setting("estimate", "Estimate without a GPU, or measure on the present one.")
    gpu_memory: float | None = setting(None, "GPU size in GiB to fit; default: the present GPU's, if any.")
    host_memory: float | None = setting(None, "Host RAM in GiB that one GPU's offloading may fill; default: this "
                                                "machine's (with several GPUs on it, give each one's share).")
    breakdown: bool = setting(False, "Show each peak in its parts (weights, gradients, optimizer state, activations, "
                                     "workspaces, allocator slack, the validation pass's parts).")
    gpu: str | None = setting(None, "GPU name for rough step times of estimates (H100, A100, RTX 4090, ...).")
    steps: int = setting(4, "Training steps per measured configuration.")

    def __post_init__(self) -> None:
        for value in self.methods:
            if value not in METHODS:
                raise ConfigError(f"method '{value}' is not lora or full")
        try:
            for shape in self.shapes:
                Bucket.parse(shape)
        except Exception as exc:
            raise ConfigError(str(exc)) from exc
        if self.gpu_memory is not None and not (math.isfinite(self.gpu_memory) and self.gpu_memory > 0):
            raise ConfigError(f"gpu_memory must be > 0 GiB, got {self.gpu_memory}")
        if self.host_memory is not None and not (math.isfinite(self.host_memory) and self.host_memory > 0):
            raise ConfigError(f"host_memory must be > 0 GiB, got {self.host_memory}")
        if self.steps < 2:
            raise ConfigError("steps must be >= 2 (the first step is warm-up)")

    def base_run(self) -> TrainConfig:
        """The run the grid varies: the run's TOML (read as `train --config` reads it), else the defaults."""
        from cogtune.config import load_config, read_toml
        from cogtune.train.sizing.estimate import model_spec

        if self.run_config is not None:
            given = read_toml(self.run_config)
            return load_config(TrainConfig, self.run_config, {
                "random_weights": True,
                "output_dir": None if "output_dir" in given else "<bench>",
                "data": self.data or (None if "data" in given else "<bench>"),
            })
        model = self.models[0] if self.models else "cogvideox-5b"
        return TrainConfig(task="i2v" if model_spec(model).is_i2v else "t2v", model=model,
                           data=self.data or "<bench>", output_dir="<bench>", random_weights=True)

    def cases(self) -> list[BenchCase]:
        from cogtune.encode.cache import VideoLatentCache

        base = self.base_run()
        cache = VideoLatentCache(base.data) if (Path(base.data) / MANIFEST_NAME).is_file() else None
        if self.shapes:
            shape_sets = [(Bucket.parse(s).shape,) for s in self.shapes]
        elif cache is not None:
            shape_sets = [tuple(cache.bucket_shapes)]
        else:
            shape_sets = None
        validation = self.validation
        if validation and self.run_config is not None:
            prompts = base.validation.prompts or (tuple(cache.validation_prompts) if cache is not None else ())
            validation = bool(prompts) and (base.validation.every > 0 or base.validation.final)
        axes = {name: getattr(self, name) for name in AXES}
        return grid(base, axes, shape_sets, validation)  # type: ignore[arg-type]


def present_gpu() -> tuple[str, float] | None:
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return properties.name, properties.total_memory / 1024**3


def run_bench(config: BenchConfig, json_path: str | Path | None = None, markdown_path: str | Path | None = None,
              plot_path: str | Path | None = None) -> list[dict[str, Any]]:
    from cogtune.bench import output
    from cogtune.train.sizing.fit import (
        budget_gib,
        cheapest_fit,
        fits,
        fits_host,
        gpu_from_device_name,
        host_memory_gib,
        seconds_per_step,
    )

    cases = config.cases()
    if not cases:
        raise ConfigError("the grid is empty (fp8 and block offloading apply to LoRA only)")
    gpu = present_gpu()
    gpu_memory = config.gpu_memory if config.gpu_memory is not None else (gpu[1] if gpu else None)
    budget = budget_gib(gpu_memory) if gpu_memory is not None else None
    host_memory = config.host_memory if config.host_memory is not None else host_memory_gib()
    gpu_name = config.gpu or ((gpu_from_device_name(gpu[0]) or gpu[0]) if gpu else "H100")
    if config.mode == "estimate" and gpu is not None and config.gpu is None and gpu_from_device_name(gpu[0]) is None:
        report.warn(f"no step times: the peak throughput of the {gpu[0]} is unknown (--gpu picks a known GPU)")
    if config.mode == "measure" and gpu is None and not all(model_spec(case.config.model).tiny for case in cases):
        raise ConfigError("--measure runs real training steps and needs a GPU for the real models",
                          hint="--estimate sizes them on any machine")

    rows: list[dict[str, Any]] = []
    with report.progress(f"{config.mode} memory", total=len(cases), unit="configs") as bar:
        for case in cases:
            if config.mode == "estimate":
                from cogtune.train.sizing.estimate import estimate_run

                estimate = estimate_run(case.config, case.shapes, case.validation_shape)
                row = estimate.as_dict()
                row["seconds_per_step"] = seconds_per_step(estimate, gpu_name)
                row["host_fits"] = fits_host(estimate, host_memory)
                if budget is not None:
                    row["gpu_fits"] = fits(estimate, budget, float("inf"))
                    row["fits"] = row["gpu_fits"] and row["host_fits"]
                    if not row["fits"]:
                        suggestion = cheapest_fit(estimate, budget, host_budget=host_memory)
                        row["suggestion"] = ", ".join(suggestion.changes) + \
                            f" ({suggestion.estimate.memory.after_testing:.1f} GiB)" if suggestion else \
                            "nothing short of a smaller clip or batch"
                row["shape"] = list(estimate.shape)
            else:
                from cogtune.bench.measure import measure_case

                measurement = measure_case(case, steps=config.steps)
                row = measurement.as_dict()
                if budget is not None:
                    row["fits"] = row["memory_gib"]["after_testing"] <= budget
            rows.append(row)
            bar.advance()

    title = _title(config, gpu, gpu_name, gpu_memory, host_memory)
    output.print_rows(rows, title, budget)
    if config.breakdown:
        output.print_breakdowns(rows)
    notes = _notes(config, gpu, gpu_name)
    document = {"mode": config.mode, "gpu": gpu[0] if gpu else None, "gpu_memory_gib": gpu_memory,
                "budget_gib": budget, "host_memory_gib": host_memory, "rows": rows, "notes": notes}
    for path in (json_path, markdown_path, plot_path):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        output.write_json(json_path, document)
    if markdown_path is not None:
        output.write_markdown(markdown_path, output.markdown(rows, title, budget, notes))
    if plot_path is not None:
        output.write_chart(plot_path, rows, title, budget)
    written = [p for p in (json_path, markdown_path, plot_path) if p is not None]
    if written:
        write_config(config, Path(written[0]).parent, f"{Path(written[0]).stem}.config.toml")
        report.success("wrote " + ", ".join(str(p) for p in written))
    return rows


def _title(config: BenchConfig, gpu: tuple[str, float] | None, gpu_name: str, gpu_memory: float | None,
           host_memory: float | None) -> str:
    if config.mode == "measure":
        return f"measured on {gpu[0] if gpu else 'the CPU (RSS)'}"
    size = f", fitting {gpu_memory:g} GiB" if gpu_memory is not None else ""
    if gpu_memory is not None and host_memory is not None:
        size += f" and {host_memory:.4g} GiB of host RAM"
    return f"estimated peak reserved GPU memory (GiB){size}; s/step rough for {gpu_name}"


def _notes(config: BenchConfig, gpu: tuple[str, float] | None, gpu_name: str) -> list[str]:
    import diffusers

    from cogtune import __version__
    from cogtune.train.sizing.fit import ASSUMED_UTILIZATION

    notes = [f"cogtune {__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}"
             + (f", CUDA {torch.version.cuda}, {gpu[0]}" if gpu else "")]
    if config.mode == "estimate":
        notes.append("Estimated by tracing cogtune's training step on the meta device through a model of the CUDA "
                     "caching allocator (peak reserved memory; the CUDA context is not included). Step times assume "
                     f"{ASSUMED_UTILIZATION:.0%} of the {gpu_name}'s peak bf16 throughput.")
    else:
        notes.append("Measured with `cogtune train` on random weights: peak reserved memory at each moment, median "
                     "step time without the first step.")
    return notes
