"""Ctrl-C (or SIGTERM) during `cogtune encode` stops after the clips in flight, keeps what is encoded,
says how much and how to finish; the printed command finishes the cache an uninterrupted run makes.

Real signals to a real `cogtune encode` process group, as a terminal's Ctrl-C or a scheduler sends
them (the decoding worker processes get them too).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from cogtune.interrupt import Interrupted, rerun_command
from tests.encode.compare import assert_same_cache
from tests.ports import free_port

COUNT = 8
PROMPT = "A red circle."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cogtune.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), count=COUNT, frames=17, height=64, width=64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The cache an uninterrupted encode makes."""
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig, encode_dataset

    root = tmp_path_factory.mktemp("reference") / "cache"
    encode_dataset(EncodeConfig(model="tiny", output_dir=str(root), data=DatasetConfig(root=str(data)),
                                buckets=("9x64x64",), validation_prompts=(PROMPT,), num_workers=0))
    return root


def _args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["encode", "--model", "tiny", "--data-root", str(data), "--output-dir", str(output), "--buckets", "9x64x64",
            "--num-workers", "2", "--validation-prompt", PROMPT, *extra]


def _start(command: list[str], stderr: Path) -> subprocess.Popen:
    """COMMAND in its own process group, which a terminal's Ctrl-C signals as a whole."""
    with stderr.open("w") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _cogtune(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cogtune", *args]


def _latents(root: Path) -> list[Path]:
    folder = root / "latents"
    return sorted(folder.glob("0*.safetensors")) if folder.is_dir() else []


def _signal_after_first_item(command: list[str], cache: Path, stderr: Path, signum: int) -> subprocess.Popen:
    process = _start(command, stderr)
    deadline = time.monotonic() + 300
    while not _latents(cache):  # polled: the signal must come while the encode is under way
        assert process.poll() is None, f"encode ended (exit {process.returncode}) before writing an item"
        assert time.monotonic() < deadline, "no item encoded after 300 s"
        time.sleep(0.02)
    os.killpg(process.pid, signum)
    process.wait(timeout=300)
    return process


def _assert_no_process_left(process: subprocess.Popen, cache: Path) -> None:
    """The decoding workers (same process group) ended with the encode, not even a zombie is left;
    nor any process still working on this cache (a launcher's ranks run in sessions of their own)."""
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
    still_running = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(cache).encode() in cmdline.read_bytes():
                still_running.append(cmdline.parent.name)
        except OSError:  # ended while we looked
            pass
    assert still_running == []


def _assert_stopped_cleanly(cache: Path) -> list[Path]:
    """No manifest (the cache is incomplete, and says so), no temporary file, every item file whole."""
    assert not (cache / "manifest.json").exists()
    assert [p for p in cache.rglob("*") if p.name.startswith(".tmp-")] == []
    written = _latents(cache)
    for path in written:
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["key"] and handle.get_tensor("latent_dist").numel()
    return written


def _interrupted_line(stderr: str, written: list[Path], cache: Path) -> str:
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: interrupted: {len(written)} of {COUNT} items encoded in {cache} "
                           "(hint: resume with: "), stderr[-3000:]
    return line.split("resume with: ")[1].removesuffix(")")


def _resume(cli, command: str, cache: Path, kept: list[Path], reference: Path) -> None:
    """The printed command finishes the cache, encoding only what was missing (run through the entry point in
    this process: `cli`)."""
    before = {path.name: path.stat().st_ino for path in kept}
    assert shlex.split(command)[0] == "cogtune"
    resumed = cli(*shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.stderr[-3000:]
    assert re.search(r"clips to encode\W+(\d+)", resumed.stderr)[1] == str(COUNT - len(kept))
    assert {name: (cache / "latents" / name).stat().st_ino for name in before} == before  # not rewritten
    assert_same_cache(reference, cache)
    assert [p for p in cache.rglob("*") if p.name.startswith(".tmp-")] == []


def test_ctrl_c_stops_after_the_item_in_flight_and_the_printed_command_finishes_the_cache(cli, tmp_path, data,
                                                                                          reference):
    cache = tmp_path / "cache"
    args = _args(data, cache)
    process = _signal_after_first_item(_cogtune(args), cache, tmp_path / "stderr.txt", signal.SIGINT)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, stderr[-3000:]
    _assert_no_process_left(process, cache)
    written = _assert_stopped_cleanly(cache)
    assert 1 <= len(written) < COUNT
    assert "stopping after the clips being encoded; the cache keeps every finished item; " \
           "press Ctrl-C again to stop at once" in stderr
    command = _interrupted_line(stderr, written, cache)
    assert command == shlex.join(["cogtune", *args])
    _resume(cli, command, cache, written, reference)


def test_sigterm_to_the_group_stops_the_same_way_and_the_command_does_not_start_over(cli, tmp_path, data,
                                                                                    reference):
    # A scheduler (or a spot instance going away) sends SIGTERM; --overwrite must not reach the resume command.
    cache = tmp_path / "cache"
    process = _signal_after_first_item(_cogtune(_args(data, cache, "--overwrite")), cache, tmp_path / "stderr.txt",
                                       signal.SIGTERM)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    _assert_no_process_left(process, cache)
    written = _assert_stopped_cleanly(cache)
    assert "SIGTERM received: stopping after the clips being encoded" in stderr
    command = _interrupted_line(stderr, written, cache)
    assert command == shlex.join(["cogtune", *_args(data, cache), "--no-overwrite"])
    _resume(cli, command, cache, written, reference)


def test_a_second_ctrl_c_stops_at_once_mid_write_and_leaves_a_valid_cache(cli, tmp_path, data, reference,
                                                                         monkeypatch):
    # Both Ctrl-Cs land while the second clip's file is half-written (in-process, to hit that moment exactly).
    import multiprocessing

    import safetensors.torch

    real_save = safetensors.torch.save_file
    latents_saved: list[str] = []

    def half_written_then_ctrl_c_twice(tensors, filename, metadata=None):
        if Path(filename).parent.name == "latents":
            if latents_saved:
                Path(filename).write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here
            latents_saved.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", half_written_then_ctrl_c_twice)
    cache = tmp_path / "cache"
    args = _args(data, cache)
    result = cli(*args)
    assert result.exit_code == 130
    assert "press Ctrl-C again to stop at once" in result.stderr
    assert "error: interrupted:" not in result.stderr  # stopped at once, not at the next safe point
    assert multiprocessing.active_children() == []  # the decoding workers ended
    written = _assert_stopped_cleanly(cache)
    assert len(written) == 1

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    _resume(cli, shlex.join(["cogtune", *args]), cache, written, reference)


@pytest.mark.slow
def test_under_torchrun_every_process_stops_and_the_command_finishes_the_cache(cli, tmp_path, data, reference):
    # A terminal's Ctrl-C reaches torchrun, which forwards it to each process (and its decoding workers).
    cache = tmp_path / "cache"
    args = _args(data, cache)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "cogtune", *args]
    process = _signal_after_first_item(launch, cache, tmp_path / "stderr.txt", signal.SIGINT)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode != 0  # torchrun's own code for a run it was told to stop
    _assert_no_process_left(process, cache)
    written = _assert_stopped_cleanly(cache)
    lines = [line for line in stderr.splitlines() if line.startswith("error: interrupted:")]
    # both processes stopped (they agreed once both had), and the user reads it once, from the main one
    assert len(lines) == 1, stderr[-3000:]
    assert len([line for line in stderr.splitlines() if "press Ctrl-C again to stop at once" in line]) == 1
    command = _interrupted_line(lines[0], written, cache)
    assert command == shlex.join(["cogtune", *args])
    _resume(cli, command, cache, written, reference)


def test_the_resume_command_is_the_invocation_quoted_for_a_shell():
    invocation = ["cogtune", "encode", "--data-root", "my data", "--overwrite", "--validation-prompt", "it's red"]
    command = rerun_command(invocation, drop=("--overwrite",))
    assert shlex.split(command) == ["cogtune", "encode", "--data-root", "my data", "--validation-prompt", "it's red"]
    assert rerun_command(None) is None
    assert Interrupted("x").exit_code == 130 and Interrupted("x", signum=signal.SIGTERM).exit_code == 143


def test_decoding_workers_leave_ctrl_c_to_the_parent_and_end_quietly_on_sigterm():
    # A SIGTERM to the process group must not kill a worker by signal: torch would then raise
    # "DataLoader worker is killed by signal" in the encoding process, wherever it is.
    import multiprocessing

    from torch.utils.data import DataLoader

    from cogtune.interrupt import leave_stopping_to_the_parent

    loader = DataLoader(range(1000), batch_size=1, num_workers=1, worker_init_fn=leave_stopping_to_the_parent)
    batches = iter(loader)
    next(batches)  # the worker is up (its worker_init_fn has run)
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGINT)
    assert [next(batches).item() for _ in range(10)] == list(range(1, 11))  # beyond what was decoded ahead
    # from another process, as a scheduler's (torch's workers only take their parent's SIGTERM quietly)
    subprocess.run([sys.executable, "-c", f"import os; os.kill({worker.pid}, {int(signal.SIGTERM)})"], check=True)
    worker.join(timeout=60)
    assert worker.exitcode == 0
    del batches


def test_a_process_forked_before_it_sets_its_own_handlers_leaves_the_stop_to_its_parent(capfd):
    """A DataLoader worker is forked with its parent's handler and sets its own only in `worker_init_fn`: a
    Ctrl-C in between is not the worker's to announce (the main process's worker would say it as the main
    process) nor to act on."""
    from cogtune.interrupt import StopRequest

    stop = StopRequest()
    with stop.listening(enabled=True, stopping="stopping soon"):
        child = os.fork()
        if child == 0:  # the worker, before its own handlers
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(3 if stop.requested else 0)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not stop.requested and "stopping soon" not in capfd.readouterr().err
