"""A cache file the user may not read is named as such (permission denied), not as missing.

As root every file is readable, so the reading happens in a forked child that has dropped to the
unprivileged `nobody` user (uid 65534)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cogtune.encode.cache import VideoLatentCache, latent_file


def as_unprivileged(function) -> str:
    """`function()`'s error message (or "ok"), run by an unprivileged process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                function()
                message = "ok"
            except Exception as error:  # what the user would be shown
                message = getattr(error, "message", str(error))
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def shared_cache(tiny_cache):
    """A copy of the tiny cache in a folder every user may enter (pytest's own folders are private)."""
    folder = Path(tempfile.mkdtemp(prefix="cogtune-perm-"))
    os.chmod(folder, 0o755)
    root = folder / "cache"
    shutil.copytree(tiny_cache, root)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(folder, ignore_errors=True)


def test_an_unreadable_latent_is_named_as_permission_denied(shared_cache):
    os.chmod(shared_cache / latent_file(1), 0o000)
    message = as_unprivileged(lambda: VideoLatentCache(shared_cache).load_item(1))
    assert message == f"cache file {shared_cache / latent_file(1)} cannot be read: permission denied"
    assert as_unprivileged(lambda: VideoLatentCache(shared_cache).load_item(0)) == "ok"
    (shared_cache / latent_file(2)).unlink()
    assert "is missing" in as_unprivileged(lambda: VideoLatentCache(shared_cache).load_item(2))
