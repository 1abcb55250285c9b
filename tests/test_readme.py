"""Every `cogtune ...` command in the README's shell blocks runs through the real CLI parser.

The engine functions are replaced by recorders, so each command is parsed and its config built
and checked exactly as for a user, without doing the work.
"""

from __future__ import annotations

import shlex
from types import SimpleNamespace
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _shell_blocks() -> list[str]:
    blocks, current, language = [], None, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                language, current = line[3:].strip(), []
            else:
                if language in ("bash", "sh", ""):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _commands() -> list[str]:
    commands = []
    for block in _shell_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].split(" > ")[0].strip()  # comments and redirections are the shell's
            if line.startswith("cogtune "):
                commands.append(line)
            elif " -m cogtune " in line:
                commands.append("cogtune " + line.split(" -m cogtune ", 1)[1])
    return [c for c in commands if not any(token in c for token in ("MODEL", "CACHE", "OUT", "[", "..."))]


def test_the_readme_has_runnable_commands():
    commands = _commands()
    assert len(commands) >= 8
    for name in ("dataset download", "dataset validate", "encode", "train t2v", "train i2v", "sample", "demo"):
        assert any(c.startswith(f"cogtune {name}") for c in commands), name


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command, cli, monkeypatch, tmp_path):
    import cogtune.accelerate_config
    import cogtune.bench.run
    import cogtune.data.download
    import cogtune.data.validate
    import cogtune.demo
    import cogtune.data.prepare
    import cogtune.encode
    import cogtune.encode.preview
    import cogtune.lora.layouts
    import cogtune.lora.strength
    import cogtune.lora.merge
    import cogtune.sample
    import cogtune.train

    calls = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            return []

        return record

    class Valid:
        ok, items, errors, warnings = True, 0, [], []

    monkeypatch.setattr(cogtune.train, "run_training", recorder("train"))
    monkeypatch.setattr(cogtune.encode, "encode_dataset", recorder("encode"))
    monkeypatch.setattr(cogtune.sample, "run_sample", recorder("sample"))
    monkeypatch.setattr(cogtune.demo, "run_demo", recorder("demo"))
    monkeypatch.setattr(cogtune.data.download, "download_dataset", recorder("download"))
    monkeypatch.setattr(cogtune.data.validate, "validate_dataset", lambda *a, **k: calls.append("validate") or Valid())
    monkeypatch.setattr(cogtune.data.validate, "print_report", lambda *a, **k: None)
    monkeypatch.setattr(cogtune.data.validate, "validate_dataset_config",
                        lambda *a, **k: calls.append("validate") or [])
    monkeypatch.setattr(cogtune.accelerate_config, "accelerate_config_yaml", lambda *a, **k: calls.append("config") or "")
    monkeypatch.setattr(cogtune.bench.run, "run_bench", recorder("bench"))
    monkeypatch.setattr(cogtune.data.prepare, "prepare_dataset", recorder("prepare"))
    monkeypatch.setattr(cogtune.encode.preview, "preview_cache", recorder("preview"))
    inspected = {"file": "f", "layout": "diffusers", "model": "tiny", "family": "1.0-sincos", "fits": [], "layers": 1,
                 "alpha_form_text": "metadata", "alpha_portable": True, "loads_in": "diffusers", "target_modules": [],
                 "buckets": [], "ranks_alphas": [], "cogtune": {}}
    monkeypatch.setattr(cogtune.lora.layouts, "inspect_lora", lambda *a, **k: calls.append("inspect") or inspected)
    monkeypatch.setattr(cogtune.lora.strength, "inspect_updates",
                        lambda *a, **k: {"base": None, "base_note": "none", "all_b_zero": False, "layers": []})
    monkeypatch.setattr(cogtune.lora.layouts, "convert_lora",
                        lambda *a, **k: calls.append("convert") or SimpleNamespace(layers=[], layout="diffusers"))
    monkeypatch.setattr(cogtune.lora.merge, "merge_lora", recorder("lora merge"))
    (tmp_path / "run.toml").write_text('model = "tiny"\ndata = "cache"\noutput_dir = "out"\n')
    monkeypatch.chdir(tmp_path)
    result = cli(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.stderr
    assert calls, "the command did not reach the engine"
