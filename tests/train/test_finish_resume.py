"""A run trained to its last step whose finish was cut short (killed during the final validation, a full
disk while memory.json was written) is finished by `--resume latest`, which writes only what is missing
and says what it wrote."""

from __future__ import annotations

from cogtune.errors import StorageError
from cogtune.train.run_folder import RunFolder


def _train(cli, cache, out, *extra):
    return cli("train", "t2v", "--model", "tiny", "--data", cache, "--output-dir", out, "--steps", "2", "--rank", "4",
               "--checkpoint-every", "1", "--validation-steps", "2", *extra)


def test_killed_during_the_final_validation_then_resumed(cli, tiny_cache, tmp_path, monkeypatch):
    from cogtune.train import loop

    real = loop._validate

    def killed_at_the_final_pass(training, validator, memory_log, name, step):
        if name == "final":
            raise KeyboardInterrupt  # what a kill leaves: nothing after this point ran
        return real(training, validator, memory_log, name, step)

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "_validate", killed_at_the_final_pass)
    assert _train(cli, tiny_cache, out).exit_code == 130
    run = RunFolder(out)
    assert run.lora_weights.exists() and run.checkpoint(2).exists()
    assert not run.final_validation.exists() and not run.memory.exists() and not run.model_card.exists()
    weights = run.lora_weights.read_bytes()

    monkeypatch.setattr(loop, "_validate", real)
    result = _train(cli, tiny_cache, out, "--resume", "latest")
    assert result.exit_code == 0, result.stderr
    assert "training is done" in result.stderr
    assert "run finished: wrote validation/final/, memory.json, loss.png, training_summary.json, README.md" \
        in result.stderr.replace("\n", " ")
    assert (run.final_validation / "00.mp4").is_file()
    assert run.memory.exists() and run.loss_curve.exists() and run.summary.exists() and run.model_card.exists()
    assert run.lora_weights.read_bytes() == weights  # the checkpoint's weights are the final ones: not rewritten
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000001", "step-000002"]


def test_a_full_disk_at_memory_json_then_resumed(cli, tiny_cache, tmp_path, monkeypatch):
    from cogtune.train.memory import MemoryLog

    real = MemoryLog.write

    def full(self, path):
        raise StorageError(f"no space left on device while writing {path}")

    out = tmp_path / "run"
    monkeypatch.setattr(MemoryLog, "write", full)
    result = _train(cli, tiny_cache, out)
    assert result.exit_code == 1 and "no space left on device" in result.stderr
    run = RunFolder(out)
    videos = {p.name: p.stat().st_mtime_ns for p in run.final_validation.iterdir()}
    assert videos and not run.memory.exists()

    monkeypatch.setattr(MemoryLog, "write", real)
    result = _train(cli, tiny_cache, out, "--resume", "latest")
    assert result.exit_code == 0, result.stderr
    assert "run finished: wrote memory.json, loss.png, training_summary.json, README.md" \
        in result.stderr.replace("\n", " ")
    assert {p.name: p.stat().st_mtime_ns for p in run.final_validation.iterdir()} == videos  # not rendered again


def test_a_checkpoint_past_the_steps_is_still_refused(cli, tiny_cache, tmp_path):
    out = tmp_path / "run"
    assert _train(cli, tiny_cache, out, "--no-validation-final").exit_code == 0
    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", out, "--steps", "1",
                 "--rank", "4", "--resume", "latest")
    assert result.exit_code == 1 and "leaves nothing to train" in result.stderr
