"""Ctrl-C during training stops after the step in progress, saves a checkpoint, and says how to resume."""

from __future__ import annotations

import json
import os
import shlex
import signal

from cogtune.train.interrupt import resume_command


def test_the_resume_command_is_the_starting_one_with_resume_latest():
    assert resume_command(["cogtune", "train", "t2v", "--model", "tiny", "--overwrite", "--resume", "x"]) == \
        "cogtune train t2v --model tiny --resume latest"
    assert resume_command(["cogtune", "train", "t2v", "--output-dir", "my runs/a"]) == \
        "cogtune train t2v --output-dir 'my runs/a' --resume latest"


def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes(cli, tiny_cache, tmp_path, monkeypatch):
    import cogtune.train.loop as loop

    real = loop.current_learning_rate
    calls = []

    def interrupted_during_step_two(optimizer):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C would
        return real(optimizer)

    monkeypatch.setattr(loop, "current_learning_rate", interrupted_during_step_two)
    out = tmp_path / "run"
    args = ["train", "t2v", "--model", "tiny", "--data", str(tiny_cache), "--output-dir", str(out), "--steps", "5",
            "--rank", "4", "--checkpoint-every", "0", "--no-validation-final"]
    result = cli(*args)
    assert result.exit_code == 130  # as a shell reports Ctrl-C; a failed run exits with 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert f"error: interrupted at step 2 of 5; checkpoint saved: {out / 'checkpoints' / 'step-000002'}" in line
    command = line.split("resume with: ")[1].rstrip(")")
    assert command == shlex.join(["cogtune", *args, "--resume", "latest"])
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file()

    monkeypatch.setattr(loop, "current_learning_rate", real)
    resumed = cli(*shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.stderr
    assert len(json.loads((out / "training_summary.json").read_text())["losses"]) == 5
