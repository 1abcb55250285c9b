"""Decoding workers die with encode's main process, however it dies (kill -9 of that process alone):
they must not outlive it holding the output folder's lock."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cogtune.interrupt import PR_GET_PDEATHSIG, leave_stopping_to_the_parent

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")


class _DeathSignal(Dataset):
    """Each item: the signal the kernel sends this worker when its parent dies (prctl PR_GET_PDEATHSIG)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        value = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
        return value.value


@linux_only
def test_dataloader_workers_ask_to_be_killed_with_their_parent():
    loader = DataLoader(_DeathSignal(), batch_size=None, num_workers=2, worker_init_fn=leave_stopping_to_the_parent)
    assert [int(v) for v in loader] == [signal.SIGKILL, signal.SIGKILL]
    assert torch.utils.data.get_worker_info() is None  # the probe ran in the workers, not here


def _forked_children(pid: int) -> list[int]:
    """`pid`'s children that it forked without running another program (its DataLoader workers have its command
    line; encode also runs ffmpeg while it plans, whose processes are not workers)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                forked = (entry / "cmdline").read_bytes() == command
            except OSError:
                continue
            if int(fields[1]) == pid and forked:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _dead_or_dying(pid: int) -> bool:
    """Gone, a zombie, or with SIGKILL pending (/proc/PID/status: SigPnd, ShdPnd)."""
    try:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except OSError:
        return True
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    return status.get("State", "").startswith(("Z", "X")) or bool(pending & (1 << (signal.SIGKILL - 1)))


@linux_only
@pytest.mark.slow
def test_kill_9_of_encodes_main_process_alone_leaves_no_worker_and_no_lock(tmp_path):
    from cogtune.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", count=6, frames=9, height=64, width=64)
    command = [sys.executable, "-m", "cogtune", "encode", "--model", "tiny", "--data-root", str(data),
               "--output-dir", str(tmp_path / "cache"), "--buckets", "9x64x64", "--num-workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(workers) < 2 and process.poll() is None:
        workers = _forked_children(process.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "encode finished or failed before its workers could be seen"
    os.kill(process.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` does
    process.wait()
    # The kernel sent each worker SIGKILL while its parent exited, before the parent could be reaped: every
    # worker is gone or has it pending now (torch's watchdog alone would leave them running for seconds).
    assert all(_dead_or_dying(pid) for pid in workers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "in use by another cogtune run" not in rerun.stderr
