"""One run per output: a second run into a folder (or file) in use is refused, naming the first."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from cogtune.errors import StorageError
from cogtune.fsutil import LOCK_NAME, OutputLock

_HOLD = """
import sys
from cogtune.fsutil import OutputLock
lock = OutputLock(sys.argv[1], kind=sys.argv[2]).acquire()
print("locked", flush=True)
if sys.argv[3] == "die":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
lock.release()
"""


@pytest.fixture
def holder():
    """`holder(output, kind)`: another process holding the lock on `output` until the test ends."""
    started = []

    def hold(output, kind="folder", then="wait"):
        process = subprocess.Popen([sys.executable, "-c", _HOLD, str(output), kind, then], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "locked"
        started.append(process)
        if then == "die":
            process.wait()
        return process

    yield hold
    for process in started:
        if process.poll() is None:
            process.stdin.close()
            process.wait()


def test_a_second_run_is_refused_naming_the_first(tmp_path, holder):
    process = holder(tmp_path / "run")
    with pytest.raises(StorageError) as caught:
        OutputLock(tmp_path / "run").acquire()
    message = caught.value.message
    assert message.startswith(f"{tmp_path / 'run'} is in use by another cogtune run: pid {process.pid} on "
                              f"{socket.gethostname()}, `")
    assert " -c " in message and f"{tmp_path / 'run'} folder wait`, since 20" in message
    process.stdin.close()
    process.wait()
    with OutputLock(tmp_path / "run"):  # free again once the holder is done
        pass
    assert not (tmp_path / "run").exists()  # made for the lock, left empty: removed


def test_a_killed_runs_lock_is_taken_over_with_a_warning(tmp_path, holder, capsys):
    process = holder(tmp_path / "run", then="die")
    assert process.returncode == -signal.SIGKILL
    stale = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert stale["pid"] == process.pid
    with OutputLock(tmp_path / "run"):
        mine = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert mine["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "warning: took over the lock on" in err and f"pid {process.pid}" in err
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_samples_into_other_files_of_one_folder_run_at_once(tmp_path, holder):
    holder(tmp_path / "a.mp4", kind="file")
    with OutputLock(tmp_path / "b.mp4", kind="file"):
        pass
    with pytest.raises(StorageError, match="a.mp4 is in use by another cogtune run"):
        OutputLock(tmp_path / "a.mp4", kind="file").acquire()


def test_only_the_main_process_of_a_launch_locks(tmp_path, holder):
    holder(tmp_path / "run")
    with OutputLock(tmp_path / "run", main=False):  # rank 1 of the holder's own launch
        pass


@pytest.mark.parametrize("command", ["train", "encode", "sample-file", "sample-folder"])
def test_every_command_refuses_an_output_in_use_in_one_line(cli, tmp_path, holder,
                                                             command):
    out = tmp_path / ("a.mp4" if command == "sample-file" else "out")
    process = holder(out, kind="file" if command == "sample-file" else "folder")
    args = {
        "train": ("train", "t2v", "--model", "tiny", "--data", tmp_path, "--output-dir", out, "--steps", "1"),
        "encode": ("encode", "--model", "tiny", "--data-root", tmp_path, "--output-dir", out),
        "sample-file": ("sample", "--model", "tiny", "--prompt", "x", "--output", out),
        "sample-folder": ("sample", "--model", "tiny", "--prompt", "x", "--prompt", "y", "--output", out),
    }[command]
    result = cli(*args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} is in use by another cogtune run: pid {process.pid}")
