"""`accelerate launch` with the processes forked from a process that has imported the libraries already.

A launched process spends about 4 s of CPU importing torch, transformers, peft and diffusers before it
trains `tiny` for a second or two; the suite launches dozens. `forked_launch(config_file, *args)` does
what `accelerate launch --config_file FILE -m cogtune ARGS` does, without starting an interpreter per
process:

- the launch's arguments and its processes' environment come from accelerate's own code, as `accelerate
  launch` makes them (`launch_command_parser`, `_validate_launch_command`, then `prepare_multi_gpu_env` or
  `prepare_deepspeed_cmd_env`, the dicts it sets before it hands over to torchrun), and torchrun's
  variables of each process are added as torchrun sets them (RANK, LOCAL_RANK, WORLD_SIZE, ...);
- each process is forked from a forkserver (`multiprocessing`) that imported `cogtune.startup.LIBRARIES`
  once per test worker and has run nothing: a process starts as a fresh `python -m cogtune` does, with those
  modules loaded; it runs the launch hooks (launch_hooks/sitecustomize.py) and `cogtune.cli.app.main`
  with the launch's arguments, its output written where `accelerate launch` writes it (one log for all);
- like torchrun, when one process fails the others are stopped.

What this does not run is the launchers themselves (accelerate's CLI and torchrun's agent): the tests of
launching, signals and errors use `accelerate_launch` (conftest.py), and so does one run of each
strategy (tests/distributed/test_training.py, test_deepspeed.py).
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.connection
import os
import runpy
import sys
import time
from pathlib import Path

LAUNCH_HOOKS = Path(__file__).parent / "launch_hooks"
_context = None


def _forkserver():
    """The forkserver context, started on first use with the libraries imported (once per test worker)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.distributed.rank_preload"])
    return _context


def launch_environment(config_file: Path, args: list[str], machine_rank: int | None) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE [--machine_rank N] -m cogtune ARGS` gives torchrun
    (its own launch code), and torchrun's variables common to this machine's processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    options = ["--config_file", str(config_file)]
    if machine_rank is not None:
        options += ["--machine_rank", str(machine_rank)]
    parsed = launch_command_parser().parse_args([*options, "-m", "cogtune", *args])
    parsed, defaults, precision_from_config = _validate_launch_command(parsed)
    if parsed.use_deepspeed:  # as `launch_command` does before `deepspeed_launcher`
        fields = list(defaults.deepspeed_config) if defaults else []
        if precision_from_config:
            fields.append("mixed_precision")
        parsed.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, environment = prepare_deepspeed_cmd_env(parsed)
    else:
        environment = prepare_multi_gpu_env(parsed)
    per_machine = parsed.num_processes // parsed.num_machines
    return {"OMP_NUM_THREADS": "1", **os.environ, **environment,  # torchrun's OMP default where none is set
            "MASTER_ADDR": parsed.main_process_ip or "127.0.0.1", "MASTER_PORT": str(parsed.main_process_port),
            "WORLD_SIZE": str(parsed.num_processes), "LOCAL_WORLD_SIZE": str(per_machine),
            "GROUP_RANK": str(parsed.machine_rank or 0), "ROLE_NAME": "default",
            "ROLE_WORLD_SIZE": str(parsed.num_processes), "TORCHELASTIC_RUN_ID": "none"}


def run_process(environment: dict[str, str], argv: list[str], log: str) -> None:
    """One launched process (in the forked child): its environment, output and hooks, then `cogtune ARGV`."""
    os.environ.clear()
    os.environ.update(environment)
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    runpy.run_path(str(LAUNCH_HOOKS / "sitecustomize.py"))
    from cogtune.cli.app import main

    main(argv)


class ForkedLaunch:
    """The processes of one machine of a launch (`forked_launch`), writing to one log."""

    def __init__(self, config_file: Path, args: list[str], log: Path, machine_rank: int | None,
                 record_latents: Path | None) -> None:
        base = launch_environment(config_file, args, machine_rank)
        if "distributed_type: DEEPSPEED" in config_file.read_text():
            base["COGTUNE_TEST_GLOO_ONLY"] = "1"
        if record_latents is not None:
            base["COGTUNE_TEST_RECORD_LATENTS"] = str(record_latents)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        per_machine, machine = int(base["LOCAL_WORLD_SIZE"]), int(base["GROUP_RANK"])
        self.processes = []
        for local in range(per_machine):
            rank = str(machine * per_machine + local)
            environment = dict(base, RANK=rank, LOCAL_RANK=str(local), ROLE_RANK=rank)
            process = _forkserver().Process(target=run_process, args=(environment, args, str(log)))
            process.start()
            self.processes.append(process)

    def finish(self, timeout: float = 240) -> str:
        """Wait for the processes (stopping the others once one fails, as torchrun does, and all of them past
        `timeout`); they must all succeed. Returns their output."""
        deadline = time.monotonic() + timeout
        while any(process.is_alive() for process in self.processes):
            failed = any(process.exitcode not in (None, 0) for process in self.processes)
            if failed or time.monotonic() > deadline:
                for process in self.processes:
                    if process.is_alive():
                        process.kill()
                break
            multiprocessing.connection.wait([p.sentinel for p in self.processes if p.is_alive()], timeout=0.5)
        for process in self.processes:
            process.join()
        output = self.log.read_text()
        assert time.monotonic() <= deadline, f"the launch hung for {timeout} s:\n{output[-3000:]}"
        codes = [process.exitcode for process in self.processes]
        assert codes == [0] * len(codes), f"exit codes {codes}:\n{output[-4000:]}"
        return output


def forked_launch(config_file: Path, *args, log: Path, machine_rank: int | None = None,
                  record_latents: Path | None = None) -> ForkedLaunch:
    """`accelerate launch --config_file FILE [--machine_rank N] -m cogtune ARGS`, its processes forked (the
    module's doc), started; `.finish()` waits for them. Their output goes to `log`."""
    return ForkedLaunch(config_file, [str(a) for a in args], log, machine_rank, record_latents)

