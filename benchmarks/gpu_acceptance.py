#!/usr/bin/env python3
"""The GPU acceptance kit (issue 15): one command that measures what only a GPU can show, within a time budget.

    python3 benchmarks/gpu_acceptance.py --output "$OUT" --budget-s 450     # on one H100/H200
    python3 benchmarks/gpu_acceptance.py --dry-run --output /tmp/kit       # the same code path on the CPU

On a GPU it runs, in this order (the most informative first), each row in a subprocess of its own
(a crash or a CUDA out-of-memory in one row cannot stop the kit, and every row's peaks start at zero):

1. memory rows, `bench memory --measure` as it trains (random weights, a synthetic cache, nothing
   downloaded), each with a validation pass at 49x480x720 (2 denoising steps: memory does not
   depend on their count): 5b LoRA r64 with checkpointing (the headline), 2b LoRA r64, 5b r64
   `--fp8 --offload-activations --optimizer adamw-8bit`, 5b r64 `--offload-blocks --offload-activations`;
   then a quantized base beside its bf16 row: 5b r64 `--base-weights nf4` and `int8`, 1.5-5b r64 at
   81x768x1360 in bf16 and nf4;
2. quick passes of the CUDA-only paths (bitsandbytes and torchao optimizers, the cpu-offload
   optimizer, fp8 storage, torch.compile) for a few steps: pass/fail and the error line;
3. 5b full fine-tuning with an 8-bit optimizer, if the budget still allows.

Every row is also estimated (`estimate_run`, in a CPU process running beside the measurements) and
compared: peak reserved at the four moments and peak allocated, the estimate's error in percent, and the
peak in its parts: each GPU row records the allocator's history and replays `torch.cuda.memory._snapshot()`
to the instant allocated memory peaks, grouping what is live by the code that allocated it (weights, forward,
backward, optimizer state, validation), beside the estimate's parts grouped the same way (`parts_at_peak`).
Step time is SimpleTuner's figure: the median s/step after the first (warm-up) step; the model FLOPs
utilisation is the estimate's FLOPs per step / (median s/step x the GPU's peak bf16 TFLOP/s).

It writes `measured-<gpu>.json|md|png` under `--output` (the JSON and markdown after every row, so a
run cut short still leaves its finished rows) with the GPU, driver, CUDA, torch and library versions
and the exact command. Rows it skipped (a package missing, no CUDA), stopped (still running when the
budget ran out) or never started are listed as such; nothing is invented.

Validation normally writes mp4 files through imageio-ffmpeg, which the bare GPU machine lacks: the
kit's row processes replace `cogtune.data.video.write_video` with a writer that keeps nothing (the
frames are already on the host, as uint8, when it is called: GPU memory is unchanged), and say so.

`--dry-run` runs the same plan with the tiny presets at 9x32x32 on the CPU (CUDA-only rows are
reported as "skipped: needs CUDA"), hiding decord, imageio-ffmpeg, prodigyopt, bitsandbytes and
torchao from the row processes to show that the kit does not need them. The test suite runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_BUDGET_S = 450.0
VALIDATION_SHAPE = (49, 480, 720)
# What the bare GPU machine lacks that the kit must not need (the dry run hides them from its rows).
HIDDEN_IN_DRY_RUN = ("decord", "imageio_ffmpeg", "prodigyopt", "bitsandbytes", "torchao")
HIDE_ENV = "COGTUNE_KIT_HIDE"
NO_VIDEOS_NOTE = ("Validation videos are rendered but not written: the row processes replace "
                  "`cogtune.data.video.write_video` with a writer that keeps nothing (imageio-ffmpeg is absent on the "
                  "GPU machine); the frames are uint8 host arrays by then, so GPU memory is unchanged.")
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "bitsandbytes", "torchao",
             "numpy")
clock = time.monotonic  # the tests replace it


@dataclasses.dataclass(frozen=True)
class Row:
    """One planned row: a run (its dotted settings over the defaults), where and how long it trains."""

    id: str
    kind: str  # "memory" (a measured row with validation) or "quick" (a CUDA-only path, a few steps)
    model: str
    changes: dict[str, Any]
    shape: tuple[int, int, int]
    validation: tuple[int, int, int] | None
    steps: int
    needs: tuple[str, ...] = ()  # modules the row imports (missing: the row is skipped, not failed)
    cuda_only: bool = False
    purpose: str = ""
    max_s: float = 150.0  # the row's own limit, so that one slow row cannot use up the budget of the rest

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape),
                "validation": list(self.validation) if self.validation else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        return cls(**{**data, "shape": tuple(data["shape"]), "needs": tuple(data["needs"]),
                      "validation": tuple(data["validation"]) if data["validation"] else None})


def _quantized_base_rows(dry_run: bool, lora: dict[str, Any], validation: Any, steps: int, limit: float) -> list[Row]:
    """A quantized base (issue 27) beside its bf16 row: 5b nf4 and int8 (the bf16 row is the headline), and
    1.5-5b at 81x768x1360 in bf16 and nf4. The goal: 5b LoRA with validation in 8 GiB, at most 1.3x bf16's s/step.
    GPU rows (`cuda_only`): the dry run estimates them and runs none (its rows hide bitsandbytes and torchao)."""
    big, wide = ("tiny-rotary", "tiny-1.5") if dry_run else ("cogvideox-5b", "cogvideox1.5-5b")
    shape, wide_shape = ((9, 32, 32), (9, 32, 32)) if dry_run else (VALIDATION_SHAPE, (81, 768, 1360))
    nf4, int8 = {**lora, "memory.base_weights": "nf4"}, {**lora, "memory.base_weights": "int8"}
    return [
        Row("5b-lora-r64-nf4", "memory", big, nf4, shape, validation, steps, needs=("bitsandbytes",),
            cuda_only=True, purpose="QLoRA: an NF4 base (bitsandbytes), beside 5b-lora-r64-ckpt", max_s=limit),
        Row("5b-lora-r64-int8", "memory", big, int8, shape, validation, steps, needs=("torchao",),
            cuda_only=True, purpose="an int8 base (torchao), beside 5b-lora-r64-ckpt", max_s=limit),
        Row("1.5-5b-lora-r64-ckpt-81x768x1360", "memory", wide, lora, wide_shape, validation, steps,
            cuda_only=True, purpose="1.5-5b at its native shape, bf16 base", max_s=limit * 2),
        Row("1.5-5b-lora-r64-nf4-81x768x1360", "memory", wide, nf4, wide_shape, validation, steps,
            needs=("bitsandbytes",), cuda_only=True, purpose="1.5-5b at its native shape, NF4 base",
            max_s=limit * 2),
    ]


def plan(dry_run: bool) -> list[Row]:
    """The rows in the order they run. The dry run has the same rows on the tiny presets, at 9x32x32."""
    big, small = ("tiny-rotary", "tiny") if dry_run else ("cogvideox-5b", "cogvideox-2b")
    shape = (9, 32, 32) if dry_run else VALIDATION_SHAPE
    quick_shape = (9, 32, 32) if dry_run else (17, 480, 720)
    validation = shape
    memory_steps, quick_steps = (2, 2) if dry_run else (5, 3)
    limit, quick_limit, full_limit = (120.0, 120.0, 120.0) if dry_run else (150.0, 75.0, 180.0)
    lora = {"lora.rank": 64, "gradient_checkpointing": True}
    # The 8-bit optimizers are CUDA kernels: the dry run keeps each row's memory options with torch's AdamW.
    eight_bit = {} if dry_run else {"optimizer.name": "adamw-8bit"}
    bnb = () if dry_run else ("bitsandbytes",)
    rows = [
        Row("5b-lora-r64-ckpt", "memory", big, lora, shape, validation, memory_steps,
            purpose="headline: the default LoRA run of the 5b model", max_s=limit),
        Row("2b-lora-r64-ckpt", "memory", small, lora, shape, validation, memory_steps,
            purpose="the default LoRA run of the 2b model", max_s=limit),
        Row("5b-lora-r64-fp8-offload-act-adamw8bit", "memory", big,
            {**lora, "memory.base_weights": "fp8", "memory.offload_activations": True, **eight_bit}, shape, validation,
            memory_steps, needs=bnb, purpose="the low-memory LoRA recipe (12 GiB class)", max_s=limit),
        Row("5b-lora-r64-offload-blocks-act", "memory", big,
            {**lora, "memory.offload_blocks": True, "memory.offload_activations": True}, shape, validation,
            memory_steps, purpose="frozen weights streamed from the CPU", max_s=limit),
        *_quantized_base_rows(dry_run, lora, validation, memory_steps, limit),
    ]
    quick = [
        ("adamw-8bit", {"optimizer.name": "adamw-8bit"}, ("bitsandbytes",)),
        ("adamw-8bit-ao", {"optimizer.name": "adamw-8bit-ao"}, ("torchao",)),
        ("adamw-4bit-ao", {"optimizer.name": "adamw-4bit-ao"}, ("torchao",)),
        ("adamw-cpu-offload", {"optimizer.name": "adamw-cpu-offload"}, ("torchao",)),
        ("fp8", {"memory.base_weights": "fp8"}, ()),
        ("compile", {"memory.compile": True}, ()),
        ("adamw-8bit-paged", {"optimizer.name": "adamw-8bit-paged"}, ("bitsandbytes",)),
    ]
    for name, changes, needs in quick:
        rows.append(Row(f"quick-{name}", "quick", small, {**lora, **changes}, quick_shape, None, quick_steps,
                        needs=needs, cuda_only=True, purpose=f"CUDA-only path: {name}",
                        max_s=quick_limit * (2 if name == "compile" else 1)))
    rows.append(Row("5b-full-adamw8bit-ckpt", "memory", big,
                    {"full": True, "gradient_checkpointing": True, **eight_bit}, shape, validation, memory_steps,
                    needs=bnb, purpose="full fine-tuning with an 8-bit optimizer", max_s=full_limit))
    return rows


def skip_reason(row: Row, cuda: bool, find_spec: Any = importlib.util.find_spec) -> str | None:
    """Why `row` cannot run here (then it is reported, never failed), or None."""
    if row.cuda_only and not cuda:
        return "skipped: needs CUDA"
    for module in row.needs:
        if find_spec(module) is None:
            return f"skipped: {module} not installed"
    return None


def build_case(row: Row):
    """The `BenchCase` of a row: the run `bench memory` would size, with the kit's settings."""
    from cogtune.bench.cases import BenchCase
    from cogtune.config import replace_settings
    from cogtune.train.config import TrainConfig
    from cogtune.train.sizing.estimate import model_spec

    spec = model_spec(row.model)
    base = TrainConfig(task="i2v" if spec.is_i2v else "t2v", model=row.model, data="<kit>", output_dir="<kit>",
                       random_weights=True)
    # The trainer's pre-flight estimate is the kit's own estimate column: not twice.
    config = replace_settings(base, {**row.changes, "memory.check": False})
    return BenchCase(config, (row.shape,), row.validation)


# --- row processes -------------------------------------------------------------------------------------------


def _hide_modules() -> None:
    """Make the modules named in $COGTUNE_KIT_HIDE absent for this process, as on the bare GPU machine: `import`
    raises ModuleNotFoundError and `importlib.util.find_spec` answers None (how libraries probe for them)."""
    for name in filter(None, os.environ.get(HIDE_ENV, "").split(",")):
        sys.modules[name] = None  # type: ignore[assignment]


def _no_video_writer() -> list[list[int]]:
    """Replace the validation's mp4 writer with one that keeps nothing; returns the shapes it was given."""
    import numpy as np

    import cogtune.data.video as video

    shapes: list[list[int]] = []

    def write_video(path: Any, frames: Any, fps: float) -> Path:
        shapes.append(list(np.asarray(frames).shape))
        return Path(path)

    video.write_video = write_video
    return shapes


def _traceback_tail(exc: BaseException, frames: int = 6) -> list[str]:
    import traceback

    summary = traceback.extract_tb(exc.__traceback__)[-frames:]
    return [f"{Path(frame.filename).name}:{frame.lineno} {frame.name}: {(frame.line or '').strip()[:160]}"
            for frame in summary]


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


def _is_oom(exc: BaseException) -> bool:
    while exc is not None:
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


# --- the peak in its parts, from torch's own record of the allocations -----------------------------------------
# On a GPU, each row records the caching allocator's history (`torch.cuda.memory._record_memory_history`) and
# reads it back (`torch.cuda.memory._snapshot()`): every allocation and free, with the Python stack that made it.
# Replaying the trace gives the instant allocated memory peaks and what is live then; each block is put in a
# group by the code that allocated it, and the estimate's parts at its own peak are grouped the same way.
SNAPSHOT_ENTRIES = 3_000_000  # trace entries kept (a 5b row makes about 10^5 per step)
# (group, what a frame of the allocating stack says): the first group any frame matches. Backward comes before
# forward: a checkpointed block's recompute runs forward code inside `loss.backward()`.
PART_GROUPS = (
    ("optimizer_state", ("optim", "bitsandbytes", "torchao")),
    ("validation", ("generate_videos", "validation")),
    ("backward", ("backward",)),
    ("forward", ("training_step",)),
    ("weights", ("load_trainable_transformer", "load_transformer", "add_lora", "from_pretrained", "from_config")),
)
# The estimate's parts, by the same groups (its workspaces and anything else: "other").
ESTIMATE_GROUPS = {
    "frozen_weights": "weights", "trainable_weights": "weights", "optimizer_state": "optimizer_state",
    "saved_activations": "forward", "autocast_weight_copies": "forward", "recomputed_activations": "backward",
    "backward_transients": "backward", "gradients": "backward", "vae_weights": "validation",
    "validation_denoise": "validation", "validation_decode": "validation",
}


def allocation_group(frames: list[dict[str, Any]]) -> str:
    """The group of an allocation, from the Python frames of its stack (file names and function names)."""
    places = [f"{frame.get('filename', '')}:{frame.get('name', '')}" for frame in frames]
    for group, markers in PART_GROUPS:
        if any(marker in place for place in places for marker in markers):
            return group
    return "other"


def parts_at_peak(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Replay a `torch.cuda.memory._snapshot()`'s trace of device 0: the bytes live by group at the instant
    allocated memory peaks, and whether the trace is whole (a full ring buffer lost the oldest entries)."""
    traces = snapshot.get("device_traces") or [[]]
    trace = traces[0]
    live: dict[int, tuple[int, str]] = {}
    totals: dict[str, int] = {}
    allocated = peak = 0
    at_peak: dict[str, int] = {}
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            group = allocation_group(event.get("frames") or [])
            live[event["addr"]] = (event["size"], group)
            totals[group] = totals.get(group, 0) + event["size"]
            allocated += event["size"]
            if allocated > peak:
                peak, at_peak = allocated, dict(totals)
        elif action == "free_completed" and event.get("addr") in live:
            size, group = live.pop(event["addr"])
            totals[group] -= size
            allocated -= size
    return {"allocated_peak_gib": round(peak / 1024**3, 3), "trace_whole": len(trace) < SNAPSHOT_ENTRIES,
            "parts_gib": {group: round(size / 1024**3, 3) for group, size in at_peak.items() if size}}


def estimate_groups(breakdown_gib: dict[str, float]) -> dict[str, float]:
    """An estimate's parts at a peak (GiB) in the kit's groups, without the allocator's slack."""
    groups: dict[str, float] = {}
    for part, size in breakdown_gib.items():
        if part in ("allocator_slack", "reserved_after_peak"):
            continue
        group = ESTIMATE_GROUPS.get(part, "other")
        groups[group] = round(groups.get(group, 0.0) + size, 3)
    return groups


def compare_parts(estimated: dict[str, float], measured: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Each group: the estimate's GiB, the measured GiB and the difference."""
    return {group: {"estimated_gib": estimated.get(group, 0.0), "measured_gib": measured.get(group, 0.0),
                    "difference_gib": round(estimated.get(group, 0.0) - measured.get(group, 0.0), 3)}
            for group in sorted(set(estimated) | set(measured))}


def _load_libraries() -> None:
    """A row process's imports, as a cogtune command makes them (`cogtune.startup`: a sixth faster)."""
    from cogtune import startup

    startup.pause_collection()
    startup.load_libraries()


def measure_worker(row: Row, result_path: Path) -> None:
    """Train one row for real and write what it measured (or how it failed) to `result_path`."""
    _hide_modules()
    started = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        _load_libraries()
        import torch

        videos = _no_video_writer()
        from cogtune.bench.measure import measure_case

        cuda = torch.cuda.is_available()
        result["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
        try:
            measurement = measure_case(build_case(row), steps=row.steps)
            result.update(status="ok", measurement=measurement.as_dict(), videos_not_written=videos)
            if cuda:
                result["parts_at_peak"] = parts_at_peak(torch.cuda.memory._snapshot())
        except BaseException as exc:  # noqa: BLE001  # every failure is a result of the row
            result.update(status="out of memory" if _is_oom(exc) else "failed", error=_first_line(exc),
                          traceback_tail=_traceback_tail(exc))
            if cuda:
                result["peak_at_failure_gib"] = {
                    "reserved": round(torch.cuda.max_memory_reserved() / 1024**3, 3),
                    "allocated": round(torch.cuda.max_memory_allocated() / 1024**3, 3)}
    except BaseException as exc:  # noqa: BLE001  # even the imports failing is a result
        result.update(status="failed", error=_first_line(exc), traceback_tail=_traceback_tail(exc))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result_path.write_text(json.dumps(result, indent=2) + "\n")


def estimate_worker(rows: list[Row], folder: Path) -> None:
    """Estimate every row in order (on the CPU), one file each, so that a stopped run keeps the finished ones."""
    _hide_modules()
    _load_libraries()
    from cogtune.train.sizing.estimate import estimate_run

    for row in rows:
        started = time.perf_counter()
        try:
            case = build_case(row)
            estimate = estimate_run(case.config, case.shapes, case.validation_shape)
            result = {"status": "ok", **estimate.as_dict(),
                      "teraflops_per_step": estimate.teraflops_per_step}
        except Exception as exc:  # noqa: BLE001
            result = {"status": "failed", "error": _first_line(exc)}
        result["seconds"] = round(time.perf_counter() - started, 1)
        tmp = folder / f".{row.id}.json"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(folder / f"{row.id}.json")


# --- the kit ---------------------------------------------------------------------------------------------------


def _run_command(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(dry_run: bool, cuda: bool) -> dict[str, Any]:
    """Machine, driver and library versions (the GPU name is filled in from the rows' own reports)."""
    import torch

    from cogtune import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "cogtune": __version__}
    for name in LIBRARIES:
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001  # not installed
            versions[name] = None
    smi = _run_command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]) if cuda else None
    name, driver = ([part.strip() for part in smi.split(",", 1)] + [None])[:2] if smi else (None, None)
    return {"dry_run": dry_run, "device": "cuda" if cuda else "cpu", "gpu": name, "driver": driver,
            "cuda": torch.version.cuda, "torch_cuda_available": cuda, "versions": versions,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "git_commit": _run_command(["git", "-C", str(ROOT), "rev-parse", "HEAD"])}


def gpu_slug(env: dict[str, Any]) -> str:
    if env["dry_run"]:
        return "cpu-dry-run"
    from cogtune.train.sizing.fit import gpu_from_device_name

    name = env.get("gpu") or "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", (gpu_from_device_name(name) or name).lower()).strip("-") or "gpu"


def _error_pct(estimated: float | None, measured: float | None) -> float | None:
    if estimated is None or measured is None or measured <= 0:
        return None
    return round(100.0 * (estimated - measured) / measured, 1)


def combine(row: Row, outcome: dict[str, Any], estimate: dict[str, Any] | None, env: dict[str, Any]) -> dict[str, Any]:
    """One row of the report: what ran, what it measured, the estimate, the estimate's error and the MFU."""
    from cogtune.train.sizing.fit import GPUS, gpu_from_device_name

    result: dict[str, Any] = {"id": row.id, "kind": row.kind, "purpose": row.purpose, "plan": row.as_dict(),
                              **{k: v for k, v in outcome.items() if k != "measurement"}}
    if estimate is None:
        result["estimate"] = None
        result["estimate_reason"] = "the estimate did not finish within the budget"
    elif estimate.get("status") != "ok":
        result["estimate"] = None
        result["estimate_reason"] = f"the estimate failed: {estimate.get('error')}"
    else:
        result["estimate"] = {"memory_gib": estimate["memory_gib"], "breakdown_gib": estimate.get("breakdown_gib"),
                              "teraflops_per_step": estimate["teraflops_per_step"],
                              "label": estimate["label"], "seconds": estimate["seconds"],
                              "host_ram_gib": estimate.get("host_ram_gib"),
                              "pinned_host_gib": estimate.get("pinned_host_gib")}
    result["label"] = (estimate or {}).get("label") or row.id
    measurement = outcome.get("measurement")
    result["measured"] = None
    if measurement is not None:
        result["label"] = measurement["label"]
        result["measured"] = {"memory_gib": measurement["memory_gib"],
                              "allocated_peak_gib": measurement["allocated_peak_gib"],
                              "seconds_per_step": measurement["seconds_per_step"], "device": measurement["device"],
                              "steps": row.steps, "host_gib": measurement.get("host_gib")}
    if result["measured"] is None:
        result["error_pct"] = None
        result["error_reason"] = f"no measurement ({outcome['status']})"
    elif result["estimate"] is None:
        result["error_pct"] = None
        result["error_reason"] = "no estimate"
    else:
        measured, estimated = result["measured"]["memory_gib"], result["estimate"]["memory_gib"]
        errors = {moment: _error_pct(estimated[moment], measured[moment]) for moment in measured}
        errors["allocated_peak"] = _error_pct(estimated.get("allocated_peak"), result["measured"]["allocated_peak_gib"])
        # host: what the estimate says offloading pins, against the peak of torch's pinned allocator (a run
        # without offloading pins only small transfers, so a near-zero measurement has no error to give)
        pinned = (result["measured"].get("host_gib") or {}).get("pinned_gib")
        if result["estimate"].get("pinned_host_gib"):
            errors["pinned_host"] = _error_pct(result["estimate"]["pinned_host_gib"], pinned)
        result["error_pct"] = errors
        if not env["torch_cuda_available"]:
            result["error_reason"] = "measured on the CPU (peak RSS of the process): not comparable with GPU figures"
        elif errors["allocated_peak"] is None:
            result["error_reason"] = "no peak allocated figure measured"
    measured_parts = outcome.get("parts_at_peak")
    if measured_parts and result["estimate"] and (result["estimate"].get("breakdown_gib") or {}).get("after_testing"):
        result["parts_at_peak"] = {
            "trace_whole": measured_parts["trace_whole"],
            "groups": compare_parts(estimate_groups(result["estimate"]["breakdown_gib"]["after_testing"]),
                                    measured_parts["parts_gib"])}
    mfu, mfu_reason = None, None
    seconds = (result["measured"] or {}).get("seconds_per_step")
    gpu = gpu_from_device_name((result["measured"] or {}).get("device") or env.get("gpu") or "")
    if seconds is None:
        mfu_reason = "no step time"
    elif result["estimate"] is None:
        mfu_reason = "no FLOPs per step (no estimate)"
    elif gpu is None:
        mfu_reason = f"peak throughput unknown for {(result['measured'] or {}).get('device')}"
    else:
        mfu = round(result["estimate"]["teraflops_per_step"] / (seconds * GPUS[gpu][0]), 4)
    result["mfu"] = mfu
    if mfu_reason:
        result["mfu_reason"] = mfu_reason
    return result


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(document: dict[str, Any]) -> str:
    env = document["environment"]
    versions = env["versions"]
    lines = [f"# GPU acceptance: {document['title']}", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in (
        ("GPU", env.get("gpu") or env["device"]), ("driver", env.get("driver") or "-"),
        ("CUDA", env.get("cuda") or "-"),
        ("torch", versions.get("torch")), ("diffusers", versions.get("diffusers")),
        ("transformers", versions.get("transformers")), ("accelerate", versions.get("accelerate")),
        ("peft", versions.get("peft")), ("bitsandbytes", versions.get("bitsandbytes") or "not installed"),
        ("torchao", versions.get("torchao") or "not installed"), ("python", versions.get("python")),
        ("cogtune", f"{versions.get('cogtune')} ({env.get('git_commit') or 'commit unknown'})"),
        ("command", f"`{document['command']}`"),
        ("budget", f"{document['budget_s']:g} s; the kit ran {document['elapsed_s']:.0f} s"),
        ("finished", "yes" if document["finished"] else "no (still running when this was written)"))]
    lines += ["", "## Memory (GiB) and step time", "",
              "| row | configuration | status | measured peak reserved | estimated | error | measured peak allocated | "
              "estimated | error | s/step | MFU | note |", "|" + "---|" * 12]
    for row in document["rows"]:
        measured, estimate, errors = row.get("measured") or {}, row.get("estimate") or {}, row.get("error_pct") or {}
        em = estimate.get("memory_gib") or {}
        mm = measured.get("memory_gib") or {}
        note = row.get("error") or row.get("reason") or ""
        if row.get("peak_at_failure_gib"):
            note += f" (peak reserved {row['peak_at_failure_gib']['reserved']:.2f} GiB when it failed)"
        lines.append("| " + " | ".join([
            row["id"], row["label"], row["status"], _fmt(mm.get("after_testing")), _fmt(em.get("after_testing")),
            _fmt(errors.get("after_testing"), "+.1f", "%"), _fmt(measured.get("allocated_peak_gib")),
            _fmt(em.get("allocated_peak")), _fmt(errors.get("allocated_peak"), "+.1f", "%"),
            _fmt(measured.get("seconds_per_step")), _fmt(row.get("mfu"), ".1%"), note.replace("|", "/")]) + " |")
    lines += ["", "## The four moments (GiB, peak reserved: measured / estimated)", "",
              "| row | before training | before validation | after validation | after testing |",
              "|---|---|---|---|---|"]
    for row in document["rows"]:
        mm = (row.get("measured") or {}).get("memory_gib") or {}
        em = (row.get("estimate") or {}).get("memory_gib") or {}
        if mm or em:
            lines.append(f"| {row['id']} | " + " | ".join(
                f"{_fmt(mm.get(m))} / {_fmt(em.get(m))}" for m in
                ("before_training", "before_validation", "after_validation", "after_testing")) + " |")
    lines += ["", "## Host memory (GiB): what offloading pins, measured / estimated", "",
              "| row | peak pinned (torch's pinned allocator) | estimated pinned | error | peak RSS | estimated host RAM |",
              "|---|---|---|---|---|---|"]
    for row in document["rows"]:
        host = (row.get("measured") or {}).get("host_gib") or {}
        estimate = row.get("estimate") or {}
        if host or estimate.get("host_ram_gib"):
            lines.append(f"| {row['id']} | " + " | ".join([
                _fmt(host.get("pinned_gib")), _fmt(estimate.get("pinned_host_gib")),
                _fmt((row.get("error_pct") or {}).get("pinned_host"), "+.1f", "%"), _fmt(host.get("rss_gib")),
                _fmt(estimate.get("host_ram_gib"))]) + " |")
    lines += ["", "## Notes", "", *[f"- {note}" for note in document["notes"]]]
    return "\n".join(lines) + "\n"


def chart(path: Path, document: dict[str, Any]) -> None:
    """Measured against estimated peak reserved and peak allocated, per row (rows without either are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in document["rows"] if r.get("measured") or r.get("estimate")]
    figure, axis = plt.subplots(figsize=(max(8.0, 1.1 * len(rows) + 3), 5.2), dpi=110)
    def measured(row: dict[str, Any]) -> dict[str, Any]:
        return row.get("measured") or {}

    def estimated(row: dict[str, Any]) -> dict[str, Any]:
        return (row.get("estimate") or {}).get("memory_gib") or {}

    series = [("measured peak reserved", lambda r: (measured(r).get("memory_gib") or {}).get("after_testing")),
              ("estimated peak reserved", lambda r: estimated(r).get("after_testing")),
              ("measured peak allocated", lambda r: measured(r).get("allocated_peak_gib")),
              ("estimated peak allocated", lambda r: estimated(r).get("allocated_peak"))]
    positions = np.arange(len(rows))
    width = 0.2
    for index, (name, value) in enumerate(series):
        heights = [value(r) or 0.0 for r in rows]
        axis.bar(positions + (index - 1.5) * width, heights, width, label=name)
    labels = [f"{r['id']}\n{r['status']}" for r in rows]
    axis.set_xticks(positions, labels, fontsize=6, rotation=30, ha="right")
    axis.set_ylabel("GiB (CPU dry run: peak RSS)" if document["environment"]["dry_run"] else "GiB")
    axis.set_title(document["title"], fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    plt.close(figure)
    tmp.replace(path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return [line[:300] for line in path.read_text(errors="replace").splitlines()[-lines:]]
    except OSError:
        return []


def _stop(process: subprocess.Popen) -> None:
    """End a row process we started, and whatever it started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)


def run_kit(output: Path, budget_s: float, dry_run: bool, command: str,
            only: list[str] | None = None) -> dict[str, Any]:
    import torch

    started = clock()
    deadline = started + budget_s
    cuda = torch.cuda.is_available() and not dry_run
    rows = plan(dry_run)
    if only:
        rows = [row for row in rows if row.id in only]
    env = environment(dry_run, cuda)
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cogtune-kit-"))
    estimates_dir = work / "estimates"
    estimates_dir.mkdir()
    (work / "plan.json").write_text(json.dumps([row.as_dict() for row in rows]))
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    child_env.pop(HIDE_ENV, None)
    (work / "tmp").mkdir()
    child_env["TMPDIR"] = str(work / "tmp")  # a stopped row's run folder goes with the kit's own
    if dry_run:
        child_env.update({HIDE_ENV: ",".join(HIDDEN_IN_DRY_RUN), "CUDA_VISIBLE_DEVICES": ""})
    # Estimates are CPU work: one process beside the measurements, off the GPU.
    estimator = _spawn(["--worker", "estimate", "--plan", str(work / "plan.json"), "--result", str(estimates_dir)],
                       work / "estimate.log", {**child_env, "CUDA_VISIBLE_DEVICES": ""})
    outcomes: dict[str, dict[str, Any]] = {}
    document: dict[str, Any] = {}
    running: list[subprocess.Popen] = [estimator]  # stopped on the way out, however the kit ends
    written: list[Path] = []  # the files' base name, once known (the GPU's name may come from the first row)

    def publish(finished: bool) -> Path:
        estimates = {}
        for row in rows:
            path = estimates_dir / f"{row.id}.json"
            estimates[row.id] = json.loads(path.read_text()) if path.is_file() else None
        pending = {"status": "not run", "reason": "not reached yet" if not finished else "not run"}
        document.clear()
        document.update({
            "kit": "benchmarks/gpu_acceptance.py", "title": "", "command": command, "budget_s": budget_s,
            "elapsed_s": round(clock() - started, 1), "finished": finished, "environment": env,
            "rows": [combine(row, outcomes.get(row.id, pending), estimates[row.id], env) for row in rows],
            "notes": notes(dry_run)})
        if not env.get("gpu"):
            devices = [r["device"] for r in outcomes.values() if r.get("device") and r["device"] != "cpu"]
            env["gpu"] = devices[0] if devices else None
        where = "the CPU (dry run, tiny presets; memory is peak RSS)" if dry_run else (env.get("gpu") or "no GPU")
        document["title"] = f"measured on {where}"
        base = output / f"measured-{gpu_slug(env)}"
        if written and written[-1] != base:
            for suffix in (".json", ".md"):
                written[-1].with_suffix(suffix).unlink(missing_ok=True)
        written.append(base)
        _write(base.with_suffix(".json"), json.dumps(document, indent=2) + "\n")
        _write(base.with_suffix(".md"), markdown(document))
        return base

    try:
        for number, row in enumerate(rows, 1):
            reason = skip_reason(row, cuda)
            remaining = deadline - clock()
            if reason is not None:
                outcomes[row.id] = {"status": "skipped", "reason": reason}
            elif remaining <= 0:
                outcomes[row.id] = {"status": "not run",
                                    "reason": f"the budget (--budget-s {budget_s:g}) was spent before it started"}
            else:
                result_path = work / f"{row.id}.result.json"
                log = work / f"{row.id}.log"
                (work / f"{row.id}.row.json").write_text(json.dumps(row.as_dict()))
                print(f"[{number}/{len(rows)}] {row.id}: running ({remaining:.0f} s of the budget left)", flush=True)
                process = _spawn(["--worker", "measure", "--plan", str(work / f"{row.id}.row.json"), "--result",
                                  str(result_path)], log, child_env)
                running.append(process)
                row_started = clock()
                try:
                    process.wait(timeout=max(min(remaining, row.max_s), 0.01))
                except subprocess.TimeoutExpired:
                    _stop(process)
                    why = (f"ran past its own limit of {row.max_s:g} s" if row.max_s < remaining else
                           f"still running when the budget ran out (after {clock() - row_started:.0f} s)")
                    outcomes[row.id] = {"status": "stopped", "reason": why, "log_tail": _tail(log, 5)}
                else:
                    if result_path.is_file():
                        outcomes[row.id] = json.loads(result_path.read_text())
                    else:
                        outcomes[row.id] = {"status": "crashed", "error": f"the row process exited with "
                                            f"{process.returncode} and no result", "log_tail": _tail(log)}
                    if outcomes[row.id]["status"] not in ("ok",):
                        outcomes[row.id].setdefault("log_tail", _tail(log))
            outcome = outcomes[row.id]
            said = outcome.get("error") or outcome.get("reason") or outcome["status"]
            said = said if said.startswith(outcome["status"]) else f"{outcome['status']}: {said}"
            print(f"[{number}/{len(rows)}] {row.id}: {said}", flush=True)
            publish(finished=False)
        # The estimates finish on the CPU within what is left of the budget (they are usually done long before).
        try:
            estimator.wait(timeout=max(deadline - clock(), 0.01))
        except subprocess.TimeoutExpired:
            pass
        base = publish(finished=True)
        chart(base.with_suffix(".png"), document)
    finally:
        for process in running:
            if process.poll() is None:
                _stop(process)
        shutil.rmtree(work, ignore_errors=True)
    for row in document["rows"]:
        print(f"{row['id']}: {row['status']}; peak reserved measured "
              f"{_fmt(((row.get('measured') or {}).get('memory_gib') or {}).get('after_testing'))} GiB, estimated "
              f"{_fmt(((row.get('estimate') or {}).get('memory_gib') or {}).get('after_testing'))} GiB; "
              f"s/step {_fmt((row.get('measured') or {}).get('seconds_per_step'))}; MFU {_fmt(row.get('mfu'), '.1%')}")
    print(f"wrote {base}.json, .md, .png in {clock() - started:.0f} s", flush=True)
    return document


def notes(dry_run: bool) -> list[str]:
    text = [
        "Memory rows: `bench memory --measure`'s training (cogtune's trainer, random weights, a synthetic cache, "
        "nothing downloaded), then the final validation pass at the row's validation shape with 2 denoising steps "
        "(memory does not depend on their count). Peak reserved is `torch.cuda.max_memory_reserved` (the CUDA "
        "context is outside it, as it is outside the estimate); each row runs in a process of its own.",
        "s/step: the median over the steps after the first (warm-up); MFU: the estimate's FLOPs per step / "
        "(s/step x the GPU's peak dense bf16 TFLOP/s in `cogtune.train.sizing.fit.GPUS`).",
        "Estimates: `estimate_run` on the CPU (meta device), in a process beside the measurements. Error: "
        "(estimate - measured) / measured.",
        "Quick rows: a few LoRA steps of the 2b model at 17x480x720 without validation, to see each CUDA-only path "
        "run (pass/fail and the error line); their memory is measured and estimated too.",
        "Status: ok; failed / crashed / out of memory (with the error line); skipped (why); stopped (still running "
        "when the budget ran out); not run (the budget was spent first). No figure is filled in for a row that did "
        "not finish.",
        NO_VIDEOS_NOTE,
    ]
    if dry_run:
        text.append("Dry run: the same plan with the tiny presets at 9x32x32 on the CPU (the 8-bit optimizer of two "
                    "rows replaced by torch's AdamW); decord, imageio-ffmpeg, prodigyopt, bitsandbytes and torchao "
                    "were hidden from the row processes. Its figures check the kit, not the estimator.")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks"),
                        help="folder for measured-<gpu>.json|md|png (default: docs/benchmarks/)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"stop cleanly after this many seconds (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--dry-run", action="store_true", help="the same kit on the CPU with the tiny presets")
    parser.add_argument("--rows", help="comma-separated row ids to run (default: all, in the planned order)")
    parser.add_argument("--list", action="store_true", help="print the planned rows and exit")
    parser.add_argument("--worker", choices=("measure", "estimate"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "measure":
        measure_worker(Row.from_dict(json.loads(Path(args.plan).read_text())), Path(args.result))
        return 0
    if args.worker == "estimate":
        estimate_worker([Row.from_dict(r) for r in json.loads(Path(args.plan).read_text())], Path(args.result))
        return 0
    if args.list:
        for row in plan(args.dry_run):
            print(f"{row.id}: {row.model} {row.changes} {'x'.join(map(str, row.shape))} steps {row.steps}"
                  f"{' validation ' + 'x'.join(map(str, row.validation)) if row.validation else ''}")
        return 0
    if args.budget_s < 0:
        parser.error("--budget-s must be >= 0")
    only = [part.strip() for part in args.rows.split(",") if part.strip()] if args.rows else None
    if only:
        unknown = sorted(set(only) - {row.id for row in plan(args.dry_run)})
        if unknown:
            parser.error(f"unknown row ids: {', '.join(unknown)} (see --list)")
    command = shlex.join(["python3", "benchmarks/gpu_acceptance.py", *argv])
    main_thread = threading.current_thread() is threading.main_thread()
    # Killed from outside (a timeout): end the row processes too (they have sessions of their own).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)) if main_thread else None
    try:
        run_kit(Path(args.output), args.budget_s, args.dry_run, command, only)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
