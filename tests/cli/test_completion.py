"""Shell completions in completions/ are generated from the app; stale files fail this test."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import typer

from cogtune.accelerate_config import STRATEGIES
from cogtune.cli.app import app as cogtune_app
from cogtune.cli.completion import FILES, SHELLS, command_tree, generate
from cogtune.cli.options import completes
from cogtune.config import setting_choices
from cogtune.train.config import LoraConfig, OptimizerConfig

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
        kind: Annotated[Literal["x", "y"], typer.Argument()],
        folder: Annotated[Path, typer.Option("--folder")],
        maybe_file: Annotated[Optional[Path], typer.Option("--maybe-file", "-f", help="A file.")] = None,
        count: Annotated[int, typer.Option("--count", help="How many. [default: 3]")] = 3,
        fast: Annotated[bool, typer.Option("--fast/--slow")] = False,
        secret: Annotated[bool, typer.Option("--secret", hidden=True)] = False,
        color: Annotated[Literal["red", "green"], typer.Option("--color", "-c")] = "red",
        sizes: Annotated[Optional[str], typer.Option("--sizes", autocompletion=completes(("s", "m"), comma_list=True))]
        = None,
    ) -> None: ...

    @group.command("hidden", hidden=True)
    def hidden() -> None: ...

    nodes = {node.path: node for node in command_tree(typer.main.get_command(app))}

    assert sorted(nodes) == ["", "group", "group leaf"]
    assert nodes["group"].subcommands == [("leaf", "Do a leaf")]
    options = {tuple(o.names): o for o in nodes["group leaf"].options}
    assert list(options) == [("--folder",), ("--maybe-file",), ("--count",), ("--fast", "--slow"), ("--color",),
                             ("--sizes",), ("--help",)]
    assert [o.is_path for o in options.values()] == [True, True, False, False, False, False, False]
    assert [o.takes_value for o in options.values()] == [True, True, True, False, True, True, False]
    assert options[("--count",)].help == "How many"
    assert options[("--maybe-file",)].help == "A file"
    # values: what `shell_complete` gives, from a Literal type or an `autocompletion=` callback
    assert (options[("--color",)].values, options[("--color",)].comma_list) == (["red", "green"], False)
    assert options[("--color",)].shorts == ["-c"]
    assert (options[("--sizes",)].values, options[("--sizes",)].comma_list) == (["s", "m"], True)
    assert [o.values for o in options.values() if o.names[0] not in ("--color", "--sizes")] == [[]] * 5
    assert nodes["group leaf"].arguments == ["x", "y"]  # a positional argument's values; `name` has none


def test_path_options_complete_file_names_and_others_do_not():
    bash = generate("bash", ROOT)
    file_case = next(line for line in bash.splitlines() if "compgen -f" in line)
    names = file_case.strip().split(")")[0].split("|")
    assert {"--local-dir", "--config", "--output-dir"} <= set(names)
    assert not {"--revision", "--model", "--include", "--rank"} & set(names)
    fish = generate("fish", ROOT)
    assert any("-l local-dir -r -F" in line for line in fish.splitlines())
    assert not any("-l revision -r -F" in line for line in fish.splitlines())


def test_completes_offers_values_and_the_last_item_of_a_list():
    assert completes(("adamw", "adam", "prodigy"))("ad") == ["adamw", "adam"]
    assert completes(lambda: ("on", "off"), comma_list=True)("on,o") == ["on,on", "on,off"]
    assert completes(("on", "off"), comma_list=True)("") == ["on", "off"]
    assert completes(("on", "off"))("on,") == []


# -- bash, for real: the script is sourced and its registered function called as bash calls it -----------


def _bash_complete(*lines: str) -> list[list[str]]:
    """COMPREPLY for each command line (the cursor at its end), as bash's programmable completion gets it.

    Sets COMP_WORDS, COMP_CWORD, COMP_LINE and COMP_POINT as bash does for the line, then calls the
    function `complete -p cogtune` names with the arguments bash passes (command, word, previous word).
    """
    script = generate("bash", ROOT)
    probe = [script, 'spec="$(complete -p cogtune)"', 'fn="${spec##*-F }"; fn="${fn%% *}"']
    for line in lines:
        words = shlex.split(line) + ([""] if line.endswith(" ") else [])
        probe += [
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}",
            f"COMP_LINE={shlex.quote(line)}; COMP_POINT={len(line)}; COMPREPLY=()",
            '"$fn" cogtune "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"',
            "printf '%s\\n' \"${COMPREPLY[@]}\" '<end>'",
        ]
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(probe)], capture_output=True, text=True,
                         check=True).stdout
    replies = out.split("<end>\n")[:-1]
    assert len(replies) == len(lines), out
    return [sorted(word for word in reply.splitlines() if word) for reply in replies]


def _field_choices(config_cls, name: str) -> tuple[str, ...]:
    """The choices declared on a config field: the oracle for what completes."""
    field = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return setting_choices(field, typing.get_type_hints(config_cls)[name])


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


@needs_bash
def test_bash_completes_option_values():
    optimizers = _field_choices(OptimizerConfig, "name")
    replies = _bash_complete(
        "cogtune train t2v --optimizer ad",
        "cogtune train i2v --data cache --optimizer ",
        "cogtune config accelerate --strategy ",
        "cogtune config accelerate -s zero3",
        "cogtune completion ",
        "cogtune bench memory --optimizer adamw,adamw-8",
        "cogtune bench memory --base-weights bf16,",
        "cogtune bench memory -m tiny,tiny-1",
    )
    assert replies[0] == sorted(name for name in optimizers if name.startswith("ad"))
    assert replies[0] and len(replies[0]) < len(optimizers)
    assert replies[1] == sorted(optimizers)
    assert replies[2] == sorted(STRATEGIES)
    assert replies[3] == sorted(name for name in STRATEGIES if name.startswith("zero3"))
    assert replies[4] == sorted(SHELLS)
    assert replies[5] == sorted(f"adamw,{name}" for name in optimizers if name.startswith("adamw-8"))
    assert replies[6] == ["bf16,bf16", "bf16,fp8", "bf16,int8", "bf16,nf4"]
    assert replies[7] == ["tiny,tiny-1.5", "tiny,tiny-1.5-i2v"]


@needs_bash
def test_bash_completed_shells_are_the_ones_the_command_takes(cli):
    (shells,) = _bash_complete("cogtune completion ")
    assert shells
    for shell in shells:
        assert cli("completion", shell).exit_code == 0


@needs_bash
def test_bash_still_completes_flags_at_a_flag_position():
    replies = _bash_complete(
        "cogtune train t2v --opt",
        "cogtune train t2v --optimizer adamw --lr-sch",
        "cogtune completion --",
        "cogtune config accelerate --strategy fsdp --mach",
        "cogtune tr",
    )
    assert replies == [["--optimizer"], ["--lr-schedule", "--lr-scheduler"], ["--help"],
                       ["--machine-rank", "--machines"], ["train"]]


def _settings_with_choices(comma_list: bool = False) -> list[tuple[str, str, tuple[str, ...]]]:
    """(command path, flag, choices) of every setting option with a closed set of values, from the configs:
    those that take one value, or with `comma_list` those that take a comma-separated list of them."""
    found = []

    def walk(command, path):
        for option in getattr(getattr(command, "callback", None), "settings", ()):
            choices = setting_choices(option.field, option.hint)
            if choices and option.comma_list == comma_list:
                found.append((path, option.flag, choices))
        for name, child in sorted((getattr(command, "commands", {}) or {}).items()):
            walk(child, f"{path} {name}".strip())

    walk(ROOT, "")
    return found


@needs_bash
def test_bash_completes_every_setting_with_choices():
    settings = _settings_with_choices()
    assert {"--optimizer", "--lr-schedule", "--scheduler", "--report-to", "--mixed-precision"} <= {
        flag for _, flag, _ in settings}
    replies = _bash_complete(*(f"cogtune {path} {flag} " for path, flag, _ in settings))
    for (path, flag, choices), reply in zip(settings, replies):
        assert reply == sorted(choices), f"cogtune {path} {flag}"
    lists = _settings_with_choices(comma_list=True)
    assert {"--method"} <= {flag for _, flag, _ in lists}
    replies = _bash_complete(*(f"cogtune {path} {flag} {choices[0]}," for path, flag, choices in lists))
    for (path, flag, choices), reply in zip(lists, replies):
        assert reply == sorted(f"{choices[0]},{choice}" for choice in choices), f"cogtune {path} {flag}"



@needs_bash
def test_bash_completes_the_items_of_a_comma_separated_setting():
    field = next(f for f in dataclasses.fields(LoraConfig) if f.name == "save_format")
    layouts = field.metadata["list_of"]
    replies = _bash_complete("cogtune train t2v --save-format ", "cogtune train i2v --save-format diffusers,ko")
    assert replies[0] == sorted(layouts)
    assert replies[1] == [f"diffusers,{name}" for name in layouts if name.startswith("ko")] == ["diffusers,kohya"]

# -- zsh and fish are not installed here: their scripts are checked line by line --------------------------


def _case_words(script: str, pattern: str) -> list[str]:
    """The words after `compadd --` / `_values -s , NAME` on the case line for `pattern` ('train t2v --optimizer')."""
    line = next(line for line in script.splitlines() if line.strip().startswith(f"'{pattern}'"))
    action = line.split(")", 1)[1].split(";")[0].split()
    return action[2:] if action[0] == "compadd" else action[4:]


def test_zsh_script_completes_values_for_the_right_command():
    zsh = generate("zsh", ROOT)
    optimizers = _field_choices(OptimizerConfig, "name")
    for path, flag, choices in _settings_with_choices():
        line = next(line for line in zsh.splitlines() if line.strip().startswith(f"'{path} {flag}'"))
        assert "compadd --" in line, line
        assert _case_words(zsh, f"{path} {flag}") == list(choices)
    assert _case_words(zsh, "config accelerate --strategy") == list(STRATEGIES)
    assert "'config accelerate -s'" in zsh
    for path, flag, choices in _settings_with_choices(comma_list=True):
        line = next(line for line in zsh.splitlines() if line.strip().startswith(f"'{path} {flag}'"))
        assert f"_values -s , '{flag[2:]}'" in line and _case_words(zsh, f"{path} {flag}") == list(choices)
    bench = next(line for line in zsh.splitlines() if line.strip().startswith("'bench memory --optimizer'"))
    assert "_values -s , 'optimizer'" in bench and _case_words(zsh, "bench memory --optimizer") == list(optimizers)
    assert not any(line.strip().startswith("'sample --optimizer'") for line in zsh.splitlines())
    completion = next(line for line in zsh.splitlines() if line.strip().startswith("'completion')"))
    assert f"values=({' '.join(SHELLS)})" in completion


def _fish_lines(fish: str, path: str) -> list[str]:
    return [line for line in fish.splitlines() if f'-n "__cogtune_at \'{path}\'"' in line]


def test_fish_script_completes_values_for_the_right_command():
    fish = generate("fish", ROOT)
    optimizers = _field_choices(OptimizerConfig, "name")
    # conditions are evaluated when completing, not when the script loads: no bare command substitution
    for line in fish.splitlines():
        if line.startswith("complete ") and " -n " in line:
            assert re.search(r"""-n "__cogtune_at '[^'"()]*'" """, line), line
    for path, flag, choices in _settings_with_choices():
        assert any(f"-l {flag[2:]} -x -a '{' '.join(choices)}'" in line for line in _fish_lines(fish, path)), flag
    for path, flag, choices in _settings_with_choices(comma_list=True):
        assert any(f"-l {flag[2:]} -x -a '(__cogtune_list {' '.join(choices)})'" in line
                   for line in _fish_lines(fish, path)), flag
    assert any(f"-l strategy -s s -x -a '{' '.join(STRATEGIES)}'" in line
               for line in _fish_lines(fish, "config accelerate"))
    assert any(f"-l optimizer -x -a '(__cogtune_list {' '.join(optimizers)})'" in line
               for line in _fish_lines(fish, "bench memory"))
    assert not any("-l optimizer" in line for line in _fish_lines(fish, "sample"))
    assert f"-a '{' '.join(SHELLS)}'" in "\n".join(_fish_lines(fish, "completion"))
