"""The command that resumes an interrupted training run (Ctrl-C itself: `cogtune.interrupt`).

The first Ctrl-C (or SIGTERM) asks the loop to stop after the step in progress; the loop then saves
a checkpoint and ends with one line naming it and this command. Under a launcher (torchrun,
`accelerate launch`), which forwards the signal to every process, the processes agree after each
step whether any was asked to stop, so all of them stop after the same step and save one checkpoint;
the main process says so, and every process exits with the signal's code.
"""

from __future__ import annotations

from cogtune.interrupt import rerun_command

_RESUME_FLAGS = ("--resume", "--resume-from-checkpoint")


def resume_command(invocation: list[str] | None, launched: bool = False) -> str:
    """The command that continues this run: the one that started it, with `--resume latest`.

    A process of a launch only knows its own arguments (what follows `-m cogtune`): `launched` says
    that the launcher is to run them again.
    """
    command = rerun_command(invocation, drop=("--overwrite",), drop_with_value=_RESUME_FLAGS,
                            append=("--resume", "latest"))
    if not command:
        return "the same command with --resume latest"
    return f"the same launch, running {command}" if launched else command
