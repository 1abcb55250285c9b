"""A full disk: reported as such, naming the file, and nothing half-written is published.

Where this process may mount a small tmpfs (root, outside restricted sandboxes) the disk really
fills; everywhere, the same failures are simulated as the libraries report them.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import uuid

import numpy as np
import pytest

from cogtune import fsutil
from cogtune.errors import StorageError
from cogtune.fsutil import atomic_write_bytes, atomic_write_text, is_disk_full


@contextlib.contextmanager
def _small_disk(tmp_path, size="64k"):
    """A tmpfs of `size` mounted at a fresh folder, or a skip where mounting is not allowed."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _frames(count=9, size=128):
    return np.random.default_rng(0).integers(0, 255, (count, size, size, 3), dtype=np.uint8)


def test_an_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(target), "write_bytes", full)
    with pytest.raises(StorageError, match=f"^no space left on device while writing {target}$"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_libraries_ways_of_saying_the_disk_is_full(tmp_path, monkeypatch):
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(RuntimeError("basic_ios::clear: iostream error"))
    assert not is_disk_full(ValueError("something else"), tmp_path)
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 0)  # torch's error says nothing; the disk does
    torch_words = "[enforce fail at inline_container.cc:672] . unexpected pos 8512 vs 8406"
    assert is_disk_full(RuntimeError(torch_words), tmp_path)


@pytest.fixture(scope="module")
def mp4_bytes(tmp_path_factory):
    from cogtune.data.video import write_video

    return write_video(tmp_path_factory.mktemp("video") / "whole.mp4", _frames(), fps=8).read_bytes()


@pytest.mark.parametrize("disk_full", [True, False], ids=["full-disk", "other-failure"])
def test_a_truncated_mp4_from_ffmpeg_is_not_published(tmp_path, monkeypatch, mp4_bytes, disk_full):
    """imageio does not check ffmpeg's exit status: a failed write looks like a successful one."""
    import imageio.v2 as imageio

    from cogtune.data.video import write_video

    class TruncatingWriter:  # what imageio's ffmpeg writer leaves when ffmpeg cannot write the trailer
        def __init__(self, path, **kwargs):
            self.path = path

        def __enter__(self):
            return self

        def append_data(self, frame):
            pass

        def __exit__(self, *exc):
            with open(self.path, "wb") as handle:
                handle.write(mp4_bytes[: len(mp4_bytes) // 3])

    monkeypatch.setattr(imageio, "get_writer", TruncatingWriter)
    if disk_full:
        monkeypatch.setattr(fsutil, "free_bytes", lambda path: 0)
    target = tmp_path / "out.mp4"
    expected = f"no space left on device while writing {target}" if disk_full else f"ffmpeg did not write {target}"
    with pytest.raises(StorageError, match=f"^{expected}"):
        write_video(target, _frames(), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_write_video_on_a_really_full_disk(tmp_path):
    from cogtune.data.video import probe_video, write_video

    with _small_disk(tmp_path, "64k") as disk:
        with pytest.raises(StorageError, match=f"^no space left on device while writing {disk / 'a.mp4'}$"):
            write_video(disk / "a.mp4", _frames(), fps=8)
        assert list(disk.iterdir()) == []
        write_video(disk / "b.mp4", _frames(size=16), fps=8)  # what fits is written and complete
        assert probe_video(disk / "b.mp4").frames == 9


def test_sample_checks_the_output_is_writable_before_generating(cli, tmp_path, monkeypatch):
    import os

    from cogtune import sample

    real_write = os.write
    full = str(tmp_path / "full")

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(full):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the output")

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(sample, "generate_videos", no_generation)
    result = cli("sample", "--model", "tiny", "--prompt", "x", "--output", tmp_path / "full" / "a.mp4",
                 "--frames", "9", "--height", "64", "--width", "64")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no space left on device")
    assert str(tmp_path / "full") in result.stderr


def test_sample_on_a_really_full_disk_is_one_line(cli, tmp_path):
    with _small_disk(tmp_path, "12k") as disk:
        result = cli("sample", "--model", "tiny", "--prompt", "x", "--output", disk / "a.mp4", "--steps", "1",
                     "--frames", "9", "--height", "128", "--width", "128")
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"error: no space left on device while writing {disk / 'a.mp4'}")
        assert list(disk.iterdir()) == []


def test_encode_on_a_full_disk_names_the_file(cli, tmp_path, synthetic_data, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "cache"
    result = cli("encode", "--model", "tiny", "--data-root", synthetic_data, "--output-dir", out,
                 "--buckets", "9x64x64", "--num-workers", "0")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on device while writing {out}/text/"), last
    assert "Error" not in last.split("(hint")[0] and not list(out.rglob(".tmp-*"))
