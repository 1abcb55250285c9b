"""`cogtune bench memory`: a grid of configurations, estimated or measured, reported four ways."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from cogtune import report
from cogtune.bench import output
from cogtune.bench.cases import BenchCase, bench_cases
from cogtune.bench.config import BenchConfig
from cogtune.config import write_config
from cogtune.errors import ConfigError
from cogtune.train.sizing.estimate import model_spec
from cogtune.train.sizing.fit import (
    budget_gib,
    cheapest_fit,
    fits,
    fits_host,
    gpu_from_device_name,
    host_memory_gib,
    seconds_per_step,
)

__all__ = ["BenchConfig", "present_gpu", "run_bench"]


def present_gpu() -> tuple[str, float] | None:
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return properties.name, properties.total_memory / 1024**3


@dataclasses.dataclass(frozen=True)
class _Target:
    """The machine the grid is sized for: the GPU (given or present), its budget, the host's RAM."""

    gpu: tuple[str, float] | None  # the present GPU: name and GiB
    gpu_name: str  # for step times
    gpu_memory: float | None
    budget: float | None  # reserved GiB a run may use: the GPU's size minus the CUDA context
    host_memory: float | None

    @classmethod
    def of(cls, config: BenchConfig) -> _Target:
        gpu = present_gpu()
        gpu_memory = config.gpu_memory if config.gpu_memory is not None else (gpu[1] if gpu else None)
        return cls(gpu=gpu, gpu_name=config.gpu or ((gpu_from_device_name(gpu[0]) or gpu[0]) if gpu else "H100"),
                   gpu_memory=gpu_memory, budget=budget_gib(gpu_memory) if gpu_memory is not None else None,
                   host_memory=config.host_memory if config.host_memory is not None else host_memory_gib())


def run_bench(config: BenchConfig, json_path: str | Path | None = None, markdown_path: str | Path | None = None,
              plot_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Size (or measure) every configuration of `config`'s grid; print the table, write the outputs asked for."""
    cases = bench_cases(config)
    if not cases:
        raise ConfigError("the grid is empty (--base-weights other than bf16 and block offloading apply to LoRA only)")
    target = _Target.of(config)
    gpu = target.gpu
    if config.mode == "estimate" and gpu is not None and config.gpu is None and gpu_from_device_name(gpu[0]) is None:
        report.warn(f"no step times: the peak throughput of the {gpu[0]} is unknown (--gpu picks a known GPU)")
    if config.mode == "measure" and config.fsdp_gpus > 1:
        raise ConfigError("--measure runs one process; --fsdp-gpus sizes FSDP runs by estimate only",
                          hint="drop --measure, or measure under `accelerate launch` with `cogtune train`")
    if config.mode == "measure" and gpu is None and not all(model_spec(case.config.model).tiny for case in cases):
        raise ConfigError("--measure runs real training steps and needs a GPU for the real models",
                          hint="--estimate sizes them on any machine")

    rows: list[dict[str, Any]] = []
    with report.progress(f"{config.mode} memory", total=len(cases), unit="configs") as bar:
        for case in cases:
            rows.append(_estimate_row(case, target, config.cache, config.fsdp_gpus) if config.mode == "estimate" else
                        _measure_row(case, target, config.steps))
            bar.advance()
    _report(config, rows, target, json_path, markdown_path, plot_path)
    return rows


def _estimate_row(case: BenchCase, target: _Target, use_cache: bool, fsdp_gpus: int = 1) -> dict[str, Any]:
    from cogtune.train.sizing.cache import cached_estimate

    def estimator(config: Any) -> Any:  # the row's configuration, and those the ladder tries to fit it
        return cached_estimate(config, case.shapes, case.validation_shape, use_cache=use_cache, fsdp_gpus=fsdp_gpus)

    estimate = estimator(case.config)
    row = estimate.as_dict()
    row["seconds_per_step"] = seconds_per_step(estimate, target.gpu_name)
    row["host_fits"] = fits_host(estimate, target.host_memory)
    if target.budget is not None:
        row["gpu_fits"] = fits(estimate, target.budget, float("inf"))
        row["fits"] = row["gpu_fits"] and row["host_fits"]
        if not row["fits"]:
            suggestion = cheapest_fit(estimate, target.budget, estimator, host_budget=target.host_memory)
            row["suggestion"] = ", ".join(suggestion.changes) + \
                f" ({suggestion.estimate.memory.after_testing:.1f} GiB)" if suggestion else \
                "nothing short of a smaller clip or batch"
    row["shape"] = list(estimate.shape)
    return row


def _measure_row(case: BenchCase, target: _Target, steps: int) -> dict[str, Any]:
    from cogtune.bench.measure import measure_case  # the trainer: imported when a grid is measured

    row = measure_case(case, steps=steps).as_dict()
    if target.budget is not None:
        row["fits"] = row["memory_gib"]["after_testing"] <= target.budget
    return row


def _report(config: BenchConfig, rows: list[dict[str, Any]], target: _Target, json_path: str | Path | None,
            markdown_path: str | Path | None, plot_path: str | Path | None) -> None:
    """The table (and breakdowns) on the terminal; the JSON, markdown and chart asked for, with the bench's config."""
    gpu = target.gpu
    title = _title(config, gpu, target.gpu_name, target.gpu_memory, target.host_memory)
    output.print_rows(rows, title, target.budget)
    if config.breakdown:
        output.print_breakdowns(rows)
    notes = _notes(config, gpu, target.gpu_name)
    document = {"mode": config.mode, "gpu": gpu[0] if gpu else None, "gpu_memory_gib": target.gpu_memory,
                "budget_gib": target.budget, "host_memory_gib": target.host_memory, "rows": rows, "notes": notes}
    written = [Path(p) for p in (json_path, markdown_path, plot_path) if p is not None]
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        output.write_json(json_path, document)
    if markdown_path is not None:
        text = output.markdown(rows, title, target.budget, notes, breakdown=config.breakdown)
        output.write_markdown(markdown_path, text)
    if plot_path is not None:
        output.write_chart(plot_path, rows, title, target.budget)
    if written:
        write_config(config, written[0].parent, f"{written[0].stem}.config.toml")
        report.success("wrote " + ", ".join(str(p) for p in written))


def _title(config: BenchConfig, gpu: tuple[str, float] | None, gpu_name: str, gpu_memory: float | None,
           host_memory: float | None) -> str:
    if config.mode == "measure":
        return f"measured on {gpu[0] if gpu else 'the CPU (RSS)'}"
    size = f", fitting {gpu_memory:g} GiB" if gpu_memory is not None else ""
    if gpu_memory is not None and host_memory is not None:
        size += f" and {host_memory:.4g} GiB of host RAM"
    return f"estimated peak reserved GPU memory (GiB){size}; s/step rough for {gpu_name}"


def _notes(config: BenchConfig, gpu: tuple[str, float] | None, gpu_name: str) -> list[str]:
    from importlib.metadata import version  # diffusers' version without importing it (seconds, for a cached grid)

    from cogtune import __version__
    from cogtune.train.sizing.fit import ASSUMED_UTILIZATION

    notes = [f"cogtune {__version__}, torch {torch.__version__}, diffusers {version('diffusers')}"
             + (f", CUDA {torch.version.cuda}, {gpu[0]}" if gpu else "")]
    if config.mode == "estimate":
        notes.append("Estimated by tracing cogtune's training step on the meta device through a model of the CUDA "
                     "caching allocator (peak reserved memory; the CUDA context is not included). Step times assume "
                     f"{ASSUMED_UTILIZATION:.0%} of the {gpu_name}'s peak bf16 throughput.")
    else:
        notes.append("Measured with `cogtune train` on random weights: peak reserved memory at each moment, median "
                     "step time without the first step.")
    return notes
