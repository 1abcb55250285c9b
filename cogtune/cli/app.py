"""The root `cogtune` app: registers the command groups and turns failures into one-line errors.

Command modules import only typer and cogtune's light modules at the top; the engine (torch,
diffusers) is imported inside each command, so `cogtune --help` and shell completion stay instant.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Optional

import typer

from cogtune import __version__
from cogtune.cli import bench, completion, config, dataset, demo, encode, lora, sample, train

app = typer.Typer(
    name="cogtune",
    help="Fine-tune CogVideoX text-to-video and image-to-video models (LoRA or full), on one GPU or many.",
    epilog="Start with `cogtune demo --output-dir demo`: the whole pipeline, offline, on a tiny model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: every option's full name fits at 80 columns
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(dataset.app, name="dataset")
app.command("encode", epilog=encode.EPILOG)(encode.encode)
app.add_typer(train.app, name="train")
app.add_typer(bench.app, name="bench")
app.command("sample", epilog=sample.EPILOG)(sample.sample)
app.add_typer(lora.app, name="lora")
app.command("demo", epilog=demo.EPILOG)(demo.demo)
app.add_typer(config.app, name="config")
app.command("completion", epilog=completion.EPILOG)(completion.completion)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cogtune {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library logs (or COGTUNE_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["COGTUNE_DEBUG"] = "1"


@functools.cache
def _command() -> typer.core.TyperGroup:
    """The click command tree Typer builds from `app`, built once per process (what `app()` does on every
    call, about 60 ms; `main` runs many times in one process where it is called in-process, as the tests do).
    `app()` also installs Typer's exception hook, which with `pretty_exceptions_enable=False` is Python's."""
    return typer.main.get_command(app)


def _debug() -> bool:
    return os.environ.get("COGTUNE_DEBUG", "") not in ("", "0")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _is_gpu_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (CUDA and other accelerators), recognised by its type.

    torch is not imported here: if it was never imported, the error cannot be torch's."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 on success, 1 with a one-line reason on failure, 2 on usage errors,
    130 (143 for SIGTERM) when Ctrl-C stopped the run at a safe point."""
    from cogtune import startup

    startup.pause_collection()  # for the imports (cogtune.startup)
    try:
        _run(list(sys.argv[1:] if argv is None else argv))
    finally:
        startup.finish()


def _run(args: list[str]) -> None:
    """`main`: the command, and its failure reported in one line."""
    from cogtune import report
    from cogtune.errors import CogtuneError
    from cogtune.interrupt import Interrupted
    from cogtune.quiet import quiet_libraries

    if "--debug" in args:  # anywhere, also after the subcommand
        os.environ["COGTUNE_DEBUG"] = "1"  # known before parsing, so that library logs stay on
        args = [arg for arg in args if arg != "--debug"]
    quiet_libraries()  # before any library is imported: some read their settings at import time
    report.invocation = ["cogtune", *args]
    try:
        _command()(args=args, prog_name="cogtune")
    except CogtuneError as exc:
        if _debug():
            raise
        code = getattr(exc, "exit_code", 1)  # 130 for a run Ctrl-C stopped (cogtune.interrupt)
        if exc.shared and not report.is_main_process() and not isinstance(exc, Interrupted):
            _leave_the_shared_error_to_the_main_process(exc, code)
        report.error(exc.message, exc.hint, shared=exc.shared)
        sys.exit(code)
    except Exception as exc:  # anything else is still a failed run, reported in one line
        if _debug():
            raise
        from cogtune.fsutil import disk_full_error, is_disk_full

        if is_disk_full(exc):  # a writer that did not say which file: the error may know
            filename = getattr(exc, "filename", None)
            message = disk_full_error(filename).message if filename else "no space left on device while writing an output"
            report.error(message, "free some space on that disk (or write somewhere else) and run again")
        elif _is_gpu_out_of_memory(exc):
            report.error(f"out of memory: {_first_line(exc)}",
                         "try gradient checkpointing, a smaller batch or clip shape; `cogtune bench memory` sizes a run")
        elif isinstance(exc, MemoryError):
            report.error("out of host memory (RAM)" + (f": {_first_line(exc)}" if str(exc).strip() else ""),
                         "close other programs, or lower --num-workers, the batch or the clip shape")
        else:  # a failure cogtune did not foresee: its message, never a bare exception name
            report.error(f"unexpected error: {_first_line(exc) if str(exc).strip() else 'no message'}",
                         "run with --debug for the full traceback, and please report it")
        sys.exit(1)


# How long a process of a launch waits for the main process to show an error they share (seconds).
SHARED_ERROR_WAIT = 30.0


def _leave_the_shared_error_to_the_main_process(exc, code: int) -> None:
    """A shared error is the main process's to show. Were this process to exit first, the launcher (torchrun,
    accelerate) would stop the main process with SIGTERM, perhaps before it has shown the error: the user
    would read only the launcher's traceback. So wait for the launcher's SIGTERM, which comes once the main
    process has failed, and end then with this error's exit code. Should none come (the main process did not
    fail the same way), show the error here after all. (The process ends either way: the handlers stay.)
    A stop (`Interrupted`) does not wait: the launcher is stopping every process already, and waits for each."""
    import signal
    import time

    from cogtune import report
    from cogtune.launch import launched_processes

    if launched_processes() < 2:
        return

    def stopped(signum, frame):  # noqa: ARG001
        sys.exit(code)

    for signum in (signal.SIGTERM, signal.SIGINT):  # (a Ctrl-C while waiting ends it the same way)
        signal.signal(signum, stopped)
    time.sleep(SHARED_ERROR_WAIT)
    report.error(exc.message, exc.hint)
    sys.exit(code)


if __name__ == "__main__":
    main()
