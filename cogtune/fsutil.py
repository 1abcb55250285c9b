"""Atomic file and folder writes: write to a temporary name beside the target, then rename.

A reader (or a resumed run) therefore sees either the old content or the new one, never a
half-written file, even after `kill -9`. Temporary names start with `.tmp-` so that they can be
recognised and swept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def _default_modes() -> tuple[int, int]:
    """The modes `open()` and `mkdir()` would give (mkstemp and mkdtemp make private ones, fit for
    secrets, not for outputs other people or containers read)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


FILE_MODE, DIR_MODE = _default_modes()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with contextlib.suppress(OSError):
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target`.

    If `target` appeared meanwhile (another process built it) and `replace` is false, the
    temporary folder is discarded and the existing one kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if target.exists():
            if not replace:
                return
            old = target.with_name(f"{TEMP_PREFIX}{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():
                    raise
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_temporaries(directory: str | Path) -> int:
    """Remove leftovers of interrupted atomic writes directly inside `directory`."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed
