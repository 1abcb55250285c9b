"""Two "machines" on this one: the README's multi-machine commands, run on loopback.

- DDP through `torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1 --master_addr --master_port`
  (torch's static rendezvous, what the README shows), equal to one process with the same global
  batch. This is also the suite's test of a torchrun launch training as one process does (one machine's
  `torchrun --nproc_per_node 2` sets the same variables and runs the same cogtune code). FSDP2 hybrid over two machines needs accelerate's config (torchrun alone asks for DDP):
  `test_training.py::test_hybrid_shard_over_two_machines_equals_one_process` runs it through two
  `accelerate launch --machine_rank 0|1`.
- A machine that never joins: the launcher waits for it in its rendezvous, before any cogtune code
  runs, for `--rdzv_conf timeout=SECONDS` (600 s unless set), then exits 1 with torch's line
  "Timed out after N seconds waiting for clients. 1/2 clients joined." as the last one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.distributed.conftest import write_accelerate_config
from tests.distributed.test_training import TOLERANCE, Run, _in_process, _max_difference
from tests.ports import free_port

ARGS = ("--model", "tiny", "--steps", "3", "--rank", "4", "--lr", "1e-3", "--lr-schedule", "cosine",
        "--warmup-steps", "1", "--gradient-accumulation", "2", "--no-validation-final")


def torchrun(node_rank: int, port: int, *args, rdzv_timeout: int | None = None) -> subprocess.Popen:
    """`torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --master_addr 127.0.0.1 --master_port P -m cogtune ARGS`.

    `python -m torch.distributed.run` is what the `torchrun` command runs.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    if rdzv_timeout is not None:
        command += ["--rdzv_conf", f"timeout={rdzv_timeout}"]
    command += ["-m", "cogtune", *[str(a) for a in args]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_ddp_over_two_torchrun_machines_equals_one_process(tmp_path, three_prompt_cache):
    args = ["train", "t2v", *ARGS, "--data", three_prompt_cache, "--batch-size", "1"]
    port = free_port()
    launches = [torchrun(rank, port, *args, "--output-dir", tmp_path / "two") for rank in (0, 1)]
    log = [_finish(launch) for launch in launches][0]
    assert "strategy" in log and "DDP" in log
    assert "1 per process x 2 processes x 2 accumulation = 4 per step" in log
    _in_process("train", "t2v", *ARGS, "--data", three_prompt_cache, "--batch-size", "2", "--output-dir",
                tmp_path / "one")
    two, one = Run(tmp_path / "two", log), Run(tmp_path / "one", "")
    assert _max_difference(two.weights, one.weights) <= TOLERANCE["lora"]
    assert two.losses == pytest.approx(one.losses, rel=1e-5)


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, errors = process.communicate(timeout=timeout)
    assert process.returncode == 0, errors[-4000:]
    return output + errors


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_a_machine_that_never_joins_torchrun_fails_in_one_line(tmp_path, three_prompt_cache):
    """Machine 0 of 2 alone: torchrun gives up after `--rdzv_conf timeout=5` with a line naming 1/2 machines."""
    launch = torchrun(0, free_port(), "train", "t2v", *ARGS, "--data", three_prompt_cache, "--output-dir", tmp_path,
                      rdzv_timeout=5)
    try:
        _, errors = launch.communicate(timeout=120)  # the hang guard; the launch itself stops after ~5 s
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode != 0
    assert re.fullmatch(r"torch\.distributed\.DistStoreError: Timed out after \d+ seconds waiting for clients\. "
                        r"1/2 clients joined\.", _last_line(errors))
    assert not (tmp_path / "config.toml").exists()  # cogtune never started


@pytest.mark.slow
def test_a_machine_that_never_joins_accelerate_fails_in_one_line(tmp_path, three_prompt_cache):
    """The same with `accelerate launch --config_file hybrid.yaml --machine_rank 0 --rdzv_conf timeout=5`."""
    config = write_accelerate_config(tmp_path, "fsdp-hybrid", gpus=2, machines=2, main_process_ip="127.0.0.1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--machine_rank", "0",
               "--rdzv_conf", "timeout=5", "-m", "cogtune", "train", "t2v", *ARGS, "--data",
               str(three_prompt_cache), "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)  # the hang guard
    assert result.returncode != 0
    assert re.search(r"Timed out after \d+ seconds waiting for clients\. 1/2 clients joined\.$", _last_line(result.stderr))
    assert not (tmp_path / "run").exists()
