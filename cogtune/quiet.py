"""Keep third-party chatter (torchao, bitsandbytes, kernels, torch, diffusers, decord) off the user's terminal.

Messages of these libraries at import time are about optional kernels we do not use, and decord
prints its own errors for files we already report; they bury cogtune's own output. `--debug`
(COGTUNE_DEBUG=1) leaves them alone. `collections_paused` imports them without pausing for Python's
garbage collector.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

# kernels: bitsandbytes, imported on a CPU with AVX512-BF16, asks it for a Hub kernel, and offline it warns
# "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' ...".
_NOISY_LOGGERS = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree", "torch._dynamo", "diffusers",
                  "transformers", "accelerate", "peft", "huggingface_hub")

_done = False


def debug_enabled() -> bool:
    return os.environ.get("COGTUNE_DEBUG", "") not in ("", "0")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """Lower the log level of chatty libraries; call before importing them. Idempotent."""
    global _done
    if _done or debug_enabled():
        return
    _done = True
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # huggingface_hub's own tqdm bars would fight rich's live display; weights that download get
    # cogtune's byte bar instead (`report.hub_download_progress`), which this does not hide.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed sets its logger's level and adds a stdout handler when it is imported (accelerate imports
    # it to unwrap or save a model): a filter on the logger outlives both.
    logging.getLogger("DeepSpeed").addFilter(_errors_only)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # diffusers passes huggingface_hub 2.x an argument it ignores, with a warning per Hub download.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    # peft's torchao LoRA layer warns that it cannot merge into an int8 base it did not load itself; cogtune never
    # merges into a quantized base (`lora merge` merges into the unquantized one).
    warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`.*")
    # FSDP2 warns that the root module returns a view (the transformer's output); cogtune never edits it in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """Automatic garbage collection off inside, for importing large libraries (torch, diffusers): an import
    makes hundreds of thousands of objects, over which Python would run several full collections that free
    next to nothing (about a second of `bench memory`'s process)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- native stderr ---------------------------------------------------------------------------
# decord and ffmpeg print their own errors straight to file descriptor 2 when a file cannot be
# opened, whatever their log level; cogtune reports those problems itself, in one line. While a
# video is opened, fd 2 points to /dev/null; cogtune's own output (through `StderrProxy`) keeps
# going to the real stderr meanwhile.

_mute_lock = threading.RLock()
_mute_depth = 0
_saved_fd: int | None = None


@contextlib.contextmanager
def muted_native_stderr() -> Iterator[None]:
    """Silence what C libraries write to fd 2 inside the block (nestable, thread-safe)."""
    global _mute_depth, _saved_fd
    if debug_enabled():
        yield
        return
    with _mute_lock:
        if _mute_depth == 0:
            sys.stderr.flush()
            _saved_fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _mute_depth += 1
    try:
        yield
    finally:
        with _mute_lock:
            _mute_depth -= 1
            if _mute_depth == 0 and _saved_fd is not None:
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)
                _saved_fd = None


class StderrProxy:
    """A file for rich: the current stderr, or the saved real stderr while fd 2 is muted.

    While a rich live display runs, `sys.stderr` is rich's own redirecting proxy; writing to it
    from the console would loop back into the console, so the proxied file is used instead.
    """

    @staticmethod
    def _stream():
        stream = sys.stderr
        return getattr(stream, "rich_proxied_file", stream)

    def _writes_to_fd2(self) -> bool:
        try:
            return self._stream().fileno() == 2
        except (AttributeError, OSError, ValueError):
            return False

    def write(self, text: str) -> int:
        with _mute_lock:
            stream = self._stream()
            if _saved_fd is not None and self._writes_to_fd2():
                stream.flush()
                os.write(_saved_fd, text.encode(getattr(stream, "encoding", None) or "utf-8", errors="replace"))
                return len(text)
            return stream.write(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        return self._stream().isatty()

    def fileno(self) -> int:
        return self._stream().fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream(), "encoding", None) or "utf-8"
