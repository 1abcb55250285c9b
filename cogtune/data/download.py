"""Fetch a dataset repository from the Hugging Face Hub into a folder, then check it.

huggingface_hub does the transfer (`snapshot_download` into `local_dir`): it skips files that are
already there (their metadata lives in `LOCAL_DIR/.cache/huggingface/`) and retries a dropped
connection with HTTP Range requests. cogtune adds one byte-level progress bar, one-line errors and
the validation summary. The token is never handled here: huggingface_hub reads HF_TOKEN or the
saved `hf auth login` by itself, and every message built from a library error is redacted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from cogtune import __version__, report
from cogtune.errors import DataError

REPO_TYPES = ("dataset", "model", "space")
RESUME_HINT = "re-run the same command to resume; files already downloaded are kept"
LOGIN_HINT = "private or gated repos need `hf auth login` or HF_TOKEN"
NETWORK_HINT = "check the network connection, proxy settings and HF_ENDPOINT"

_TOKEN_PATTERNS = (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), re.compile(r"(?i)(bearer\s+)[^\s'\"),\]]+"))


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None


@dataclasses.dataclass(frozen=True)
class DownloadPlan:
    """What one run fetches: a repository pinned to one commit, and the files the patterns select."""

    repo_id: str
    repo_type: str
    revision: str | None
    commit: str
    endpoint: str
    files: list[RemoteFile]

    @property
    def total_bytes(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def label(self) -> str:
        return f"'{self.repo_id}' ({self.repo_type})"


def download_dataset(
    repo_id: str,
    local_dir: str | Path,
    *,
    repo_type: str = "dataset",
    revision: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_workers: int = 8,
    validate: bool = True,
) -> Path:
    """Download `repo_id` into `local_dir` (resumably), then validate it as a cogtune dataset.

    Raises DataError with a one-line reason when the download fails, and when the downloaded
    folder is not a usable dataset (after printing the validation report).
    """
    with _secrets_masked():
        return _download_and_validate(repo_id, Path(local_dir).expanduser(), repo_type=repo_type, revision=revision,
                                      include=include, exclude=exclude, max_workers=max_workers, validate=validate)


def _download_and_validate(repo_id: str, local_dir: Path, *, repo_type: str, revision: str | None,
                           include: Sequence[str] | None, exclude: Sequence[str] | None, max_workers: int,
                           validate: bool) -> Path:
    if repo_type not in REPO_TYPES:
        raise DataError(f"unknown repo type '{repo_type}'", hint=f"--repo-type is one of {', '.join(REPO_TYPES)}")
    if max_workers < 1:
        raise DataError(f"--max-workers must be at least 1, got {max_workers}")
    _quiet_hub_library()
    _refuse_offline_mode()
    if local_dir.exists() and not local_dir.is_dir():
        raise DataError(f"{local_dir} exists and is not a folder", hint="pass a folder to --local-dir")
    include_patterns = list(include) if include else None
    exclude_patterns = list(exclude) if exclude else None

    endpoint = _endpoint()
    plan = _plan(repo_id, repo_type=repo_type, revision=revision, endpoint=endpoint, include=include_patterns,
                 exclude=exclude_patterns)
    _fetch(plan, local_dir, include=include_patterns, exclude=exclude_patterns, max_workers=max_workers)
    if validate:
        _validate(local_dir)
    return local_dir


@contextlib.contextmanager
def _secrets_masked() -> Iterator[None]:
    """No message leaves with a token in it, even one the user typed as an argument by mistake."""
    try:
        yield
    except DataError as exc:
        message, hint = redact_secrets(exc.message), redact_secrets(exc.hint) if exc.hint else None
        if (message, hint) == (exc.message, exc.hint):
            raise
        raise DataError(message, hint=hint) from exc.__cause__


def _endpoint() -> str:
    """HF_ENDPOINT as set now: huggingface_hub reads it once, at import, which may be too early."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _refuse_offline_mode() -> None:
    if _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE")):
        raise DataError("HF_HUB_OFFLINE=1 is set; unset it to download",
                        hint="offline mode forbids every request to the Hub")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DataError("HF_HUB_OFFLINE=1 is set; unset it to download",
                        hint="huggingface_hub was imported with offline mode on")


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _quiet_hub_library() -> None:
    """Keep huggingface_hub's own warnings and tqdm bars off the terminal: cogtune reports instead."""
    from cogtune.quiet import debug_enabled, quiet_libraries

    quiet_libraries()
    from huggingface_hub.utils import logging as hub_logging  # importing it resets the level: set it after

    if not debug_enabled():
        hub_logging.set_verbosity_error()


# --- plan ------------------------------------------------------------------------------------


def _plan(repo_id: str, *, repo_type: str, revision: str | None, endpoint: str, include: list[str] | None,
          exclude: list[str] | None) -> DownloadPlan:
    """Resolve the revision to a commit and list the selected files with their sizes."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    placeholder = DownloadPlan(repo_id, repo_type=repo_type, revision=revision, commit="", endpoint=endpoint, files=[])
    with _hub_errors(placeholder, local_dir=None, during_transfer=False):
        api = HfApi(endpoint=endpoint, library_name="cogtune", library_version=__version__)
        info = api.repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
    if not info.sha:
        raise DataError(f"the Hub at {endpoint} gave no commit for {placeholder.label}",
                        hint="HF_ENDPOINT must point to a Hugging Face Hub (or a compatible mirror)")
    siblings = list(info.siblings or [])
    selected = filter_repo_objects(siblings, allow_patterns=include, ignore_patterns=exclude,
                                   key=lambda sibling: sibling.rfilename)
    files = [RemoteFile(s.rfilename, s.size) for s in selected]
    plan = dataclasses.replace(placeholder, commit=info.sha, files=files)
    if not files:
        if include or exclude:
            raise DataError(f"no file of {plan.label} matches {_patterns_text(include, exclude)}",
                            hint=f"it has {len(siblings)} files; patterns are globs on repo paths, e.g. 'videos/*'")
        raise DataError(f"{plan.label} has no files at {revision or 'its default branch'}")
    return plan


def _patterns_text(include: list[str] | None, exclude: list[str] | None) -> str:
    parts = [f"--include {p}" for p in include or []] + [f"--exclude {p}" for p in exclude or []]
    return " ".join(parts)


# --- transfer --------------------------------------------------------------------------------


# Bytes huggingface_hub reads per progress update (its `constants.DOWNLOAD_CHUNK_SIZE`, 10 MiB by default).
# Ctrl-C stops a transfer at its next update: at 10 MiB a slow link kept the user waiting many seconds
# (16 s at 600 kB/s, measured); 1 MiB is still a large read.
TRANSFER_CHUNK = 1024 * 1024


@contextlib.contextmanager
def _chunks_of(size: int) -> Iterator[None]:
    from huggingface_hub import constants

    default = constants.DOWNLOAD_CHUNK_SIZE
    constants.DOWNLOAD_CHUNK_SIZE = min(size, default)
    try:
        yield
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = default


class _Cancelled(Exception):
    """Raised from a progress update once the user asked to stop: it ends that file's transfer."""


def _fetch(plan: DownloadPlan, local_dir: Path, *, include: list[str] | None, exclude: list[str] | None,
           max_workers: int) -> None:
    """Run `snapshot_download` in a worker thread; this thread waits, and stops it on Ctrl-C.

    Progress comes from huggingface_hub's public `tqdm_class` hook (see `_TransferProgress`); Ctrl-C
    makes the next progress update raise in every transfer thread, so in-flight files stop at their
    next chunk and huggingface_hub cleans up after them as after any failed download.
    """
    from huggingface_hub import snapshot_download

    already, at_start = _finished_files(local_dir, plan.files)
    total = plan.total_bytes
    skipped = f", {already} already here" if already else ""
    report.info(f"downloading {plan.label} @ {plan.commit[:10]}: {len(plan.files)} files"
                f" ({_size_text(total)}){skipped} into {local_dir}")

    failure: list[BaseException] = []
    with _hub_errors(plan, local_dir, during_transfer=True), _hub_progress_bars_hidden(), \
            _chunks_of(TRANSFER_CHUNK), report.byte_progress("downloading", total=total, completed=at_start) as bar:
        progress = _TransferProgress(bar, at_start)

        def transfer() -> None:
            try:
                snapshot_download(plan.repo_id, repo_type=plan.repo_type, revision=plan.commit, local_dir=local_dir,
                                  allow_patterns=include, ignore_patterns=exclude, endpoint=plan.endpoint,
                                  max_workers=max_workers, tqdm_class=progress.tqdm_class(),
                                  library_name="cogtune", library_version=__version__)
            except BaseException as exc:  # handed to the main thread, which turns it into one line
                failure.append(exc)

        worker = threading.Thread(target=transfer, name="cogtune-download", daemon=True)
        worker.start()
        try:
            worker.join()
        except KeyboardInterrupt as exc:
            progress.cancel()
            worker.join()
            raise DataError(f"download of {plan.label} interrupted", hint=RESUME_HINT) from exc
        if failure:
            raise failure[0]

    missing = [f.path for f in plan.files if not (local_dir / f.path).is_file()]
    if missing:
        sample = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"download of {plan.label} incomplete: {len(missing)} files missing ({sample})",
                        hint=RESUME_HINT)
    report.success(f"downloaded {plan.label}: {len(plan.files)} files ({_size_text(total)}) in {local_dir}")


@contextlib.contextmanager
def _hub_progress_bars_hidden() -> Iterator[None]:
    """Any bar huggingface_hub would draw itself (not through `tqdm_class`) stays off: cogtune draws one bar."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _finished_files(local_dir: Path, files: list[RemoteFile]) -> tuple[int, int]:
    """How many of `files` are already in `local_dir` at their full size, and their bytes."""
    count = size_total = 0
    for remote in files:
        try:
            size = (local_dir / remote.path).stat().st_size
        except OSError:
            continue
        if remote.size is None or size == remote.size:
            count += 1
            size_total += size
    return count, size_total


class _TransferProgress:
    """Feeds cogtune's byte bar from huggingface_hub's `tqdm_class` hook (`report.hub_tqdm_class`),
    and stops a transfer at its next chunk once cancelled."""

    def __init__(self, bar: report.ProgressBar, at_start: int):
        self.bar = bar
        self.at_start = at_start
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def tqdm_class(self) -> type:
        return report.hub_tqdm_class(self._on_bytes)

    def _on_bytes(self, done: float, total: float | None) -> None:
        if self.cancelled.is_set():  # called from inside a file's transfer: this stops it
            raise _Cancelled("download cancelled")
        self.bar.update(completed=self.at_start + done)


def _size_text(size: int | None) -> str:
    from rich.filesize import decimal

    return "size unknown" if size is None else decimal(size)


# --- errors ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_errors(plan: DownloadPlan, local_dir: Path | None, during_transfer: bool) -> Iterator[None]:
    """Turn what huggingface_hub and its HTTP client raise into one DataError line."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        raise _explain(exc, plan, local_dir, during_transfer) from exc


def _explain(exc: BaseException, plan: DownloadPlan, local_dir: Path | None, during_transfer: bool) -> DataError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import HFValidationError

    where, endpoint = plan.label, plan.endpoint
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        return _explain(exc.__cause__, plan, local_dir, during_transfer)
    if isinstance(exc, GatedRepoError):
        return DataError(f"repository {where} at {endpoint} is gated: accept its conditions on its Hub page",
                         hint=LOGIN_HINT)
    if isinstance(exc, RepositoryNotFoundError):
        return DataError(f"repository {where} not found at {endpoint}; check the id and --repo-type", hint=LOGIN_HINT)
    if isinstance(exc, RevisionNotFoundError):
        return DataError(f"revision '{plan.revision}' not found in {where} at {endpoint}",
                         hint="--revision takes a branch, tag or commit of the repository")
    if isinstance(exc, OfflineModeIsEnabled):
        return DataError("HF_HUB_OFFLINE=1 is set; unset it to download")
    if isinstance(exc, HFValidationError):
        return DataError(f"invalid repository id '{plan.repo_id}': {_reason(exc)}",
                         hint="a repository id looks like owner/name")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return DataError(f"the Hub at {endpoint} refused the credentials for {where} (401 Unauthorized)",
                             hint="log in again with `hf auth login`, or set a valid HF_TOKEN")
        if status == 403:
            return DataError(f"access to {where} at {endpoint} is denied (403 Forbidden)",
                             hint="the token lacks read access to this repository, or its conditions are not accepted")
        answer = f"the Hub at {endpoint} answered {status or _reason(exc)}"
        if during_transfer:
            return DataError(f"download of {where} interrupted: {answer}", hint=RESUME_HINT)
        return DataError(f"cannot read {where}: {answer}", hint="try again later")
    if isinstance(exc, _transport_errors()):
        if during_transfer:
            return DataError(f"download of {where} interrupted: {_reason(exc)}", hint=RESUME_HINT)
        return DataError(f"cannot reach the Hub at {endpoint}: {_reason(exc)}", hint=NETWORK_HINT)
    if isinstance(exc, OSError) and exc.errno is not None and local_dir is not None:
        return DataError(f"cannot write into {local_dir}: {exc.strerror or _reason(exc)}",
                         hint="check the folder's permissions and free disk space")
    if during_transfer:
        return DataError(f"download of {where} interrupted: {type(exc).__name__}: {_reason(exc)}", hint=RESUME_HINT)
    return DataError(f"cannot read {where} from {endpoint}: {type(exc).__name__}: {_reason(exc)}",
                     hint="run with --debug for the full traceback")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                   ("requests", "ConnectionError"), ("requests", "Timeout")):
        module = sys.modules.get(module_name)
        error_type = getattr(module, attribute, None) if module is not None else None
        if isinstance(error_type, type) and issubclass(error_type, BaseException):
            found.append(error_type)
    return tuple(found)


def _reason(exc: BaseException) -> str:
    """The first line of a library message, with anything that looks like a token masked."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return redact_secrets(lines[0][:300] if lines else type(exc).__name__)


def redact_secrets(text: str) -> str:
    """Mask Hub tokens (the HF_TOKEN value, `hf_...` strings, bearer credentials) in `text`."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        secret = os.environ.get(name, "").strip()
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


# --- validation ------------------------------------------------------------------------------


def _validate(local_dir: Path) -> None:
    from cogtune.data.dataset import DatasetConfig
    from cogtune.data.validate import print_report, validate_dataset

    result = validate_dataset(DatasetConfig(root=str(local_dir)))
    print_report(result)
    if not result.ok:
        count = len(result.errors)
        raise DataError(f"the download succeeded, but the dataset in {local_dir} has {count}"
                        f" error{'s' if count != 1 else ''} (listed above)",
                        hint=f"other layouts: see `cogtune dataset validate {local_dir} --help` (--dataset-file, ...)")
    report.success(f"dataset usable: {result.items} items, {len(result.warnings)} warnings")
