"""Each setting is declared once, in its config field; the command line is made from it.

Oracles: the config the real CLI builds (the engine replaced by a recorder) and the click options
Typer made, against the dataclass fields, for every flag: the flag sets its field, a flag not typed
leaves the TOML file's value alone, the default shown is the field's, and at 80 columns `--help`
shows every option's full name.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import typer

from cogtune.cli.settings import SettingOption, setting_options
from cogtune.config import dump_toml, setting_choices
from cogtune.data.dataset import DatasetConfig
from cogtune.encode.config import EncodeConfig
from cogtune.sample_config import SampleConfig
from cogtune.train.config import TrainConfig

# command, its config, the fields it takes otherwise (an argument) or not at all, the required arguments
COMMANDS = {
    "train t2v": (TrainConfig, (), {"model": "tiny", "data": "cache", "output_dir": "run"}),
    "train i2v": (TrainConfig, (), {"model": "tiny-i2v", "data": "cache", "output_dir": "run"}),
    "encode": (EncodeConfig, (), {"model": "tiny", "data.root": "data", "output_dir": "cache"}),
    "sample": (SampleConfig, (), {"model": "tiny", "prompts": ("a prompt",), "output": "out.mp4"}),
    "dataset validate": (DatasetConfig, ("root", "resize_mode"), {"root": "data"}),
}
# settings that need another one to be valid
COMPANIONS = {"validation.images": {"validation.prompts": ("one", "two")},
              "evaluation.keep_best": {"evaluation.split": 0.25}, "compare_base": {"lora": "lora.safetensors"},
              "frame_stride": {"frame_extraction": "slide"}, "data.frame_stride": {"data.frame_extraction": "slide"}}
NOT_FOR = {("train t2v", "validation.images"),  # condition images are for i2v (tested there)
           ("encode", "dataset_config")}  # excludes --data-root (tests/encode/test_dataset_config.py)


def _click_tree():
    from cogtune.cli.app import app

    root = typer.main.get_command(app)
    stack, commands = [((), root)], {}
    while stack:
        path, command = stack.pop()
        commands[" ".join(path)] = command
        for name, child in getattr(command, "commands", {}).items():
            stack.append(((*path, name), child))
    return commands


def _get(config, path):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _nested(values: dict) -> dict:
    tree: dict = {}
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return tree


def _other_value(option: SettingOption):
    """A valid value of the option's field that differs from the field's default."""
    default = option.field.default
    choices = setting_choices(option.field, option.hint)
    if choices:
        return next(c for c in choices if c != default)
    if option.value_type is bool:
        return not default
    if option.path.endswith("buckets"):
        return ("9x64x64",)
    if option.repeatable:
        return ("first", "second")
    if option.path.endswith("dataset_file"):
        return "table.csv"
    if option.path.endswith("caption_extension"):
        return ".caption"
    if option.path.endswith("save_format"):
        return "diffusers,comfyui"
    if option.value_type is int:
        return (default or 0) + 2
    if option.value_type is float:
        bounds = option.field.metadata.get("bounds")
        return 0.5 if bounds is not None and bounds.high is not None else (default or 0) + 0.5
    return f"{option.param}-value"


def _args(option: SettingOption, value) -> list[str]:
    if option.value_type is bool:
        return [option.flag if value else f"--no-{option.flag[2:]}"]
    if option.repeatable:
        return [arg for item in value for arg in (option.flag, str(item))]
    return [option.flag, str(value)]


def _command_args(command: str, values: dict) -> list[str]:
    config_cls, _, _ = COMMANDS[command]
    options = {o.path: o for o in setting_options(config_cls)}
    args = command.split()
    for path, value in values.items():
        if path == "root" and command == "dataset validate":
            args.append(value)
        else:
            args += _args(options[path], value)
    return args


@pytest.fixture
def recorded(monkeypatch):
    """Replace each engine entry point by a recorder of the config it is given."""
    import cogtune.data.validate
    import cogtune.encode
    import cogtune.sample
    import cogtune.train

    configs = []

    class Valid:
        ok, items, errors, warnings = True, 0, [], []

    def record(config, *args, **kwargs):
        configs.append(config)
        return []

    monkeypatch.setattr(cogtune.train, "run_training", record)
    monkeypatch.setattr(cogtune.encode, "encode_dataset", record)
    monkeypatch.setattr(cogtune.sample, "run_sample", record)
    monkeypatch.setattr(cogtune.data.validate, "validate_dataset", lambda config, **kw: record(config) or Valid())
    monkeypatch.setattr(cogtune.data.validate, "print_report", lambda *a, **k: None)
    return configs


def _cases():
    for command, (config_cls, exclude, _) in COMMANDS.items():
        for option in setting_options(config_cls, exclude):
            if (command, option.path) in NOT_FOR:
                continue
            yield pytest.param(command, option, id=f"{command} {option.flag}")


@pytest.mark.parametrize("command, option", _cases())
def test_each_flag_sets_its_field_and_a_file_value_survives_when_it_is_not_typed(command, option, cli, recorded,
                                                                                 tmp_path):
    _, _, required = COMMANDS[command]
    value = _other_value(option)
    given = {**required, **COMPANIONS.get(option.path, {}), option.path: value}

    result = cli(*_command_args(command, given))
    assert result.exit_code == 0, result.stderr
    assert _get(recorded[-1], option.path) == value

    if command == "dataset validate":
        return  # validate takes no --config file
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(_nested({k: v for k, v in given.items() if k != "root"})))
    result = cli(*command.split(), "--config", path)
    assert result.exit_code == 0, result.stderr
    assert _get(recorded[-1], option.path) == value  # not shadowed by the option's "not given"

    if option.field.default not in (None, "", ()):  # the flag wins over the file
        result = cli(*command.split(), "--config", path, *_args(option, option.field.default))
        assert result.exit_code == 0, result.stderr
        assert _get(recorded[-1], option.path) == option.field.default


def _shown(option: SettingOption) -> str | None:
    """The field's default as a user reads it in `--help`."""
    default = option.field.default
    if default in (None, "", ()):
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ", ".join(default)
    return format(default, "g") if isinstance(default, float) else str(default)


@pytest.mark.parametrize("command", COMMANDS)
def test_options_are_the_config_fields_with_their_defaults(command):
    """Every option maps to a field; each shows the field's default and is itself 'not given' (None)."""
    config_cls, exclude, _ = COMMANDS[command]
    params = {p.name: p for p in _click_tree()[command].params}
    options = setting_options(config_cls, exclude)
    for option in options:
        param = params[option.param]
        assert option.flag in param.opts
        if option.field.metadata.get("short"):
            assert option.field.metadata["short"] in param.opts
        if option.value_type is bool:
            assert param.secondary_opts == [f"--no-{option.flag[2:]}"]
        assert param.default is None
        shown = _shown(option)
        assert param.help.startswith(option.field.metadata["help"])
        if shown is None:
            assert "[default:" not in param.help
        else:
            assert param.help.endswith(f"[default: {shown}]")
    # and every field path an option sets exists in the config
    for option in options:
        cls = config_cls
        *sections, name = option.path.split(".")
        for section in sections:
            cls = typing.get_type_hints(cls)[section]
        assert name in {f.name for f in dataclasses.fields(cls)}


def test_bounds_are_declared_once_for_the_option_and_the_dataclass(cli):
    """The same declaration refuses a value on the command line (exit 2) and in Python (ConfigError)."""
    from cogtune.errors import ConfigError
    from cogtune.train.config import LoraConfig

    result = cli("train", "t2v", "--model", "tiny", "--data", "c", "--output-dir", "o", "--rank", "0")
    assert result.exit_code == 2 and "Invalid value for '--rank' / '-r': must be >= 1, got 0" in result.stderr
    with pytest.raises(ConfigError, match="lora.rank must be >= 1, got 0"):
        LoraConfig(rank=0)
    result = cli("train", "t2v", "--model", "tiny", "--data", "c", "--output-dir", "o", "--optimizer", "sgd")
    assert result.exit_code == 2 and "'sgd' is not one of adamw" in result.stderr


def _help_commands():
    return [path for path, command in _click_tree().items() if path]


@pytest.mark.parametrize("command", _help_commands())
def test_help_at_80_columns_shows_every_option_in_full(command, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    click_command = _click_tree()[command]
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0
    options_part = result.stdout.split("Examples:")[0]
    for param in click_command.params:
        if getattr(param, "hidden", False) or param.param_type_name != "option":
            continue
        for name in [*param.opts, *param.secondary_opts]:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", options_part), (command, name)
    assert max(len(line) for line in options_part.splitlines()) <= 80


def test_bench_memory_accepts_random_weights(cli):
    """The contract lists --random-weights for sizing; bench always uses random weights, so it is accepted."""
    result = cli("bench", "memory", "--random-weights", "--gpu-memory", "nan")
    assert result.exit_code == 2 and "Invalid value for '--gpu-memory'" in result.stderr  # parsed past the flag


def test_bench_memory_without_options_is_the_default_bench_config(cli, monkeypatch):
    """`load_config` checks every override key, even those not given, so one run with no options proves
    that every key the command passes (its own `shapes` and `mode` too) is a bench setting."""
    import cogtune.bench.run

    configs = []
    monkeypatch.setattr(cogtune.bench.run, "run_bench", lambda config, **kwargs: configs.append(config))
    result = cli("bench", "memory")
    assert result.exit_code == 0, result.stderr
    assert configs == [cogtune.bench.run.BenchConfig()]


def _bench_options():
    from cogtune.bench.config import BenchConfig

    return setting_options(BenchConfig)


# a value for each of bench memory's options, as typed, and the field value it gives
_BENCH_VALUES = {
    "models": ("tiny,tiny-i2v", ("tiny", "tiny-i2v")), "methods": ("lora, full", ("lora", "full")),
    "ranks": ("16,64", (16, 64)), "gradient_checkpointing": ("on,off", (True, False)),
    "optimizers": ("adamw,adamw-8bit", ("adamw", "adamw-8bit")), "batch_sizes": ("1,2", (1, 2)),
    "shapes": ("9x64x64,17x64x96", ("9x64x64", "17x64x96")), "base_weights": ("bf16,nf4", ("bf16", "nf4")),
    "offload_blocks": ("off", (False,)), "offload_activations": ("ON,yes", (True, True)), "fsdp_gpus": ("8", 8),
    "validation": (False, False), "gpu_memory": ("24", 24.0), "host_memory": ("64.5", 64.5), "gpu": ("A100", "A100"),
    "steps": ("3", 3), "breakdown": (True, True), "cache": (False, False), "run_config": ("run.toml", "run.toml"),
    "data": ("cache", "cache"),
}


@pytest.fixture
def benched(monkeypatch):
    import cogtune.bench.run

    configs = []
    monkeypatch.setattr(cogtune.bench.run, "run_bench", lambda config, **kwargs: configs.append(config))
    return configs


def test_every_bench_field_with_a_flag_has_a_value_here():
    assert {o.path for o in _bench_options()} == set(_BENCH_VALUES)


@pytest.mark.parametrize("option", _bench_options(), ids=lambda option: option.flag)
def test_each_bench_flag_sets_its_field(option, cli, benched, monkeypatch, tmp_path):
    """bench memory's options are BenchConfig's fields: each sets its own (a comma list, a tuple), and its
    help is the field's."""
    from cogtune.bench.config import BenchConfig

    monkeypatch.chdir(tmp_path)
    typed, expected = _BENCH_VALUES[option.path]
    if isinstance(typed, bool):
        args = [option.flag if typed else f"--no-{option.flag[2:]}"]
    else:
        args = [option.flag, typed]
    result = cli("bench", "memory", *args)
    assert result.exit_code == 0, result.stderr
    assert benched == [dataclasses.replace(BenchConfig(), **{option.path: expected})]
    param = next(p for p in _click_tree()["bench memory"].params if p.name == option.param)
    assert param.help.startswith(option.field.metadata["help"]) and param.default is None
    if option.comma_list:
        assert param.metavar.endswith(",...") and "Comma-separated." in param.help


def test_bench_short_aliases_and_modes(cli, benched):
    from cogtune.bench.config import BenchConfig

    result = cli("bench", "memory", "-m", "tiny", "-d", "cache", "--measure", "-F", "9", "-H", "64", "-W", "96")
    assert result.exit_code == 0, result.stderr
    assert benched == [BenchConfig(models=("tiny",), data="cache", mode="measure", shapes=("9x64x96",))]


@pytest.mark.parametrize(("args", "message"), [
    (("--method", "lora,fulll"), "--method: 'fulll' is not one of lora, full"),
    (("--batch-size", "1,two"), "--batch-size: 'two' is not a int"),
    (("--shape", "9x64"), "bucket '9x64' is not FRAMESxHEIGHTxWIDTH"),
    (("--shape", "9x64x64", "-F", "9"), "--shape and --frames/--height/--width exclude each other"),
    (("-F", "9",), "--frames, --height and --width go together"),
])
def test_bench_list_errors_are_one_line_errors(cli, benched, args, message):
    result = cli("bench", "memory", *args)
    assert result.exit_code == 1 and message in result.stderr and not benched


def test_bench_bounds_are_declared_once_for_the_option_and_the_dataclass(cli, benched):
    """As for every setting: the field's bounds refuse a value on the command line (exit 2) and in Python."""
    from cogtune.bench.config import BenchConfig
    from cogtune.errors import ConfigError

    for flag, value, problem in [("--steps", "1", "must be >= 2, got 1"), ("--gpu-memory", "0", "must be > 0, got 0"),
                                 ("--host-memory", "inf", "must be a finite number")]:
        result = cli("bench", "memory", flag, value)
        assert result.exit_code == 2 and f"Invalid value for '{flag}': {problem}" in result.stderr
    with pytest.raises(ConfigError, match="steps must be >= 2, got 1"):
        BenchConfig(steps=1)
    with pytest.raises(ConfigError, match="host_memory must be > 0, got -1"):
        BenchConfig(host_memory=-1.0)
    with pytest.raises(ConfigError, match="methods 'fulll' is not one of lora, full"):
        BenchConfig(methods=("lora", "fulll"))
    assert not benched


@pytest.mark.parametrize(("alias", "value", "path", "expected"), [
    ("--learning-rate", "3e-4", "optimizer.lr", 3e-4),
    ("--max-train-steps", "7", "steps", 7),
    ("--checkpointing-steps", "50", "checkpointing.every", 50),
    ("--train-batch-size", "2", "batch_size", 2),
    ("--gradient-accumulation-steps", "4", "gradient_accumulation", 4),
    ("--lr-scheduler", "cosine", "optimizer.lr_schedule", "cosine"),
    ("--adam-weight-decay", "0.01", "optimizer.weight_decay", 0.01),
])
def test_diffusers_script_names_are_aliases(cli, recorded, tmp_path, alias, value, path, expected):
    """The names of diffusers' CogVideoX training scripts mean the same here."""
    result = cli("train", "t2v", "--model", "tiny", "--data", tmp_path, "--output-dir", tmp_path / "o", alias, value)
    assert result.exit_code == 0, result.stderr
    assert _get(recorded[-1], path) == expected
