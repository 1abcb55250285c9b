"""A DeepSpeed checkpoint on another number of processes, or without DeepSpeed: refused in one line, before any
weight loads.

DeepSpeed keeps the ZeRO optimizer state as one partition per process and loads it on as many
processes only (its own error: "Automatic adjustment of ZeRO's optimizer state partitioning with a
new world size is not currently supported"), under every ZeRO stage (the check is the same for all,
so ZeRO-2 stands for them here); nor does it load a
checkpoint it did not write (an AssertionError deep inside). cogtune says so up front.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from tests.distributed.conftest import accelerate_launch, write_accelerate_config
from tests.distributed.test_training import ARGS

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install cogtune[deepspeed])"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="DeepSpeed needs a C++ compiler (c++ or g++) to build its op at the first start"),
]


@pytest.fixture
def launch(tmp_path, tiny_cache):
    """`launch(strategy, processes, output, *extra)`: `accelerate launch` of 2 training steps (a checkpoint at
    step 2) on `processes` x batch (2 / processes); its exit code and its output, unwrapped."""

    def run(strategy: str, processes: int, output: str, *extra) -> tuple[int, str]:
        folder = tmp_path / f"{strategy}-{processes}"
        folder.mkdir(exist_ok=True)
        config = write_accelerate_config(folder, strategy, gpus=processes)
        process = accelerate_launch(config, "train", "t2v", *ARGS, "--steps", "2", "--data", tiny_cache,
                                    "--output-dir", tmp_path / output, "--batch-size", str(2 // processes), *extra)
        log, _ = process.communicate(timeout=400)
        return process.returncode, " ".join(log.split())

    return run


def _errors(log: str) -> list[str]:
    return [f"error:{part.split(' (hint:')[0]}" for part in log.split("error:")[1:]]


@pytest.mark.slow
def test_a_zero2_checkpoint_of_two_processes_is_refused_on_one(launch, cli, tmp_path, tiny_cache):
    code, log = launch("zero2", 2, "two")
    assert code == 0, log[-3000:]
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000002"
    assert (checkpoint / "pytorch_model").is_dir()

    code, log = launch("zero2", 1, "one-deepspeed", "--resume", checkpoint)  # DeepSpeed, 1 process
    assert code != 0
    assert _errors(log) == [f"error: {checkpoint} holds DeepSpeed's ZeRO state split over 2 processes, which only "
                            "DeepSpeed on 2 processes can resume; this launch is DeepSpeed on 1 process"]
    assert "training run" not in log  # before the run's summary, so before any weight loads

    result = cli("train", "t2v", *ARGS, "--steps", "2", "--data", tiny_cache, "--output-dir", tmp_path / "one",
                 "--batch-size", "2", "--resume", checkpoint)  # one process without DeepSpeed
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {checkpoint} holds DeepSpeed's ZeRO state split over 2 processes, which only DeepSpeed on 2 "
        "processes can resume; this launch is one process without DeepSpeed (hint: resume it with a DeepSpeed launch "
        "of 2 processes, or train without --resume)"]


@pytest.mark.slow
def test_a_checkpoint_written_without_deepspeed_is_refused_under_deepspeed(launch, cli, tmp_path, tiny_cache):
    plain = cli("train", "t2v", *ARGS, "--steps", "2", "--data", tiny_cache, "--output-dir", tmp_path / "plain",
                "--batch-size", "2")
    assert plain.exit_code == 0, plain.stderr
    checkpoint = tmp_path / "plain" / "checkpoints" / "step-000002"
    code, log = launch("zero3", 2, "plain-to-two", "--resume", checkpoint)
    assert code != 0
    # every process refuses it; the user reads it once
    assert _errors(log) == [f"error: {checkpoint} was written without DeepSpeed, and DeepSpeed resumes only its own "
                            "checkpoints"]
    assert "training run" not in log  # before the run's summary, so before any weight loads
