"""Atomic file and folder writes: write to a temporary name beside the target, then rename.

A reader (or a resumed run) therefore sees either the old content or the new one, never a
half-written file, even after `kill -9`. Temporary names start with `.tmp-` so that they can be
recognised and swept.

Also here: a full disk reported as such (`StorageError` naming the file being written, whichever
library was writing it), a check that a folder is writable before long work, and `OutputLock`, one
run at a time per output folder (or output file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cogtune.errors import CogtuneError, ConfigError, StorageError

TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".cogtune.lock"


def _default_modes() -> tuple[int, int]:
    """The modes `open()` and `mkdir()` would give (mkstemp and mkdtemp make private ones, fit for
    secrets, not for outputs other people or containers read)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


FILE_MODE, DIR_MODE = _default_modes()


# --- a full disk -----------------------------------------------------------------------------------

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that do not raise OSError word it: safetensors (Rust), ffmpeg, C++ streams.
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
                    "kind: storagefull", "kind: filesystemquotaexceeded")
# A write that failed for a reason a library does not tell (torch.save: "basic_ios::clear: iostream
# error", "unexpected pos 8512 vs 8406") on a disk with less than this free failed for lack of space.
LOW_SPACE_BYTES = 1 << 20


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the file system holding `path` or its nearest existing parent."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, where: str | Path | None = None) -> bool:
    """Whether a failed write failed because the disk (or the user's quota) is full.

    An `OSError` says so with its errno, other libraries in their message; a write error that says
    nothing (torch's) counts as one when the file system at `where` is (nearly) full.
    """
    for error in _exception_chain(exc):
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        text = str(error).lower()
        if any(marker in text for marker in _DISK_FULL_TEXTS):
            return True
    if where is not None and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(where)
        return free is not None and free < LOW_SPACE_BYTES
    return False


DISK_FULL_PREFIX = "no space left on device while writing "


def disk_full_error(path: str | Path) -> StorageError:
    return StorageError(f"{DISK_FULL_PREFIX}{path}",
                        hint="free some space on that disk (or write somewhere else) and run again")


def newest_file(folder: str | Path) -> Path | None:
    """The most recently modified file under `folder` (the one being written when a write failed)."""
    newest: tuple[int, str] | None = None
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                stamp = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if newest is None or (stamp, path) > newest:
                newest = (stamp, path)
    return Path(newest[1]) if newest else None


@contextlib.contextmanager
def reporting_disk_full(path: str | Path, folder: str | Path | None = None) -> Iterator[None]:
    """Turn a write failure caused by a full disk into one `StorageError` naming what was being written.

    `path` is the file written; with `folder` (a folder being filled by a library), the newest file
    in it is named, which is the one the library was writing when the disk filled.
    """
    try:
        yield
    except CogtuneError:
        raise
    except Exception as exc:
        where = Path(folder) if folder is not None else Path(path).parent
        if is_disk_full(exc, where):
            named = newest_file(folder) if folder is not None and Path(folder).is_dir() else None
            raise disk_full_error(named or path) from exc
        raise


def check_writable(folder: str | Path, needed_bytes: int = 0) -> None:
    """Fail now, in one line, if files cannot be written into `folder` (created if missing)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe.", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise StorageError(f"no space left on device in {folder}",
                               hint="free some space on that disk (or write somewhere else)") from exc
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise StorageError(f"cannot write to {folder}: {reason}") from exc
    free = free_bytes(folder)
    if needed_bytes and free is not None and free < needed_bytes:
        raise StorageError(f"no space left on device in {folder}: {free} bytes free, about {needed_bytes} needed",
                           hint="free some space on that disk (or write somewhere else)")


# --- atomic writes ---------------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a written file to disk; a full disk or an I/O error found only now is still an error."""
    try:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS or exc.errno == errno.EIO:
            raise


@contextlib.contextmanager
def atomic_path(target: str | Path, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically.

    A failure for lack of space is a `StorageError` naming `target`. `sweep`: then remove the
    temporaries of `target` that killed writers left (`sweep_abandoned`); folders of thousands of
    files that their command sweeps once under its lock (a cache's, prepare's clips) pass False, so
    that each write does not list the folder again.
    """
    target = Path(target)
    with reporting_disk_full(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target), dir=target.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with reporting_disk_full(target):
            yield tmp
            _fsync_file(tmp)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
        if sweep:
            sweep_abandoned(target)
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
    temporary folder is discarded and the existing one kept. A failure for lack of space is a
    `StorageError` naming the file that was being written.
    """
    target = Path(target)
    with reporting_disk_full(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    try:
        with reporting_disk_full(target, folder=tmp):
            yield tmp
        follow_umask(tmp)
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
        sweep_abandoned(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def follow_umask(folder: str | Path) -> None:
    """Give `folder` and everything in it the modes the user's umask gives new files and folders.

    Writers that go through a temporary file (safetensors' `save_file`, `tempfile`) create it 0600,
    so a folder of their files would be readable by its owner alone whatever the umask says.
    """
    os.chmod(folder, DIR_MODE)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), DIR_MODE)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


def remove_tree(path: str | Path) -> None:
    """Delete a folder so that it is never seen half-deleted: rename it to a temporary name first."""
    path = Path(path)
    doomed = path.with_name(f"{TEMP_PREFIX}{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _temporary_prefix(target: Path) -> str:
    """`.tmp-NAME.PID.`: the writing process is named, so a later write can tell an abandoned temporary."""
    return f"{TEMP_PREFIX}{target.name}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def sweep_abandoned(target: str | Path) -> int:
    """Remove the temporaries of `target` that a killed writer left (its process is gone), after a write of it.

    Outputs without a folder lock (a converted or merged LoRA, a sample, a model) are written through
    such temporaries too; a writer killed mid-write leaves one, which the next successful write of the
    same target removes. A temporary of a live process (a concurrent write) is left alone.
    """
    target = Path(target)
    prefix = f"{TEMP_PREFIX}{target.name}."
    removed = 0
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        pid = entry.name[len(prefix):].split(".", 1)[0] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def unreadable_reason(path: str | Path) -> str:
    """Why an existing file cannot be opened for reading ("permission denied", ...), as the system says it."""
    try:
        with open(path, "rb"):
            return "it opens now (it was replaced meanwhile?)"
    except OSError as error:
        return (error.strerror or str(error)).lower()


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


# --- one run per output --------------------------------------------------------------------------

def _command_line() -> str:
    argv = list(sys.argv)
    if argv and (Path(argv[0]).name in ("cogtune", "__main__.py")):
        argv[0] = "cogtune"
    elif argv and argv[0] in ("-c", "-m"):
        argv.insert(0, Path(sys.executable).name)
    text = shlex.join(argv) if argv else "?"
    return text if len(text) <= 200 else text[:197] + "..."


def describe_holder(holder: dict[str, Any] | None) -> str:
    """'pid 123 on host, `cogtune train ...`, since 2025-01-02 10:00:00' (or what is known of it)."""
    if not holder:
        return "a cogtune process that has not written its details yet"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("command"):
        parts.append(f"`{holder['command']}`")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class OutputLock:
    """An exclusive lock on an output (a run folder, a cache folder, a sample's file), held until `release`.

    The lock is `flock` on a small file (`.cogtune.lock`, or `.NAME.cogtune.lock` beside an output
    file) that also records who holds it. The kernel drops the lock when its holder dies, so the
    file a killed run leaves behind is recognised as stale and taken over (with a warning); a
    normal release deletes it. Only the main process of a distributed run takes it (`main=False`
    holds nothing): the run's other processes write into the same folder by design.
    """

    def __init__(self, output: str | Path, kind: str = "folder", main: bool = True):
        self.output = Path(output)
        if kind == "folder":
            self.folder, self.path = self.output, self.output / LOCK_NAME
        else:
            self.folder = self.output.parent
            self.path = self.folder / f".{self.output.name}{LOCK_NAME}"
        self.main = main
        self._fd: int | None = None
        self._created: Path | None = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def acquire(self) -> OutputLock:
        if not self.main or self._fd is not None:
            return self
        from cogtune import report

        if not self.folder.exists():
            missing = self.folder
            while not missing.parent.exists():
                missing = missing.parent
            self._created = missing
        with reporting_disk_full(self.path):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except PermissionError as exc:
                raise StorageError(f"cannot create {self.folder}: permission denied") from exc
            except (FileExistsError, NotADirectoryError) as exc:  # it, or a folder on its way, is a file
                blocking = next((p for p in [self.folder, *self.folder.parents] if p.exists() and not p.is_dir()),
                                self.folder)
                raise ConfigError(f"{self.folder} cannot be a folder: {blocking} is a file",
                                  hint="choose another output folder") from exc
            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
                except PermissionError as exc:
                    raise StorageError(f"cannot write to {self.folder}: permission denied") from exc
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise StorageError(f"{self.output} is in use by another cogtune run: {describe_holder(holder)}",
                                       hint="wait for it to finish, or write somewhere else") from exc
                except OSError as exc:  # a file system without locks
                    os.close(fd)
                    report.warn(f"cannot lock {self.path} ({exc.strerror}); make sure no other run writes into "
                                f"{self.output} meanwhile")
                    return self
                try:
                    current = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    current = False
                if current:
                    break
                os.close(fd)  # its holder released (and deleted) it while we waited: lock the new one
            try:
                previous = _read_holder(fd)
                if previous:
                    report.warn(f"took over the lock on {self.output} left by a run that is no longer running "
                                f"({describe_holder(previous)})")
                mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                data = (json.dumps(mine) + "\n").encode("utf-8")
                os.ftruncate(fd, 0)
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            except BaseException:
                self._fd = fd
                self.release()  # removes the lock file, and the folders made for it
                raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still held: nobody can have locked this file meanwhile
        os.close(fd)
        if self._created is not None:  # folders this lock made, if still empty: nothing was written after all
            folder = self.folder
            while True:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self._created:
                    break
                folder = folder.parent
            self._created = None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
