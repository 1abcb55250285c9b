"""The command that resumes an interrupted training run (Ctrl-C itself: `cogtune.interrupt`).

The first Ctrl-C (or SIGTERM) asks the loop to stop after the step in progress; the loop then saves
a checkpoint and ends with one line naming it and this command. This applies to one-process runs:
under a launcher every process would have to agree on the step to stop at, so there Ctrl-C keeps
its usual meaning (the last checkpoint still resumes).
"""

from __future__ import annotations

from cogtune.interrupt import rerun_command

_RESUME_FLAGS = ("--resume", "--resume-from-checkpoint")


def resume_command(invocation: list[str] | None) -> str:
    """The command that continues this run: the one that started it, with `--resume latest`."""
    command = rerun_command(invocation, drop=("--overwrite",), drop_with_value=_RESUME_FLAGS,
                            append=("--resume", "latest"))
    return command or "the same command with --resume latest"
