"""Multi-process runs on the CPU: `accelerate launch` with cogtune's generated configs, over gloo.

`accelerate_launch` runs the launchers (accelerate's CLI, torchrun) as a user does; most runs of the
equality, resume and resharding tests fork their processes instead (forked.py): the same environment and
code, without starting an interpreter per process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

VALIDATION_PROMPTS = ("A red circle moves left.", "A blue square moves right.", "A green ball bounces.")


@pytest.fixture(scope="session")
def three_prompt_cache(run_once, synthetic_data, cogtune_home):
    """A t2v cache for `tiny` with three validation prompts (more prompts than the 2 processes)."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    return run_once("tiny-3-prompts", lambda root: encode_dataset(EncodeConfig(
        model="tiny", output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)), buckets=("9x64x64",),
        validation_prompts=VALIDATION_PROMPTS, num_workers=0)))


@pytest.fixture(scope="session")
def i2v_cache(run_once, synthetic_data, cogtune_home):
    """An i2v cache for `tiny-i2v` (condition latents with 2 noise-augmented copies each)."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    return run_once("tiny-i2v-cache", lambda root: encode_dataset(EncodeConfig(
        model="tiny-i2v", output_dir=str(root), data=DatasetConfig(root=str(synthetic_data)), buckets=("9x64x64",),
        image_noise_samples=2, num_workers=0)))


@pytest.fixture(scope="session")
def shared_runs(run_once):
    """`shared_runs(name, train)`: (folder, log) of the run `train(folder) -> log` makes, trained once per test
    run: test_training.py and test_reshard.py start from the same runs, on whichever xdist worker asks first."""

    def get(name: str, train) -> tuple[Path, str]:
        def build(root: Path) -> None:
            root.mkdir(parents=True)
            (root / "launch.log").write_text(train(root / "run"))

        root = run_once(f"run-{name}", build)
        return root / "run", (root / "launch.log").read_text()

    return get


def write_accelerate_config(folder: Path, strategy: str, **settings) -> Path:
    """The file `cogtune config accelerate` prints, for CPU processes (no mixed precision)."""
    from cogtune.accelerate_config import LaunchSettings, accelerate_config_yaml

    settings.setdefault("main_process_port", free_port())
    path = folder / f"{strategy}.yaml"
    path.write_text(accelerate_config_yaml(LaunchSettings(strategy, mixed_precision="no", **settings)))
    return path


def accelerate_launch(config_file: Path, *args: str, machine_rank: int | None = None,
                      record_latents: Path | None = None) -> subprocess.Popen:
    """`accelerate launch --config_file FILE -m cogtune ARGS`, started in the background.

    `python -m accelerate.commands.launch` is what the `accelerate launch` command runs; calling it
    through this Python keeps the test independent of the PATH. The processes start with
    launch_hooks/ on their path: DeepSpeed over gloo, and with `record_latents` every rendered video's
    latents saved in that folder (see launch_hooks/sitecustomize.py).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if machine_rank is not None:
        command += ["--machine_rank", str(machine_rank)]
    command += ["-m", "cogtune", *[str(a) for a in args]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(LAUNCH_HOOKS), os.environ.get("PYTHONPATH")])))
    if "distributed_type: DEEPSPEED" in config_file.read_text():
        env["COGTUNE_TEST_GLOO_ONLY"] = "1"
    if record_latents is not None:
        env["COGTUNE_TEST_RECORD_LATENTS"] = str(record_latents)
    # A session of its own, so that a hung launch is killed with all its worker processes.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


LAUNCH_HOOKS = Path(__file__).parent / "launch_hooks"


def finish(process: subprocess.Popen, timeout: float = 240, check: bool = True) -> str:
    """Wait for a launch (killing it past `timeout`: a hang fails the test) and return its output; with
    `check`, the launch must also have succeeded."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the launch hung for {timeout} s:\n{output[-3000:]}") from None
    assert process.returncode == 0 or not check, output[-4000:]
    return output
