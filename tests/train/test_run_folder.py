"""The run folder names every path a run writes, and `--overwrite` deletes exactly those.

The oracle is a real run's folder: everything a run with every output switched on leaves there
is declared on `RunFolder`, and `--overwrite`'s deletion leaves only what the user put there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cogtune.train.config import CheckpointConfig, LoraConfig, TrainConfig, ValidationConfig
from cogtune.train.run_folder import RunFolder, _Output, check_new_run_folder, step_name, weights_in


def test_paths_inside_the_run_folder(tmp_path):
    run = RunFolder(tmp_path)
    assert run.checkpoint(12) == tmp_path / "checkpoints" / "step-000012" == run.checkpoints / step_name(12)
    assert run.validation(step_name(4)) == tmp_path / "validation" / "step-000004"
    assert run.final_validation == tmp_path / "validation" / "final"
    assert run.weights(full=False) == tmp_path / "pytorch_lora_weights.safetensors"
    assert run.weights(full=True) == tmp_path / "transformer"
    assert weights_in(run.checkpoint(2), full=True) == run.checkpoint(2) / "transformer"
    assert run.layout("comfyui") == tmp_path / "lora_comfyui.safetensors"
    assert (run.memory, run.loss_curve, run.summary) == (
        tmp_path / "memory.json", tmp_path / "loss.png", tmp_path / "training_summary.json")
    assert RunFolder(str(tmp_path)) == run
    assert set(RunFolder.markers()) < set(RunFolder.outputs())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_cache):
    """A run with every output it can write: checkpoints, validation passes, the other LoRA layouts, logs."""
    from cogtune.train import run_training

    out = tmp_path_factory.mktemp("run-folder") / "run"
    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(out), steps=2,
                             lora=LoraConfig(rank=4, save_format="diffusers,comfyui,kohya"), report_to=tracker,
                             checkpointing=CheckpointConfig(every=1, keep=0),
                             validation=ValidationConfig(every=1, steps=2)))
    return out


def test_everything_a_run_writes_is_declared_and_overwrite_deletes_it(full_run, tiny_cache):
    written = {path.name for path in full_run.iterdir()}
    assert written <= set(RunFolder.outputs()), written - set(RunFolder.outputs())
    for expected in ("checkpoints", "validation", "README.md", "model_card.gif", "memory.json", "loss.png",
                     "lora_comfyui.safetensors", "lora_kohya.safetensors", "validation_prompts.safetensors"):
        assert expected in written

    (full_run / "notes.txt").write_text("mine\n")
    check_new_run_folder(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(full_run), overwrite=True))
    assert [path.name for path in full_run.iterdir()] == ["notes.txt"]


def test_a_new_output_declared_on_the_run_folder_is_deleted_by_overwrite(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setattr(RunFolder, "extra", _Output("extra.json"), raising=False)
    run = RunFolder(tmp_path)
    run.config_file.write_text("")
    run.extra.write_text("{}")  # type: ignore[attr-defined]
    check_new_run_folder(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path), overwrite=True))
    assert not list(Path(tmp_path).iterdir())
