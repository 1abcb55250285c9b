"""`cogtune bench memory` from the command line: grids, outputs, fitting, measuring."""

from __future__ import annotations

import dataclasses
import json

import pytest


def test_estimate_grid_writes_every_output(cli, tmp_path):
    result = cli("bench", "memory", "--model", "tiny,tiny-rotary", "--rank", "4,16", "--gradient-checkpointing", "on,off",
                 "--estimate", "--no-validation", "--json", tmp_path / "m.json", "--markdown", tmp_path / "m.md",
                 "--plot", tmp_path / "m.png")
    assert result.exit_code == 0, result.stderr
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["mode"] == "estimate" and len(document["rows"]) == 8
    markdown = (tmp_path / "m.md").read_text()
    assert "| memory_before_training | memory_before_validation | memory_after_validation | memory_after_testing |" \
        in markdown
    assert markdown.count("\n| tiny") == 8
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "m.config.toml").is_file()


def test_gpu_memory_says_what_fits_and_how_to_fit_the_rest(tmp_path):
    from cogtune.bench.run import BenchConfig, run_bench

    rows = run_bench(BenchConfig(models=("tiny",), gradient_checkpointing=(False,), shapes=("33x256x256",),
                                 gpu_memory=0.5 + 0.06, validation=False))
    (row,) = rows
    assert row["fits"] is False
    assert "gradient checkpointing on" in row["suggestion"]


def test_measure_on_the_cpu_runs_the_real_trainer(cli, tmp_path):
    result = cli("bench", "memory", "--model", "tiny", "--rank", "4", "--measure", "--steps", "3", "--json",
                 tmp_path / "measured.json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads((tmp_path / "measured.json").read_text())["rows"]
    assert row["device"] == "cpu" and row["seconds_per_step"] > 0
    assert row["memory_gib"]["before_training"] > 0


def test_measure_needs_a_gpu_for_real_models(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = cli("bench", "memory", "--model", "cogvideox-5b", "--measure")
    assert result.exit_code == 1 and "needs a GPU" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--rank", "16,abc"), "'abc' is not a int"),
    (("--gradient-checkpointing", "maybe"), "'maybe' is not on or off"),
    (("--estimate", "--measure"), "exclude each other"),
    (("--method", "full", "--base-weights", "fp8"), "the grid is empty"),
    (("--fsdp-gpus", "2", "--measure"), "--measure runs one process"),
    (("--fsdp-gpus", "2", "--offload-blocks", "on"), "FSDP sizing covers bf16 base weights"),
])
def test_bad_grids_are_one_line_errors(cli, args, message):
    result = cli("bench", "memory", "--model", "tiny", *args)
    assert result.exit_code == 1 and message in result.stderr


def test_fsdp_gpus_sizes_one_gpu_of_a_sharded_run():
    """The same run on one GPU, then sharded over 2 (the cache on: the number of GPUs is in its key): the
    weights and optimizer state halve (tiny's rows divide by 2), FSDP's own buffers appear."""
    from cogtune.bench.run import BenchConfig, run_bench

    rows = [run_bench(BenchConfig(models=("tiny",), methods=("full",), fsdp_gpus=gpus, validation=False))[0]
            for gpus in (1, 2)]
    one, shared = (row["breakdown_gib"]["before_training"] for row in rows)
    assert "FSDP, 2 GPUs" in rows[1]["label"] and rows[1]["case"]["fsdp_gpus"] == 2
    assert "FSDP" not in rows[0]["label"]
    assert shared["trainable_weights"] == pytest.approx(one["trainable_weights"] / 2, abs=0.001)
    peak = rows[1]["breakdown_gib"]["before_validation"]
    assert "gathered_weights" in peak and "autocast_weight_copies" not in peak  # tiny's: under a MiB


def test_memory_profile_picks_the_fastest_options_that_fit(tmp_path, tiny_cache):
    """On tiny everything fits 12 GB: the profile turns gradient checkpointing off (the fastest)."""
    from cogtune.config import read_toml
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import LoraConfig, MemoryConfig, ValidationConfig

    result = run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"), steps=2,
                                      lora=LoraConfig(rank=4), memory=MemoryConfig(profile="12gb"),
                                      validation=ValidationConfig(final=False)))
    assert read_toml(result.output_dir / "config.toml")["gradient_checkpointing"] is False


def test_choose_profile_walks_the_ladder_until_it_fits():
    from cogtune.errors import ConfigError
    from cogtune.train import TrainConfig
    from cogtune.train.sizing.fit import choose_profile

    config = TrainConfig(model="tiny", data="<bench>", output_dir="<bench>", random_weights=True)
    chosen, estimate = choose_profile(config, [(33, 256, 256)], None, budget=0.06)
    assert chosen.gradient_checkpointing and estimate.memory.after_testing <= 0.06
    with pytest.raises(ConfigError, match="no memory configuration"):
        choose_profile(config, [(33, 256, 256)], None, budget=0.0001)


RUN_TOML = """
model = "tiny"
data = "{data}"
output_dir = "{out}"
mixed_precision = "bf16"
[lora]
rank = 8
target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
[validation]
prompts = ["A red circle moves left."]
height = 128
guidance = 4.0
"""


def test_bench_config_sizes_exactly_the_run_train_would_start(cli, tiny_cache, tmp_path, monkeypatch):
    """`bench memory --config run.toml` and `train --config run.toml`'s pre-flight size the same run: the same
    TrainConfig (every setting), the cache's buckets and the validation shape the trainer would use."""
    from cogtune.train.sizing import cache as cache_module
    from cogtune.train.sizing import fit

    calls = []
    real = cache_module.cached_estimate

    def recording(config, shapes, validation_shape=None, use_cache=True, fsdp_gpus=1):
        calls.append((config, tuple(shapes), validation_shape))
        return real(config, shapes, validation_shape, use_cache, fsdp_gpus)

    monkeypatch.setattr(fit, "cached_estimate", recording)
    monkeypatch.setattr(cache_module, "cached_estimate", recording)
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML.format(data=tiny_cache, out=tmp_path / "run"))
    result = cli("bench", "memory", "--config", toml, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert row["case"]["rank"] == 8 and "ff.net.2" in row["case"]["target_modules"]
    assert row["case"]["validation_shape"] == [9, 128, 64] and row["bucket"] == "9x64x64"
    benched = calls[-1]

    # The trainer's pre-flight on a (pretended) GPU, for the same file: the same call.
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=80 * 1024**3, name="Big GPU"))
    from cogtune.config import load_config
    from cogtune.train import TrainConfig
    from cogtune.train.plan import plan_run

    config = load_config(TrainConfig, toml)
    fit.fit_memory(config, plan_run(config))
    trained = calls[-1]
    assert trained[1:] == benched[1:]
    assert trained[0] == dataclasses.replace(benched[0], random_weights=False)


def test_the_preflight_sizes_one_gpus_share_of_an_fsdp_launch(tiny_cache, tmp_path, monkeypatch):
    """Under an FSDP launch (accelerate's environment) the trainer's pre-flight sizes one GPU's share over the
    launch's processes; a run whose share is not modelled (block offloading) is not checked."""
    import types

    import torch

    from cogtune.config import replace_settings
    from cogtune.train import TrainConfig
    from cogtune.train.plan import plan_run
    from cogtune.train.sizing import fit

    calls = []

    def recording(config, shapes, validation_shape=None, use_cache=True, fsdp_gpus=1):
        calls.append(fsdp_gpus)
        raise RuntimeError("recorded")  # the check is advice: it warns and the run goes on

    monkeypatch.setattr(fit, "cached_estimate", recording)
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "8", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=80 * 1024**3, name="Big GPU"))
    config = TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"))
    plan = plan_run(config)
    assert fit.fit_memory(config, plan) == config
    offloaded = replace_settings(config, {"memory.offload_blocks": True})
    assert fit.fit_memory(offloaded, plan) == offloaded
    assert calls == [8]


def test_the_estimate_never_stops_a_training_run(tiny_cache, tmp_path, monkeypatch, capsys):
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import LoraConfig, MemoryConfig, ValidationConfig
    from cogtune.train.sizing import fit

    def broken(*args, **kwargs):
        raise RuntimeError("the tracer met an operator it does not know")

    monkeypatch.setattr(fit, "cached_estimate", broken)
    result = run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"), steps=1,
                                      lora=LoraConfig(rank=4), memory=MemoryConfig(profile="12gb"),
                                      validation=ValidationConfig(final=False)))
    assert result.weights.is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "memory profile 12gb" in line]
    assert len(warnings) == 1 and "the estimate failed: the tracer met an operator it does not know" in warnings[0]


def test_bench_config_takes_the_grids_model_where_the_toml_is_silent(cli, tiny_cache, tmp_path):
    """`--config` as `train --config` reads it: a model given on the command line fills in a TOML without one;
    the TOML's other settings still hold. Without either, the error says both ways to give it."""
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML.format(data=tiny_cache, out=tmp_path / "run").replace('model = "tiny"\n', ""))
    result = cli("bench", "memory", "--config", toml, "--model", "tiny", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert row["case"]["model"] == "tiny" and row["case"]["rank"] == 8 and row["bucket"] == "9x64x64"

    result = cli("bench", "memory", "--config", toml)
    assert result.exit_code == 1
    assert "model is required (--model, or `model = ...` in the --config file)" in result.stderr


def test_the_table_and_the_markdown_show_the_same_columns():
    """One decision for both: host RAM only where some configuration needs it, s/step where known, the fit
    where a GPU size is given."""
    from cogtune.bench import output

    def row(host_ram, seconds):
        case = {"model": "tiny", "method": "lora", "rank": 4, "optimizer": "adamw", "gradient_checkpointing": True,
                "fp8": False, "offload_blocks": False, "offload_activations": host_ram > 0, "batch_size": 1}
        return {"label": "tiny", "case": case, "shape": [9, 64, 64], "host_ram_gib": host_ram, "fits": True,
                "seconds_per_step": seconds, "memory_gib": dict.fromkeys(output.BREAKDOWN_MOMENTS, 1.0)}

    for rows, budget, expected in [
        ([row(0.0, 0.5), row(0.0, None)], None, ["s/step"]),
        ([row(0.0, 0.5), row(2.0, 0.5)], 24.0, ["host RAM", "s/step", "fits 24 GiB"]),
    ]:
        columns = [name for name, _ in output.optional_columns(rows, budget)]
        assert columns == expected
        header = output.markdown(rows, "t", budget).splitlines()[2]
        assert header.endswith(" | ".join(output.MOMENTS + tuple(expected)) + " |")
        assert ("host RAM" in header) == ("host RAM" in expected)


def test_bench_memory_keeps_every_option_and_alias(cli):
    """Made from BenchConfig's fields, the command still takes every option (and short alias) it had."""
    import typer

    from cogtune.cli.app import app

    command = typer.main.get_command(app).commands["bench"].commands["memory"]
    names = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    assert {"--model", "-m", "--method", "--rank", "--gradient-checkpointing", "--optimizer", "--batch-size",
            "--frames", "-F", "--height", "-H", "--width", "-W", "--shape", "--base-weights", "--offload-blocks",
            "--offload-activations", "--no-validation", "--estimate", "--measure", "--gpu-memory", "--host-memory",
            "--gpu", "--steps", "--json", "--markdown", "--plot", "--breakdown", "--random-weights", "--config",
            "--data", "-d"} <= names
    result = cli("bench", "memory", "--help")
    assert result.exit_code == 0 and "Comma-separated." in result.stdout and "on|off,..." in result.stdout
