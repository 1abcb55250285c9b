"""Every example in a command's `--help` runs as written.

The examples are read from the command tree's epilogs, so a new one is covered without touching
this file. Those that work on the demo's folders (`demo/...`) or on a built-in tiny model run for
real, in order, in a copy of what `cogtune demo` leaves; the others need a Hub model, a GPU or the
user's data, and go through the real parser only.
"""

from __future__ import annotations

import shlex
import shutil

import pytest
import typer

from cogtune.cli.app import app as cogtune_app
from cogtune.cli.common import examples
from cogtune.models.registry import ALL_PRESETS, TINY_PRESETS

_PROMPT = "  $ "


def _cogtune_args(line: str) -> list[str] | None:
    """The arguments `cogtune` gets from an example line (also `torchrun ... -m cogtune ...`), or None."""
    line = line.split(" > ")[0]  # a redirection is the shell's
    words = shlex.split(line)
    if words[:1] == ["cogtune"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "cogtune"]:
            return words[i + 2:]
    return None


def _examples() -> dict[str, list[list[str]]]:
    """Each command path's examples, as cogtune arguments, in the order its `--help` shows them."""
    found: dict[str, list[list[str]]] = {}

    def walk(command, path: str) -> None:
        for line in (command.epilog or "").splitlines():
            args = _cogtune_args(line[len(_PROMPT):]) if line.startswith(_PROMPT) else None
            if args is not None:
                found.setdefault(path, []).append(args)
        for name, child in sorted((getattr(command, "commands", {}) or {}).items()):
            walk(child, f"{path} {name}".strip())

    walk(typer.main.get_command(cogtune_app), "")
    return found


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            return args[i + 1]
    return None


def _runs_offline(args: list[str]) -> bool:
    """On the demo's folders, or on a built-in tiny model: nothing to download, no GPU."""
    return any(arg.startswith("demo/") for arg in args) or _option(args, "--model", "-m") in TINY_PRESETS


EXAMPLES = _examples()
OFFLINE = {path: [args for args in lines if _runs_offline(args)] for path, lines in EXAMPLES.items()}
OFFLINE = {path: lines for path, lines in OFFLINE.items() if lines}
PARSED = [(path, args) for path, lines in EXAMPLES.items() for args in lines if not _runs_offline(args)]


def test_examples_are_collected_from_the_command_tree():
    assert examples("cogtune x").startswith("Examples:") and _PROMPT + "cogtune x" in examples("cogtune x")
    assert {"train t2v", "train i2v", "encode", "sample"} <= set(OFFLINE)
    assert any(args[:2] == ["train", "t2v"] and "run.toml" in args for _, args in PARSED)  # from `torchrun -m cogtune`
    assert len(PARSED) >= 20


@pytest.fixture(scope="module")
def demo_outputs(demo_run):
    """What `cogtune demo --output-dir demo` leaves (with 20 training steps), run as a user runs it, once for the
    suite (tests/conftest.py); each test copies it."""
    folder, code, _, stderr = demo_run
    assert code == 0, stderr[-2000:]
    return folder


@pytest.mark.parametrize("path", sorted(OFFLINE))
def test_offline_examples_run_on_the_demo_outputs(path, demo_outputs, cli, tmp_path, monkeypatch):
    """The command's offline examples, in order, in a fresh copy of the demo folder: each exits 0."""
    shutil.copytree(demo_outputs, tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    for args in OFFLINE[path]:
        result = cli(*args)
        assert result.exit_code == 0, f"cogtune {shlex.join(args)}\n{result.stderr[-2000:]}"
        output_dir = _option(args, "--output-dir", "-o")
        if output_dir and args[0] in ("encode", "train") and "--dry-run" not in args:
            assert any((tmp_path / output_dir).iterdir()), f"cogtune {shlex.join(args)} wrote nothing"
        if args[0] == "sample":
            _check_video(tmp_path, args)


def _check_video(cwd, args: list[str]) -> None:
    """decord (not cogtune) decodes every frame of the example's mp4, at the size asked for."""
    import decord

    output = cwd / _option(args, "--output", "-o")
    spec = ALL_PRESETS[_option(args, "--model", "-m")]
    frames = int(_option(args, "--frames", "-F") or spec.default_frames)
    height = int(_option(args, "--height", "-H") or spec.default_height)
    width = int(_option(args, "--width", "-W") or spec.default_width)
    reader = decord.VideoReader(str(output))
    assert len(reader) == frames
    assert reader.get_batch(list(range(frames))).asnumpy().shape == (frames, height, width, 3)


@pytest.mark.parametrize("args", [args for _, args in PARSED], ids=[shlex.join(args)[:80] for _, args in PARSED])
def test_other_examples_parse(args, cli, monkeypatch):
    """Examples that need a Hub model, a GPU or the user's data: the real parser takes them (every option
    and value checked) and reaches the command they name, whose work is then not done."""
    reached = []
    monkeypatch.setattr(typer.core.TyperCommand, "invoke", lambda self, ctx: reached.append(ctx.command_path))
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert len(reached) == 1
    command = reached[0].split()[1:]
    assert command and args[:len(command)] == command


def _readme_demo_commands() -> list[list[str]]:
    """The README's commands that work on the demo's outputs, in the README's order."""
    from tests.test_readme import _commands

    commands = [shlex.split(command)[1:] for command in _commands()]
    return [args for args in commands if args[0] != "demo" and any(arg.startswith("demo/") for arg in args)]


def test_readme_commands_run_on_the_demo_outputs(demo_outputs, cli, tmp_path, monkeypatch):
    """What the README tells a user to try after `cogtune demo`, run as written: each exits 0."""
    commands = _readme_demo_commands()
    assert {args[0] for args in commands} >= {"train", "sample", "lora"}
    shutil.copytree(demo_outputs, tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    for args in commands:
        result = cli(*args)
        assert result.exit_code == 0, f"cogtune {shlex.join(args)}\n{result.stderr[-2000:]}"
        if args[0] == "sample":
            _check_video(tmp_path, args)
