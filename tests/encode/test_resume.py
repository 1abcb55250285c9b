"""An encode killed with SIGKILL and re-run ends with the same cache as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.encode.compare import assert_same_cache

COUNT = 8


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory):
    from cogtune.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), count=COUNT, frames=9, height=64, width=64)


def _encode_command(data: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "cogtune", "encode", "--model", "tiny", "--data-root", str(data), "--output-dir",
            str(output), "--buckets", "9x64x64", "--num-workers", "0", "--validation-prompt", "A red circle."]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_cache(tmp_path, bigger_data, cli):
    """The killed encode is a process of its own; the reference and the re-run go through the same entry point
    in this process (`cli`)."""
    reference = tmp_path / "reference"
    result = cli(*_encode_command(bigger_data, reference)[3:])
    assert result.exit_code == 0, result.stderr[-2000:]

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_encode_command(bigger_data, interrupted), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    latents = interrupted / "latents"
    while time.monotonic() < deadline:
        done = len(list(latents.glob("0*.safetensors"))) if latents.is_dir() else 0
        if done >= 2:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(latents.glob("0*.safetensors")))
    assert 2 <= written < COUNT, f"the kill came too late or too early ({written} items written)"
    assert not (interrupted / "manifest.json").exists()

    rerun = cli(*_encode_command(bigger_data, interrupted)[3:])
    assert rerun.exit_code == 0, rerun.stderr[-2000:]
    assert_same_cache(reference, interrupted)
    leftovers = [p for p in interrupted.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
