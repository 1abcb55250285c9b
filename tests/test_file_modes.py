"""Outputs follow the user's umask, also where a library writes through a private temporary file
(safetensors' `save_file` creates 0600 files): a model, a merged transformer, a converted LoRA."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path


def modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_the_tiny_model_follows_the_umask(tiny_model_dir):
    mask = os.umask(0)
    os.umask(mask)
    found = modes(Path(tiny_model_dir))
    assert any(name.endswith(".safetensors") for name in found)
    for name, mode in found.items():
        folder = (Path(tiny_model_dir) / name).is_dir()
        assert mode == (0o777 if folder else 0o666) & ~mask, (name, oct(mode))


def test_merge_and_convert_follow_a_stricter_umask(tmp_path, tiny_model_dir):
    from tests.lora.conftest import ATTENTION, write_trained_lora

    lora = write_trained_lora(tmp_path / "run", "tiny", ATTENTION)
    for args in (["lora", "merge", "--model", "tiny", "--lora", str(lora), "--output", str(tmp_path / "merged")],
                 ["lora", "convert", str(lora), str(tmp_path / "comfy.safetensors"), "--to", "comfyui"]):
        result = subprocess.run([sys.executable, "-m", "cogtune", *args], capture_output=True, text=True,
                                timeout=600, preexec_fn=lambda: os.umask(0o027))
        assert result.returncode == 0, result.stderr
    merged = modes(tmp_path / "merged")
    assert any(name.endswith(".safetensors") for name in merged)
    for name, mode in merged.items():
        assert mode == (0o750 if (tmp_path / "merged" / name).is_dir() else 0o640), (name, oct(mode))
    assert stat.S_IMODE((tmp_path / "comfy.safetensors").stat().st_mode) == 0o640
