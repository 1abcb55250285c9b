"""The command line: help and examples everywhere, fast start, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cogtune import __version__
from tests.conftest import run_subprocess

COMMANDS = [
    ("dataset", "validate"), ("dataset", "download"), ("encode",), ("train", "t2v"), ("train", "i2v"),
    ("bench", "memory"), ("sample",), ("demo",), ("completion",), ("config", "accelerate"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_a_runnable_example(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Usage: cogtune " + " ".join(command) in result.stdout
    assert "Examples" in result.stdout
    assert "$ cogtune" in result.stdout or "$ torchrun" in result.stdout


def test_root_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in ("dataset", "encode", "train", "bench", "sample", "demo", "config"):
        assert name in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"cogtune {__version__}"


def test_help_imports_no_heavy_library():
    """`cogtune --help` stays instant because the CLI imports no torch/diffusers at module top."""
    code = (
        "import sys\n"
        "from cogtune.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft', 'decord', 'numpy')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_usage_error_exits_2(cli):
    result = cli("train", "t2v", "--no-such-flag")
    assert result.exit_code == 2


def test_known_error_is_one_line_exit_1(cli, tmp_path):
    result = cli("train", "t2v", "--model", "no-such-model", "--data", tmp_path, "--output-dir", tmp_path / "o")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'no-such-model'")
    assert "Traceback" not in result.stderr


def test_missing_required_setting_is_explained(cli):
    result = cli("train", "t2v", "--model", "tiny")
    assert result.exit_code == 1
    assert "data is required" in result.stderr


def test_config_file_error_names_the_key(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny"\nstepz = 3\n')
    result = cli("train", "t2v", "--config", path)
    assert result.exit_code == 1 and "unknown setting 'stepz' (did you mean 'steps'?)" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    """In a fresh process, with a settings error (found before any library loads, so the three runs are quick)."""
    path = tmp_path / "run.toml"
    path.write_text(f"model = 'tiny'\ndata = '{tmp_path}'\noutput_dir = '{tmp_path / 'o'}'\n[lora]\nrank = -3\n")
    args = ("train", "t2v", "--config", path)
    quiet = run_subprocess(*args)
    loud = run_subprocess("--debug", *args)
    env_loud = run_subprocess(*args, env={"COGTUNE_DEBUG": "1"})
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip() == f"error: {path}: lora.rank must be >= 1, got -3"
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert env_loud.returncode == 1 and "Traceback" in env_loud.stderr


def test_debug_raises_an_error_of_the_run_itself(tmp_path, monkeypatch):
    """An error the engine raises once the libraries are loaded (an unknown model): one line, or with --debug
    (or COGTUNE_DEBUG) the exception itself, for its traceback."""
    from cogtune.cli.app import main
    from cogtune.errors import ModelError

    monkeypatch.setenv("COGTUNE_DEBUG", "")  # (--debug sets it in this process: the test's end takes it back)
    args = ["train", "t2v", "--model", "no-such-model", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as quiet:
        main(args)
    assert quiet.value.code == 1
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        main(["--debug", *args])
    monkeypatch.setenv("COGTUNE_DEBUG", "1")
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        main(args)


def test_debug_shows_the_library_error_behind_a_one_line_error(tmp_path):
    """Wrapped library errors keep their cause: one line normally, the library's traceback with --debug."""
    path = tmp_path / "run.toml"
    path.write_text("model = \n")
    quiet = run_subprocess("train", "t2v", "--config", path)
    loud = run_subprocess("--debug", "train", "t2v", "--config", path)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not valid TOML: "), quiet.stderr
    assert loud.returncode == 1
    cause, _, wrapper = loud.stderr.partition("The above exception was the direct cause of the following exception")
    assert "tomllib.TOMLDecodeError" in cause or "tomli.TOMLDecodeError" in cause, loud.stderr
    assert "ConfigError" in wrapper


def test_unexpected_exceptions_are_one_line_too(cli, monkeypatch, tmp_path):
    import cogtune.train

    def boom(config):
        raise RuntimeError("something broke\nwith details")

    monkeypatch.setattr(cogtune.train, "run_training", boom)
    result = cli("train", "t2v", "--model", "tiny", "--data", tmp_path, "--output-dir", tmp_path / "o")
    assert result.exit_code == 1
    assert "error: unexpected error: something broke (hint: run with --debug" in result.stderr
    assert "RuntimeError" not in result.stderr
    assert "with details" not in result.stderr


@pytest.mark.parametrize(("error", "expected"), [
    ("gpu", "error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB (hint: try gradient checkpointing"),
    ("host", "error: out of host memory (RAM) (hint: close other programs"),
    ("message only", "error: unexpected error: a kernel ran out of memory (hint: run with --debug"),
])
def test_out_of_memory_is_recognised_by_its_type(cli, monkeypatch, tmp_path, error, expected):
    import torch

    import cogtune.train

    raised = {"gpu": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              "host": MemoryError(), "message only": RuntimeError("a kernel ran out of memory")}[error]

    def boom(config):
        raise raised

    monkeypatch.setattr(cogtune.train, "run_training", boom)
    result = cli("train", "t2v", "--model", "tiny", "--data", tmp_path, "--output-dir", tmp_path / "o")
    assert result.exit_code == 1
    assert expected in result.stderr


def test_python_dash_m_entry_point():
    result = run_subprocess("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def _run_in_terminal(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `python -m cogtune ARGS` attached to a pseudo-terminal, as in an interactive shell."""
    import os
    import pty
    import select
    import time

    main, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "cogtune", *[str(a) for a in args]], stdin=follower,
                               stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    try:  # the terminal closes a moment before the process is gone
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"cogtune {' '.join(map(str, args))} hung in a terminal:\n{output.decode()[-2000:]}")
    os.close(main)
    return process.returncode, output.decode(errors="replace")


def test_live_progress_in_a_terminal_does_not_hang(tmp_path):
    """Regression: rich's live display swaps sys.stderr; the console must not write back into it."""
    from cogtune.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", count=3, frames=9, height=32, width=32)
    (data / "videos" / "broken.mp4").write_bytes(b"junk" * 100)
    with open(data / "prompts.txt", "a") as handle:
        handle.write("broken\n")
    with open(data / "videos.txt", "a") as handle:
        handle.write("videos/broken.mp4\n")
    code, output = _run_in_terminal("dataset", "validate", data)
    assert code == 1
    assert "videos.txt:4: videos/broken.mp4" in output
    assert "video_reader.cc" not in output  # decord's own message stays muted


def test_debug_works_after_the_subcommand_too(cli, monkeypatch, tmp_path):
    import os

    import cogtune.train

    def boom(config):
        raise RuntimeError("something broke")

    monkeypatch.setattr(cogtune.train, "run_training", boom)
    monkeypatch.setenv("COGTUNE_DEBUG", "0")  # off, and restored after the test (main sets it to 1)
    with pytest.raises(RuntimeError, match="something broke"):  # --debug: the traceback, not one line
        cli("train", "t2v", "--model", "tiny", "--data", tmp_path, "--output-dir", tmp_path / "o", "--debug")
    assert os.environ.get("COGTUNE_DEBUG") == "1"
