"""The GPU acceptance kit (`benchmarks/gpu_acceptance.py`), proven on the CPU with `--dry-run`.

The dry run is the kit's own code path (a process per row, the estimate beside it, errors, outputs),
with the tiny presets on the CPU; the CUDA-only rows say "skipped: needs CUDA". Nothing here times anything.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cogtune.generate import LABEL_HEIGHT

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_acceptance", None)


def read_outputs(folder: Path) -> tuple[dict, str]:
    assert sorted(p.name for p in folder.iterdir()) == [
        "measured-cpu-dry-run.json", "measured-cpu-dry-run.md", "measured-cpu-dry-run.png"]
    assert (folder / "measured-cpu-dry-run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return (json.loads((folder / "measured-cpu-dry-run.json").read_text()),
            (folder / "measured-cpu-dry-run.md").read_text())


@pytest.mark.slow
def test_dry_run_measures_estimates_and_compares_every_planned_row(kit, tmp_path, capsys):
    # The kit's main in this process (its rows and the estimate in processes of their own, as always); the
    # script run as a command is the test of a row stopped at the end of the budget, below.
    assert kit.main(["--dry-run", "--output", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert said.count(": running (") == sum(not row.cuda_only for row in kit.plan(dry_run=True)), said
    document, text = read_outputs(tmp_path / "out")

    planned = kit.plan(dry_run=True)
    assert [row["id"] for row in document["rows"]] == [row.id for row in planned]
    assert document["finished"] is True
    assert document["command"] == f"python3 benchmarks/gpu_acceptance.py --dry-run --output {tmp_path / 'out'}"
    env = document["environment"]
    assert env["dry_run"] is True and env["device"] == "cpu"
    assert env["versions"]["torch"] and env["versions"]["diffusers"] and env["versions"]["python"]
    for row, plan in zip(document["rows"], planned):
        assert row["estimate"] is not None, row  # every row is estimated, run or not
        assert row["estimate"]["memory_gib"]["after_testing"] > 0
        if plan.cuda_only:
            assert row["status"] == "skipped" and row["reason"] == "skipped: needs CUDA"
            assert row["measured"] is None and row["error_pct"] is None and "no measurement" in row["error_reason"]
            continue
        assert row["status"] == "ok", row
        measured = row["measured"]
        assert set(measured["memory_gib"]) == {"before_training", "before_validation", "after_validation",
                                               "after_testing"}
        assert measured["seconds_per_step"] > 0 and measured["device"] == "cpu"
        assert row["error_pct"]["after_testing"] is not None
        assert "not comparable" in row["error_reason"]  # RSS on the CPU against GPU figures
        assert row["mfu"] is None and row["mfu_reason"]
        # The validation pass ran at the row's shape, and wrote no video file (a LoRA row's base | LoRA video
        # too: two frames side by side under a label strip).
        frames, height, width = plan.validation
        side_by_side = [] if plan.changes.get("full") else [[frames, height + LABEL_HEIGHT, 2 * width, 3]]
        assert row["videos_not_written"] == [[*plan.validation, 3], *side_by_side]
    assert document["rows"][0]["label"].startswith("tiny-rotary LoRA r64")
    for row in planned:
        assert f"| {row.id} |" in text
    assert "command" in text and "--dry-run" in text and "torch" in text
    assert "not written" in text  # the note on the patched video writer


def test_a_spent_budget_stops_cleanly_and_lists_the_rest_as_not_run(kit, tmp_path, monkeypatch, capsys):
    # A clock that jumps past the budget as soon as the first row is started: that row finishes (its
    # process waits on real time), no later row starts.
    now = {"t": 0.0}
    spawn = kit._spawn

    def spawn_then_spend(args, log, env):
        process = spawn(args, log, env)
        if args[1] == "measure":
            now["t"] = 1000.0
        return process

    monkeypatch.setattr(kit, "clock", lambda: now["t"])
    monkeypatch.setattr(kit, "_spawn", spawn_then_spend)
    assert kit.main(["--dry-run", "--output", str(tmp_path), "--budget-s", "300"]) == 0
    document, text = read_outputs(tmp_path)

    first, *rest = document["rows"]
    assert first["status"] == "ok" and first["measured"]["memory_gib"]["after_testing"] > 0
    assert first["estimate"] is not None or first["estimate_reason"] == "the estimate did not finish within the budget"
    for row in rest:
        assert row["measured"] is None and row["mfu"] is None
        if row["plan"]["cuda_only"]:
            assert row["status"] == "skipped"
        else:
            assert row["status"] == "not run"
            assert row["reason"] == "the budget (--budget-s 300) was spent before it started"
    assert document["finished"] is True
    assert "| not run |" in text


def test_a_row_still_running_at_the_end_of_the_budget_is_stopped(kit, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--output", str(tmp_path), "--budget-s", "0.5",
                             "--rows", "5b-lora-r64-ckpt,2b-lora-r64-ckpt"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document, _ = read_outputs(tmp_path)
    assert [row["id"] for row in document["rows"]] == ["5b-lora-r64-ckpt", "2b-lora-r64-ckpt"]
    first, second = document["rows"]
    # Started and stopped at the budget, or (on a very loaded machine) never started: never a figure.
    assert first["status"] in ("stopped", "not run")
    assert second["status"] == "not run"
    assert all(row["measured"] is None for row in document["rows"])


def test_the_gpu_plan_runs_the_most_informative_rows_first(kit):
    rows = kit.plan(dry_run=False)
    ids = [row.id for row in rows]
    assert ids[:4] == ["5b-lora-r64-ckpt", "2b-lora-r64-ckpt", "5b-lora-r64-fp8-offload-act-adamw8bit",
                       "5b-lora-r64-offload-blocks-act"]
    assert ids[4:8] == ["5b-lora-r64-nf4", "5b-lora-r64-int8", "1.5-5b-lora-r64-ckpt-81x768x1360",
                        "1.5-5b-lora-r64-nf4-81x768x1360"]
    assert ids[-1] == "5b-full-adamw8bit-ckpt"
    assert all(row.kind == "quick" and row.cuda_only for row in rows[8:-1])
    assert {row.changes.get("optimizer.name") for row in rows[8:-1]} >= {
        "adamw-8bit", "adamw-8bit-ao", "adamw-4bit-ao", "adamw-cpu-offload"}
    assert any(row.changes.get("memory.compile") for row in rows) and any(
        row.changes.get("memory.base_weights") == "fp8" for row in rows[8:-1])
    for row in rows:
        if row.kind == "memory":
            assert row.validation == (49, 480, 720) and row.steps >= 3
        case = kit.build_case(row)  # every row is a run the trainer accepts, at shapes its model accepts
        named = {"bucket": row.shape, **({"validation": row.validation} if row.validation else {})}
        from cogtune.train.sizing.estimate import model_spec

        model_spec(case.config.model).check_clip_shapes(named)
        assert case.config.random_weights and not case.config.memory.check


def test_missing_packages_and_missing_cuda_skip_a_row_instead_of_failing_the_kit(kit):
    (row,) = [r for r in kit.plan(dry_run=False) if r.id == "quick-adamw-8bit"]
    assert kit.skip_reason(row, cuda=False) == "skipped: needs CUDA"
    assert kit.skip_reason(row, cuda=True, find_spec=lambda name: None) == "skipped: bitsandbytes not installed"
    assert kit.skip_reason(row, cuda=True, find_spec=lambda name: object()) is None


def test_an_out_of_memory_row_is_a_result_with_its_peak(kit):
    row = kit.plan(dry_run=False)[0]
    outcome = {"status": "out of memory", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB",
               "peak_at_failure_gib": {"reserved": 139.2, "allocated": 137.9}}
    estimate = {"status": "ok", "memory_gib": {"after_testing": 20.0, "allocated_peak": 18.0}, "label": "5b",
                "teraflops_per_step": 1000.0, "seconds": 3.0}
    env = {"dry_run": False, "torch_cuda_available": True, "gpu": "NVIDIA H200", "device": "cuda",
           "versions": {}, "cuda": "13.0"}
    combined = kit.combine(row, outcome, estimate, env)
    assert combined["measured"] is None and combined["error_reason"] == "no measurement (out of memory)"
    document = {"title": "t", "environment": env, "rows": [combined], "notes": [], "command": "c", "budget_s": 1.0,
                "elapsed_s": 1.0, "finished": True}
    assert "139.20 GiB when it failed" in kit.markdown(document)
    error = RuntimeError("wrapped")
    error.__cause__ = MemoryError("CUDA out of memory")
    assert kit._is_oom(error) and not kit._is_oom(RuntimeError("no"))


def test_mfu_is_the_estimated_flops_over_the_measured_step_and_the_gpus_peak(kit):
    row = kit.plan(dry_run=False)[0]
    memory = {"before_training": 10.0, "before_validation": 20.0, "after_validation": 20.0, "after_testing": 22.0}
    outcome = {"status": "ok", "measurement": {"label": "x", "memory_gib": memory, "allocated_peak_gib": 20.0,
                                               "seconds_per_step": 2.0, "device": "NVIDIA H200"}}
    estimate = {"status": "ok", "label": "x", "teraflops_per_step": 989.0, "seconds": 1.0,
                "memory_gib": {**{k: v * 1.1 for k, v in memory.items()}, "allocated_peak": 19.0}}
    env = {"dry_run": False, "torch_cuda_available": True, "gpu": "NVIDIA H200"}
    combined = kit.combine(row, outcome, estimate, env)
    assert combined["mfu"] == 0.5  # 989 TFLOP / (2 s x 989 TFLOP/s)
    assert combined["error_pct"]["after_testing"] == 10.0 and combined["error_pct"]["allocated_peak"] == -5.0
    assert kit.gpu_slug({"dry_run": False, "gpu": "NVIDIA H200"}) == "h200"


def test_an_offloading_row_compares_what_it_pins_with_the_estimate(kit):
    """The host side of a GPU row: torch's pinned allocator's peak (`torch.cuda.host_memory_stats`, through the
    trainer's memory.json) against the estimate's pinned parts, with its error and a table of its own."""
    row = next(r for r in kit.plan(dry_run=False) if "offload" in r.id)
    memory = {"before_training": 10.0, "before_validation": 20.0, "after_validation": 20.0, "after_testing": 22.0}
    outcome = {"status": "ok", "measurement": {"label": "x", "memory_gib": memory, "allocated_peak_gib": 20.0,
                                               "seconds_per_step": 2.0, "device": "NVIDIA H200",
                                               "host_gib": {"rss_gib": 31.0, "pinned_gib": 20.0}}}
    estimate = {"status": "ok", "label": "x", "teraflops_per_step": 989.0, "seconds": 1.0,
                "memory_gib": {**memory, "allocated_peak": 20.0}, "host_ram_gib": 25.0, "pinned_host_gib": 18.0}
    env = {"dry_run": False, "torch_cuda_available": True, "gpu": "NVIDIA H200", "device": "cuda", "versions": {}}
    combined = kit.combine(row, outcome, estimate, env)
    assert combined["error_pct"]["pinned_host"] == -10.0
    document = {"title": "t", "environment": env, "rows": [combined], "notes": [], "command": "c", "budget_s": 1.0,
                "elapsed_s": 1.0, "finished": True}
    assert f"| {row.id} | 20.00 | 18.00 | -10.0% | 31.00 | 25.00 |" in kit.markdown(document)
    # a row that pins nothing by design has no host error to give
    plain = kit.combine(row, outcome, {**estimate, "pinned_host_gib": 0.0}, env)
    assert "pinned_host" not in plain["error_pct"]


def test_the_peak_in_its_parts_from_torchs_allocation_trace(kit):
    """The GPU rows replay `torch.cuda.memory._snapshot()`'s trace: what is live at the allocated peak, grouped
    by the code that allocated it, beside the estimate's parts at its peak grouped the same way."""
    def frames(*names):
        return [{"filename": f"/x/{name}.py", "name": name, "line": 1} for name in names]

    trace = [
        {"action": "alloc", "addr": 1, "size": 10 << 30, "frames": frames("load_trainable_transformer")},
        {"action": "alloc", "addr": 2, "size": 4 << 30, "frames": frames("forward", "training_step")},
        # a checkpointed block's recompute: forward code inside backward
        {"action": "alloc", "addr": 3, "size": 3 << 30, "frames": frames("checkpoint", "_engine_run_backward")},
        {"action": "free_requested", "addr": 3},
        {"action": "free_completed", "addr": 3},
        {"action": "alloc", "addr": 4, "size": 1 << 30, "frames": frames("adamw", "torch/optim/optimizer")},
        {"action": "alloc", "addr": 5, "size": 2 << 30, "frames": frames("something_else")},
    ]
    measured = kit.parts_at_peak({"device_traces": [trace]})
    assert measured == {"allocated_peak_gib": 17.0, "trace_whole": True,
                        "parts_gib": {"weights": 10.0, "forward": 4.0, "backward": 3.0}}
    estimated = kit.estimate_groups({"frozen_weights": 9.5, "trainable_weights": 0.5, "saved_activations": 4.2,
                                     "recomputed_activations": 2.5, "backward_transients": 0.1, "workspaces": 0.03,
                                     "allocator_slack": 2.0})
    assert estimated == {"weights": 10.0, "forward": 4.2, "backward": 2.6, "other": 0.03}
    compared = kit.compare_parts(estimated, measured["parts_gib"])
    assert compared["backward"] == {"estimated_gib": 2.6, "measured_gib": 3.0, "difference_gib": -0.4}
    assert compared["other"]["measured_gib"] == 0.0
