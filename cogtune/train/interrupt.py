"""Ctrl-C during training: stop at a safe point, with a checkpoint and the command that resumes.

The first Ctrl-C asks the loop to stop after the step in progress; the loop then saves a
checkpoint and ends with one line naming it and the exact command to resume. A second Ctrl-C stops
at once. This applies to one-process runs: under a launcher every process would have to agree on
the step to stop at, so there Ctrl-C keeps its usual meaning (the last checkpoint still resumes).
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Iterator

from cogtune import report

_RESUME_FLAGS = ("--resume", "--resume-from-checkpoint")


class StopRequest:
    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def listening(self, enabled: bool) -> Iterator[StopRequest]:
        """While inside, the first SIGINT sets `requested` instead of raising KeyboardInterrupt."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):  # noqa: ARG001
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            report.warn("stopping after this step, with a checkpoint; press Ctrl-C again to stop at once")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def resume_command(invocation: list[str] | None) -> str:
    """The command that continues this run: the one that started it, with `--resume latest`."""
    if not invocation:
        return "the same command with --resume latest"
    kept: list[str] = []
    skip = False
    for arg in invocation:
        if skip:
            skip = False
            continue
        if arg in _RESUME_FLAGS:
            skip = True
            continue
        if arg == "--overwrite" or any(arg.startswith(f"{flag}=") for flag in _RESUME_FLAGS):
            continue
        kept.append(arg)
    return shlex.join([*kept, "--resume", "latest"])
