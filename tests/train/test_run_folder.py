"""The run folder names every path a run writes, and `--overwrite` deletes exactly those.

The oracle is a real run's folder: everything a run with every output switched on leaves there
is declared on `RunFolder`, and `--overwrite`'s deletion leaves only what the user put there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cogtune.train.config import CheckpointConfig, EvaluationConfig, LoraConfig, TrainConfig, ValidationConfig
from cogtune.config import write_config
from cogtune.train.run_folder import RunFolder, _Output, check_run_folder, step_name, weights_in


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
                             validation=ValidationConfig(every=1, steps=2),
                             evaluation=EvaluationConfig(split=0.25, keep_best=True)))
    return out


def test_everything_a_run_writes_is_declared_and_overwrite_deletes_it(full_run, tiny_cache):
    written = {path.name for path in full_run.iterdir()}
    assert written <= set(RunFolder.outputs()), written - set(RunFolder.outputs())
    for expected in ("checkpoints", "validation", "README.md", "model_card.gif", "memory.json", "loss.png",
                     "lora_comfyui.safetensors", "lora_kohya.safetensors", "validation_prompts.safetensors",
                     "heldout_items.json", "evaluation.json", "best"):
        assert expected in written

    (full_run / "notes.txt").write_text("mine\n")
    check_run_folder(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(full_run), overwrite=True))
    assert [path.name for path in full_run.iterdir()] == ["notes.txt"]


def test_a_new_output_declared_on_the_run_folder_is_deleted_by_overwrite(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setattr(RunFolder, "extra", _Output("extra.json"), raising=False)
    run = RunFolder(tmp_path)
    config = TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(tmp_path), overwrite=True)
    write_config(config, tmp_path)  # the earlier run's record
    run.extra.write_text("{}")  # type: ignore[attr-defined]
    check_run_folder(config)
    assert not list(Path(tmp_path).iterdir())


def _train(cli, cache, output, *extra):
    return cli("train", "t2v", "--model", "tiny", "--data", cache, "--output-dir", output, "--steps", "1", *extra)


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--resume", "latest"), ("--full", "--overwrite")])
def test_a_model_or_a_cache_is_never_trained_into_nor_deleted(cli, tmp_path, tiny_cache, tiny_model_dir, flags):
    """A diffusers model folder (it has transformer/, which a full fine-tune writes) and a latent cache (it has
    a config.toml, which every run writes) are refused in one line, with or without --overwrite and --resume."""
    import shutil

    model, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_cache, cache)
    for folder, what in ((model, "a diffusers pipeline (model_index.json)"),
                         (cache, "a cogtune latent cache (manifest.json)")):
        before = _tree(folder)
        result = _train(cli, tiny_cache, folder, *flags)
        assert result.exit_code == 1, result.stderr
        assert f"{folder} is not a cogtune training run: it holds {what}" in result.stderr
        assert "Traceback" not in result.stderr
        assert _tree(folder) == before


def test_overwrite_deletes_only_what_the_earlier_run_recorded(cli, tmp_path, tiny_cache):
    """A LoRA run never wrote transformer/ or a kohya file (it did not ask for one): a user's are kept."""
    out = tmp_path / "run"
    assert _train(cli, tiny_cache, out, "--rank", "4").exit_code == 0
    (out / "transformer").mkdir()
    (out / "transformer" / "mine.txt").write_text("mine")
    (out / "lora_kohya.safetensors").write_text("mine too")
    result = _train(cli, tiny_cache, out, "--rank", "4", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert (out / "transformer" / "mine.txt").read_text() == "mine"
    assert (out / "lora_kohya.safetensors").read_text() == "mine too"
    assert "--overwrite: deleted the previous run's outputs" in result.stderr
