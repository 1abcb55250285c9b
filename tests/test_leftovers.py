"""What a writer killed mid-write leaves (`.tmp-NAME.PID.*` beside its target) is removed by the next
successful write of that target; a temporary of a live process (a concurrent writer) is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cogtune.fsutil import atomic_directory, atomic_write_text


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def plant(folder: Path, name: str) -> tuple[Path, Path]:
    """A killed writer's temporary file and a live writer's temporary folder of `folder / name`."""
    folder.mkdir(parents=True, exist_ok=True)
    dead = folder / f".tmp-{name}.{dead_pid()}.k1ll3d"
    dead.write_bytes(b"half a file")
    live = folder / f".tmp-{name}.{os.getppid()}.w0rk1ng"
    live.mkdir()
    return dead, live


def test_atomic_writes_remove_their_targets_abandoned_temporaries(tmp_path):
    dead, live = plant(tmp_path, "state.json")
    other, _ = plant(tmp_path / "x", "other.json")
    atomic_write_text(tmp_path / "state.json", "{}")
    assert not dead.exists() and live.exists() and other.exists()
    dead, live = plant(tmp_path, "folder")
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "a").write_text("a")
    assert not dead.exists() and live.exists()


def test_convert_merge_and_sample_leave_no_leftover_of_a_killed_run(cli, tmp_path, tiny_model_dir):
    from tests.lora.conftest import ATTENTION, write_trained_lora

    lora = write_trained_lora(tmp_path / "run", "tiny", ATTENTION)
    out = tmp_path / "out"
    planted = [plant(out, "comfy.safetensors"), plant(out, "merged"), plant(out, "clip.mp4")]
    assert cli("lora", "convert", lora, out / "comfy.safetensors", "--to", "comfyui").exit_code == 0
    assert cli("lora", "merge", "--model", "tiny", "--lora", lora, "--output", out / "merged").exit_code == 0
    result = cli("sample", "--model", "tiny", "--prompt", "a", "--steps", "1", "--output", out / "clip.mp4")
    assert result.exit_code == 0, result.stderr
    for dead, live in planted:
        assert not dead.exists() and live.exists()
