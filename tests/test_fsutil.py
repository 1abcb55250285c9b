"""Atomic writes: all or nothing, and with the permissions of an ordinary file."""

from __future__ import annotations

import os
import stat

import pytest

from cogtune.fsutil import atomic_directory, atomic_path, atomic_write_text, sweep_temporaries


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    """Not mkstemp's private 0600: outputs are read by other users, containers, web servers."""
    mask = os.umask(0)
    os.umask(mask)
    path = atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "f").write_text("y")
    assert _mode(path) == 0o666 & ~mask
    assert _mode(tmp_path / "folder") == 0o777 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_directory_keeps_an_existing_folder_unless_asked(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "v1").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "v2").write_text("2")
    assert [p.name for p in target.iterdir()] == ["v1"]
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "v3").write_text("3")
    assert [p.name for p in target.iterdir()] == ["v3"]
    assert sweep_temporaries(tmp_path) == 0


def test_sweep_removes_leftovers(tmp_path):
    (tmp_path / ".tmp-a.txt.123").write_text("x")
    (tmp_path / ".tmp-dir.456").mkdir()
    (tmp_path / "real.txt").write_text("y")
    assert sweep_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["real.txt"]
