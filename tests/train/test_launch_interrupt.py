"""Ctrl-C under a launcher: every process stops after the same step, and the user reads each line once.

torchrun starts its processes in sessions of their own and forwards the signal it gets (a terminal's
Ctrl-C reaches its process group) to each of them. Each process here runs cogtune's entry point
through a small script that records the exit code cogtune gives it (torchrun, told to stop, exits
with its own code and does not say theirs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogtune import report
from cogtune.train.checkpoint import verify_checkpoint
from tests.ports import free_port
from tests.distributed.conftest import finish

RECORDING_ENTRY = """\
import os, sys
from pathlib import Path
from cogtune.cli.app import main

try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
Path(os.environ["EXIT_CODES"], os.environ["RANK"]).write_text(str(code))
sys.exit(code)
"""


def _torchrun(tmp_path: Path, *args: str, prelude: str = "") -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 ENTRY ARGS` in a session of its own (a terminal's Ctrl-C reaches all of it);
    ENTRY runs `prelude` first."""
    entry = tmp_path / "entry.py"
    entry.write_text(prelude + RECORDING_ENTRY)
    (tmp_path / "codes").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(entry), *args]
    env = {**os.environ, "EXIT_CODES": str(tmp_path / "codes"), "COLUMNS": "400"}  # lines unwrapped in the log
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _exit_codes(tmp_path: Path) -> dict[str, int]:
    return {path.name: int(path.read_text()) for path in sorted((tmp_path / "codes").iterdir())}


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_process_at_one_step_and_says_so_once(tiny_cache, tmp_path):
    out = tmp_path / "run"
    args = ["train", "t2v", "--model", "tiny", "--data", str(tiny_cache), "--output-dir", str(out), "--steps", "100000",
            "--rank", "4", "--batch-size", "1", "--checkpoint-every", "20", "--keep-checkpoints", "0",
            "--no-validation-final"]
    launch = _torchrun(tmp_path, *args)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-000020").is_dir():  # polled: the signal must come while it trains
        assert launch.poll() is None, f"the launch ended before step 20:\n{launch.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint of step 20 after 240 s"
        time.sleep(0.05)
    os.killpg(launch.pid, signal.SIGINT)  # as a terminal's Ctrl-C: torchrun forwards it to each process
    output = finish(launch, check=False)

    assert _exit_codes(tmp_path) == {"0": 130, "1": 130}, output[-3000:]  # both stopped, as a shell reports Ctrl-C
    warnings = [line for line in output.splitlines() if "press Ctrl-C again to stop at once" in line]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(warnings) == 1 and len(errors) == 1, output[-3000:]
    (error,) = errors
    assert error.startswith("error: interrupted at step ")
    step = int(error.split("interrupted at step ")[1].split()[0])
    saved = out / "checkpoints" / f"step-{step:06d}"
    assert f"checkpoint saved: {saved}" in error
    assert "resume with: the same launch, running cogtune train t2v" in error and error.endswith("--resume latest)")
    # one checkpoint of the step every process stopped after, whole
    assert verify_checkpoint(saved) is None
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == step
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())


FAILING_ON_RANK_1 = """\
import os
if os.environ["RANK"] == "1":
    from cogtune.errors import DataError
    from cogtune.train import data

    def broken(self, index):
        raise DataError("item 3 of the cache cannot be read (on rank 1 only)")

    data.BatchLoader.get = broken
"""


@pytest.mark.slow
def test_an_error_of_one_process_alone_is_still_shown(tiny_cache, tmp_path):
    """Rank 1 fails by itself (rank 0 trains on): its line is shown, though it is not the main process."""
    launch = _torchrun(tmp_path, "train", "t2v", "--model", "tiny", "--data", str(tiny_cache), "--output-dir",
                       str(tmp_path / "run"), "--steps", "4", "--rank", "4", "--batch-size", "1",
                       "--no-validation-final", prelude=FAILING_ON_RANK_1)
    output = finish(launch, check=False)
    lines = [line for line in output.splitlines() if "item 3 of the cache cannot be read" in line]
    assert lines == ["error: item 3 of the cache cannot be read (on rank 1 only)"], output[-3000:]
    assert _exit_codes(tmp_path)["1"] == 1


REFUSED_LAST_ON_RANK_0 = """\
import os, time
import cogtune.accelerate_config
from cogtune.errors import ConfigError

def refused(settings):
    if os.environ["RANK"] == "0":
        time.sleep(3)  # the main process comes to the refusal last
    raise ConfigError("the launch's settings are refused", shared=True)

cogtune.accelerate_config.accelerate_config_yaml = refused
"""


def test_a_shared_error_is_shown_even_when_the_main_process_comes_to_it_last(tmp_path):
    """Every process refuses the same thing and only the main process says it: rank 1, first to fail, waits for
    the launcher's SIGTERM (sent once rank 0 has failed) instead of exiting, which would have torchrun stop rank 0
    before it says anything."""
    launch = _torchrun(tmp_path, "config", "accelerate", "--strategy", "ddp", "--gpus", "2",
                       prelude=REFUSED_LAST_ON_RANK_0)
    output = finish(launch, check=False)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: the launch's settings are refused"], output[-3000:]
    assert _exit_codes(tmp_path) == {"0": 1, "1": 1}, output[-3000:]


def test_shared_messages_are_shown_by_the_main_process_only(capsys, monkeypatch):
    from cogtune.errors import ConfigError
    from cogtune.interrupt import Interrupted

    monkeypatch.setattr(report, "_is_main_process", False)
    report.warn("the launch's warning", shared=True)
    report.error("the launch's error", shared=Interrupted("x").shared)
    report.warn("this process's warning")
    report.error("this process's error", shared=ConfigError("x").shared)
    assert capsys.readouterr().err.splitlines() == ["warning: this process's warning", "error: this process's error"]
    monkeypatch.setattr(report, "_is_main_process", True)
    report.warn("the launch's warning", shared=True)
    report.error("the launch's error", shared=True)
    assert capsys.readouterr().err.splitlines() == ["warning: the launch's warning", "error: the launch's error"]
