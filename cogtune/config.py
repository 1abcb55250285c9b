"""Typed, frozen run configurations merged from defaults, a TOML file and flags (flags win).

Each command's settings are a frozen dataclass (see `cogtune.train.config`, ...), and each setting
is declared once, as a field: `setting(default, "help", flag="--lr", low=0, low_open=True)` holds
its default, its help (written as a comment in the TOML beside every output), its command-line
flag and alias (`cogtune.cli.settings` builds the options from them) and its bounds or choices,
which `check_settings` enforces in the dataclass and the option's callback on the command line.
`load_config` checks every key and type before any weight is loaded; cross-field rules live in
each dataclass's `__post_init__` and raise `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from cogtune.errors import ConfigError
from cogtune.fsutil import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")

CONFIG_FILENAME = "config.toml"

MODEL_HELP = (
    "Preset (cogvideox-2b, cogvideox-5b, cogvideox-5b-i2v, cogvideox1.5-5b, cogvideox1.5-5b-i2v, or the offline "
    "tiny, tiny-i2v), Hub id, or local diffusers folder."
)


BASE_WEIGHTS = ("bf16", "fp8", "int8", "nf4")  # how a frozen transformer's Linear weights are stored (train, sample)
# Those a library quantizes (`cogtune.models.quantize`); fp8 is cogtune's own float8 storage Linear.
QUANTIZED_BASE_WEIGHTS = ("int8", "nf4")

SEED_MAX = 2**64 - 1  # torch's generators take seeds 0 .. 2^64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an integer setting may be where no bound is declared


def _shown(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a numeric setting must lie in: inclusive unless `low_open`/`high_open`; never NaN or inf.

    Integers must also fit in 64 bits (torch sizes and counts) where no wider bound is declared: `rank =
    10**23` in a TOML file is refused naming the setting, not deep inside torch.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused ('must be >= 1, got 0'), or None when it is fine."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        low, high = self.low, self.high
        if isinstance(value, int):
            low = INT64_MIN if low is None else low
            high = INT64_MAX if high is None else high
        if low is not None and (value <= low if self.low_open else value < low):
            return f"must be {'>' if self.low_open else '>='} {_shown(low)}, got {_shown(value)}"
        if high is not None and (value >= high if self.high_open else value > high):
            return f"must be {'<' if self.high_open else '<='} {_shown(high)}, got {_shown(value)}"
        return None


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    path: bool = False,
    choices: tuple[str, ...] | None = None,
    list_of: tuple[str, ...] | None = None,
    comma_list: bool = False,
    offers: tuple[str, ...] | None = None,
    shorthands: dict[str, Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A config field: its default and one-line help, and how the command line and checks see it.

    flag, short: the command-line option (`"--lr"`) and its alias (`"-r"`); fields without a flag
        are set in the TOML file only. Booleans also get `--no-...`.
    aliases: other long names accepted for the option (diffusers' training-script names such as
        `--learning-rate`), listed in `--help` with it.
    metavar: the value's name in `--help`; path: the value is a file or folder (shell completion).
    choices: the allowed strings (a `Literal` type gives them by itself).
    list_of: the value is a comma-separated list of these strings (`"diffusers,comfyui"`).
    comma_list: a tuple typed on the command line as one comma-separated value (`--rank 16,64`;
        booleans as `on,off`) rather than by repeating the option; a list in the TOML file.
    offers: values the shell completes for an open-ended setting (model presets: a Hub id works too).
    shorthands: flags that set the field to one value (`{"--fp8": "fp8"}`: `--fp8` means `--base-weights fp8`).
    low, high, low_open, high_open: numeric bounds (inclusive unless open); NaN and inf are refused.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for list defaults so that configs stay frozen")
    if flag is not None and not flag.startswith("--"):
        raise ValueError(f"flag {flag!r} must start with --")
    bounds = Bounds(low, high, low_open, high_open) if (low, high) != (None, None) else None
    if any(not alias.startswith("--") for alias in aliases) or (aliases and flag is None):
        raise ValueError(f"aliases {aliases!r} must be long options of a field with a flag")
    if comma_list and not isinstance(default, tuple):
        raise TypeError("a comma_list setting is a tuple")
    metadata = {"help": help, "flag": flag, "short": short, "aliases": tuple(aliases), "metavar": metavar,
                "path": path, "choices": choices, "list_of": list_of, "comma_list": comma_list, "offers": offers,
                "shorthands": types.MappingProxyType(dict(shorthands or {})),
                "bounds": bounds}
    return dataclasses.field(default=default, metadata=metadata)


def setting_choices(field: dataclasses.Field, hint: Any) -> tuple[str, ...] | None:
    """The strings a field accepts: its declared `choices`, or the values of its `Literal` type."""
    if field.metadata.get("choices"):
        return tuple(field.metadata["choices"])
    hint = strip_optional(hint)
    return tuple(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else None


def strip_optional(hint: Any) -> Any:
    """`T` of `T | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, worked out once per class (read only): the annotations are strings
    (`from __future__ import annotations`), and every config object's `check_settings` asks for them."""
    return typing.get_type_hints(cls)


def check_settings(config: Any, prefix: str = "") -> None:
    """Raise ConfigError, naming `prefix + field`, for a value outside its declared bounds or choices.

    A tuple's items are checked one by one. Each config dataclass calls this first in
    `__post_init__`; the command line checks the same declarations in the options' callbacks,
    so the two cannot drift apart.
    """
    hints = field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            problem = _setting_problem(field, hints[field.name], item)
            if problem:
                raise ConfigError(f"{prefix}{field.name} {problem}")


def _setting_problem(field: dataclasses.Field, hint: Any, value: Any) -> str | None:
    """Why one value of `field` is refused, or None."""
    bounds = field.metadata.get("bounds")
    if bounds is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = Bounds()  # every number must at least be finite, every integer fit in 64 bits
    problem = bounds.problem(value) if bounds is not None else None
    if problem:
        return problem
    choices = setting_choices(field, hint)
    if choices is not None and value not in choices:
        return f"'{value}' is not one of {', '.join(choices)}"
    allowed = field.metadata.get("list_of")
    unknown = [item for item in list_items(value) if item not in allowed] if allowed else []
    if unknown:
        return f"'{unknown[0]}' is not one of {', '.join(allowed)}"
    return None


def list_items(value: str) -> tuple[str, ...]:
    """The items of a comma-separated setting (`list_of`), blanks dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def require(config: Any, *names: str) -> None:
    """Raise ConfigError for the first of `names` left empty, saying how to give it."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name in names:
        if not getattr(config, name):
            flag = fields[name].metadata.get("flag")
            how = f"{flag}, or `{name} = ...` in the --config file" if flag else f"`{name} = ...` in the config file"
            raise ConfigError(f"{name} is required ({how})")


def section(cls: type, help: str) -> Any:
    """A nested group of settings (a TOML table)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a TOML config file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # tomllib reads bytes and decodes them itself: a binary file
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from its defaults, then the TOML file at `path`, then `overrides`.

    `overrides` maps dotted field paths (`"lora.rank"`) to values; `None` values mean "not given"
    and are skipped, so that command-line flags left at their default never shadow the file. Every
    key must name a setting, even with a None value: a stale key fails on every run, not just when given.
    """
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    _check_keys(cls, data, source, prefix="")
    for dotted, value in (overrides or {}).items():
        _set_dotted(cls, data, dotted, value)
    return _build(cls, data, source, prefix="")


def _check_keys(cls: type, data: Mapping[str, Any], source: str, prefix: str) -> None:
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown setting '{prefix}{key}'{suggestion}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{prefix}{key}' must be a table ([{prefix}{key}])")
            _check_keys(hints[key], value, source, prefix=f"{prefix}{key}.")


def _set_dotted(cls: type, data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the setting `dotted` in `data`; with `value` None only check that the setting exists."""
    *sections, name = dotted.split(".")
    current = cls
    for part in sections:
        hints = field_types(current)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"unknown setting '{dotted}'")
        current = hints[part]
    if name not in {f.name for f in dataclasses.fields(current)}:
        raise ConfigError(f"unknown setting '{dotted}'")
    if value is None:
        return
    target = data
    for part in sections:
        target = target.setdefault(part, {})
    target[name] = value


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str) -> T:
    hints = field_types(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        where = f"{source}: {prefix}{field.name}"
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            kwargs[field.name] = _build(hint, data[field.name], source, prefix=f"{prefix}{field.name}.")
        else:
            kwargs[field.name] = _coerce(data[field.name], hint, where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}", exc.hint) from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(value, candidate, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(item, item_type, where) for item in value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML writes nan and inf; no setting means them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def replace_settings(config: T, changes: Mapping[str, Any]) -> T:
    """`config` with dotted settings changed (`{"memory.base_weights": "nf4"}`), every rule checked again.

    A combination the config's own rules refuse raises `ConfigError`, so callers that explore
    variations (the bench grid, the memory ladder) state no rules of their own.
    """
    grouped: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, nested in grouped.items():
        direct[head] = replace_settings(getattr(config, head), nested)
    return dataclasses.replace(config, **direct)  # type: ignore[type-var]


def flatten_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"lora.rank": 64, ...}`: every setting of a config by its dotted name."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten_settings(value, f"{prefix}{field.name}."))
        else:
            flat[f"{prefix}{field.name}"] = value
    return flat


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (lists for tuples, `None` fields left out) of a config dataclass."""
    result: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            result[field.name] = config_to_dict(value)
        elif value is None:
            continue
        elif isinstance(value, tuple):
            result[field.name] = list(value)
        else:
            result[field.name] = value
    return result


def dump_toml(data: Mapping[str, Any], config_cls: type | None = None) -> str:
    """Serialize a nested dict of scalars and lists as TOML, with help comments when `config_cls` is given."""
    lines: list[str] = []
    _dump_table(data, config_cls, [], lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(data: Mapping[str, Any], cls: type | None, path: list[str], lines: list[str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    hints = field_types(cls) if cls is not None else {}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if path:
        lines.append("")
        lines.append(f"[{'.'.join(path)}]")
    for key, value in data.items():
        if key in tables:
            continue
        help_text = fields[key].metadata.get("help") if key in fields else None
        if help_text:
            lines.append(f"# {help_text}")
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        sub_cls = hints.get(key) if dataclasses.is_dataclass(hints.get(key)) else None
        _dump_table(value, sub_cls, [*path, _toml_key(key)], lines)


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(config: Any, directory: str | Path, filename: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config as TOML beside an output (atomically) and return its path."""
    path = Path(directory) / filename
    atomic_write_text(path, dump_toml(config_to_dict(config), type(config)))
    return path
