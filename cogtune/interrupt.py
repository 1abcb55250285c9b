"""Ctrl-C (or a scheduler's SIGTERM) during long work: stop at a safe point and say how to go on.

A recipe listens while it works. The first SIGINT or SIGTERM only sets `StopRequest.requested`;
the recipe checks it between units of work (a training step, a batch of clips), finishes the
unit in progress, leaves its outputs consistent, and raises `Interrupted`, whose one line names
what was kept and the command that continues. A second signal stops at once (KeyboardInterrupt:
typer exits with 130); every output file is written atomically, so none is left half-written.

The exit code is the shell's for a process a signal ended: 128 + the signal's number, so 130
for Ctrl-C and 143 for SIGTERM; a script or scheduler can tell "stopped, resumable" from "failed" (1).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence

from cogtune import report
from cogtune.errors import CogtuneError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(CogtuneError):
    """The run was asked to stop and stopped at a safe point; what it wrote is kept.

    Under a launcher every process stops at the same point (the recipe has them agree) with the same
    line and exit code: the main process shows it.
    """

    shared = True

    def __init__(self, message: str, hint: str | None = None, signum: int = signal.SIGINT):
        super().__init__(message, hint)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """Whether a stop was asked for (and by which signal), while `listening`."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def listening(self, enabled: bool, stopping: str = "stopping at the next safe point") -> Iterator[StopRequest]:
        """While inside, the first SIGINT or SIGTERM sets `requested`; a second raises KeyboardInterrupt.

        `stopping` says what happens next ("stopping after this step, with a checkpoint").
        Signal handlers can only be set from the main thread: elsewhere this does nothing.
        """
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return

        owner = os.getpid()

        def handler(signum, frame):  # noqa: ARG001
            if os.getpid() != owner:
                # A process forked from this one (a DataLoader worker) before it set its own handlers
                # (`leave_stopping_to_the_parent`): the stop is this process's to decide, and to say.
                return
            if self.requested:
                raise KeyboardInterrupt
            self.signum = signum
            if signum == signal.SIGINT:
                report.warn(f"{stopping}; press Ctrl-C again to stop at once", shared=True)
            else:
                report.warn(f"{signal.Signals(signum).name} received: {stopping}; a second signal stops at once",
                            shared=True)

        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, action in previous.items():
                signal.signal(sig, action)

    def interrupted(self, message: str, hint: str | None = None) -> Interrupted:
        """The error that ends the run, with the exit code of the signal that stopped it."""
        return Interrupted(message, hint, self.signum or signal.SIGINT)


def leave_stopping_to_the_parent(worker_id: int = 0) -> None:  # noqa: ARG001
    """For worker processes (a DataLoader's `worker_init_fn`): the process that started them decides.

    A terminal's Ctrl-C reaches the whole process group, workers included, and torchrun (or a
    scheduler) signals each rank's group. A worker ignores SIGINT, so that what it decodes can still
    be fetched while the parent finishes the batch in flight. It takes SIGTERM from anyone as a quiet
    exit (torch's workers end quietly on KeyboardInterrupt; torch's own handler does so only for
    their parent's SIGTERM): a worker killed by a signal makes torch raise "DataLoader worker is
    killed by signal" in the parent, wherever it is.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    die_with_parent()


PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2  # prctl(2) options


def die_with_parent() -> None:
    """Have the kernel kill this (worker) process when its parent dies, whatever kills the parent.

    A parent killed with SIGKILL runs no clean-up, and its workers would decode on until torch's
    watchdog notices (seconds later), holding the files they inherited: the output folder's lock
    among them, so an immediate re-run would be refused. Linux only; elsewhere the watchdog stays.
    """
    import ctypes
    import multiprocessing

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before the request took effect
        os._exit(0)


def _exit_quietly(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def rerun_command(invocation: Sequence[str] | None, *, drop: Sequence[str] = (),
                  drop_with_value: Sequence[str] = (), append: Sequence[str] = ()) -> str | None:
    """The command line that started this run, without the flags in `drop` (and the options in
    `drop_with_value`, with their values), plus `append`, quoted for a POSIX shell; None if unknown."""
    if not invocation:
        return None
    kept: list[str] = []
    skip = False
    for arg in invocation:
        if skip:
            skip = False
            continue
        if arg in drop_with_value:
            skip = True
            continue
        if arg in drop or any(arg.startswith(f"{option}=") for option in drop_with_value):
            continue
        kept.append(arg)
    return shlex.join([*kept, *append])
