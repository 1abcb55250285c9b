"""Shell completions in completions/ are generated from the app; stale files fail this test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cogtune.cli.completion import FILES, SHELLS, generate

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_files_are_up_to_date(shell):
    path = COMPLETIONS / FILES[shell]
    assert path.is_file(), f"missing {path}; run `make completions`"
    assert path.read_text() == generate(shell), f"{path} is stale; run `make completions`"


def test_scripts_know_commands_and_options():
    bash = generate("bash")
    assert "'train t2v') words=" in bash and "--validation-prompt" in bash
    assert "cogvideox-5b-i2v" in bash
    assert "#compdef cogtune" in generate("zsh")
    assert "__cogtune_path" in generate("fish")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_script_completes(tmp_path):
    script = tmp_path / "c.bash"
    script.write_text(generate("bash"))
    probe = (
        f"source {script}; COMP_WORDS=(cogtune train t2v --ra); COMP_CWORD=3; _cogtune; echo ${{COMPREPLY[@]}};"
        f" COMP_WORDS=(cogtune tr); COMP_CWORD=1; _cogtune; echo ${{COMPREPLY[@]}};"
        f" COMP_WORDS=(cogtune encode --model cogvideox1); COMP_CWORD=3; _cogtune; echo ${{COMPREPLY[@]}}"
    )
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0].split() == ["--rank", "--random-weights"]
    assert lines[1] == "train"
    assert lines[2].split() == ["cogvideox1.5-5b", "cogvideox1.5-5b-i2v"]


def test_unknown_shell_is_a_usage_error(cli):
    assert cli("completion", "tcsh").exit_code == 2
