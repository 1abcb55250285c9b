"""`cogtune bench memory` from the command line: grids, outputs, fitting, measuring."""

from __future__ import annotations

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
    (("--method", "full", "--fp8", "on"), "the grid is empty"),
])
def test_bad_grids_are_one_line_errors(cli, args, message):
    result = cli("bench", "memory", "--model", "tiny", *args)
    assert result.exit_code == 1 and message in result.stderr


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
    from cogtune.bench.cases import BenchCase
    from cogtune.bench.fit import choose_profile

    case = BenchCase("tiny", frames=33, height=256, width=256, validation=False)
    chosen, estimate = choose_profile(case, budget=0.06)
    assert chosen.gradient_checkpointing and estimate.memory.after_testing <= 0.06
    import pytest as _pytest

    from cogtune.errors import ConfigError

    with _pytest.raises(ConfigError, match="no memory configuration"):
        choose_profile(case, budget=0.0001)


def test_training_warns_before_a_run_that_will_not_fit(monkeypatch, tiny_cache, tmp_path, capsys):
    import types

    import torch

    from cogtune.train import TrainConfig
    from cogtune.train.config import LoraConfig
    from cogtune.train.loop import fit_memory, plan_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=int(0.52 * 1024**3), name="Tiny GPU"))
    config = TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path / "run"), lora=LoraConfig(rank=4),
                         gradient_checkpointing=False)
    assert fit_memory(config, plan_run(config)) == config
    assert "will likely run out of memory" in capsys.readouterr().err
