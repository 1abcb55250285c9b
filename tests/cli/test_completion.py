"""Shell completions in completions/ are generated from the app; stale files fail this test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer

from cogtune.cli.app import app as cogtune_app
from cogtune.cli.completion import FILES, SHELLS, command_tree, generate

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"

ROOT = typer.main.get_command(cogtune_app)


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_files_are_up_to_date(shell):
    path = COMPLETIONS / FILES[shell]
    assert path.is_file(), f"missing {path}; run `make completions`"
    assert path.read_text() == generate(shell, ROOT), f"{path} is stale; run `make completions`"


def test_scripts_know_commands_and_options():
    bash = generate("bash", ROOT)
    assert "'train t2v') words=" in bash and "--validation-prompt" in bash
    assert "cogvideox-5b-i2v" in bash
    assert "#compdef cogtune" in generate("zsh", ROOT)
    assert "__cogtune_path" in generate("fish", ROOT)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_script_completes(tmp_path):
    script = tmp_path / "c.bash"
    script.write_text(generate("bash", ROOT))
    probe = (
        f"source {script}; COMP_WORDS=(cogtune train t2v --ra); COMP_CWORD=3; _cogtune; echo ${{COMPREPLY[@]}};"
        f" COMP_WORDS=(cogtune tr); COMP_CWORD=1; _cogtune; echo ${{COMPREPLY[@]}};"
        f" COMP_WORDS=(cogtune encode --model cogvideox1); COMP_CWORD=3; _cogtune; echo ${{COMPREPLY[@]}}"
    )
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert sorted(lines[0].split()) == ["--random-weights", "--rank"]
    assert lines[1] == "train"
    assert sorted(lines[2].split()) == ["cogvideox1.5-5b", "cogvideox1.5-5b-i2v"]


def test_unknown_shell_is_a_usage_error(cli):
    assert cli("completion", "tcsh").exit_code == 2


def test_command_tree_reads_typer_apps_through_public_attributes(tmp_path):
    """Pins what the generator leans on: `typer.main.get_command` gives a tree with `commands`, and
    params with `opts`, `is_flag`, `hidden`, `help`; `callback` unwraps to the function we wrote."""
    app = typer.Typer()
    group = typer.Typer(help="Things.\n\nMore text.")
    app.add_typer(group, name="group")

    @group.command("leaf", help="Do a leaf.")
    def leaf(
        name: Annotated[str, typer.Argument()],
        folder: Annotated[Path, typer.Option("--folder")],
        maybe_file: Annotated[Optional[Path], typer.Option("--maybe-file", "-f", help="A file.")] = None,
        count: Annotated[int, typer.Option("--count", help="How many. [default: 3]")] = 3,
        fast: Annotated[bool, typer.Option("--fast/--slow")] = False,
        secret: Annotated[bool, typer.Option("--secret", hidden=True)] = False,
    ) -> None: ...

    @group.command("hidden", hidden=True)
    def hidden() -> None: ...

    nodes = {node.path: node for node in command_tree(typer.main.get_command(app))}

    assert sorted(nodes) == ["", "group", "group leaf"]
    assert nodes["group"].subcommands == [("leaf", "Do a leaf")]
    options = {tuple(o.names): o for o in nodes["group leaf"].options}
    assert list(options) == [("--folder",), ("--maybe-file",), ("--count",), ("--fast", "--slow"), ("--help",)]
    assert [o.is_path for o in options.values()] == [True, True, False, False, False]
    assert [o.takes_value for o in options.values()] == [True, True, True, False, False]
    assert options[("--count",)].help == "How many"
    assert options[("--maybe-file",)].help == "A file"


def test_path_options_complete_file_names_and_others_do_not():
    bash = generate("bash", ROOT)
    file_case = next(line for line in bash.splitlines() if "compgen -f" in line)
    names = file_case.strip().split(")")[0].split("|")
    assert {"--local-dir", "--config", "--output-dir"} <= set(names)
    assert not {"--revision", "--model", "--include", "--rank"} & set(names)
    fish = generate("fish", ROOT)
    assert any("-l local-dir -r -F" in line for line in fish.splitlines())
    assert not any("-l revision -r -F" in line for line in fish.splitlines())
