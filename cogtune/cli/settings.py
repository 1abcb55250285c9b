"""Command-line options made from config fields: each setting is declared once, in its dataclass.

A field declared as `setting(None, "Peak learning rate.", flag="--lr", low=0, low_open=True)`
becomes the option `--lr`: its help, the default it shows, its short alias, the value's name and
its checks all come from the field (find where a flag is declared with
`grep -rn 'flag="--lr"' cogtune`). The option's own default is None, "not given", so that a value
from the `--config` file is never shadowed; a boolean is `--x/--no-x`, so that `true` in the file
can be switched off on the command line. A tuple is a repeatable option, or with `comma_list=True`
one comma-separated value (`--rank 16,64`; booleans `--offload-activations on,off`), read and checked item by item
before the command runs (a one-line error, exit 1).

`@settings_options(TrainConfig)` puts one option per flagged field (sections included) where the
command declares its `overrides` parameter, and calls the command with `overrides`: each option's
dotted field path (`"optimizer.lr"`) and value, None when not typed, ready for `load_config`.
Typer reads the command's parameters from `inspect.signature`, which the decorator sets.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import keyword
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cogtune.cli.options import choice, completes, number
from cogtune.config import Bounds, field_types, list_items, setting_choices, strip_optional
from cogtune.errors import ConfigError

Overrides = dict[str, Any]
"""What a command decorated with `settings_options` receives: dotted field path -> value or None."""

_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}
_ON_OFF = ("on", "off")  # the words `--help` and completion use for a boolean's items
_TRUE_WORDS, _FALSE_WORDS = ("on", "true", "yes"), ("off", "false", "no")


@dataclasses.dataclass(frozen=True)
class SettingOption:
    """One command-line option and the config field it sets."""

    path: str  # the field's dotted path in the config: "optimizer.lr"
    field: dataclasses.Field
    hint: Any  # the field's type, without `| None`

    @property
    def flag(self) -> str:
        return self.field.metadata["flag"]

    @property
    def param(self) -> str:
        """The command's parameter name: the flag in snake case (`--lr-schedule` -> `lr_schedule`)."""
        name = self.flag[2:].replace("-", "_")
        return f"{name}_" if keyword.iskeyword(name) else name

    @property
    def comma_list(self) -> bool:
        """Typed as one comma-separated value (`--rank 16,64`, `--offload-activations on,off`): a tuple in the config."""
        return bool(self.field.metadata.get("comma_list"))

    @property
    def repeatable(self) -> bool:
        return typing.get_origin(self.hint) is tuple and not self.comma_list

    @property
    def item_type(self) -> type:
        """The type of one value (a tuple's item; a Literal's strings are `str`)."""
        base = typing.get_args(self.hint)[0] if typing.get_origin(self.hint) is tuple else self.hint
        if typing.get_origin(base) is typing.Literal:
            base = type(typing.get_args(base)[0])
        if base is str and self.field.metadata.get("path"):
            return Path
        return base

    @property
    def value_type(self) -> type:
        """The type of what follows the flag on the command line: one value, or a comma list's text."""
        return str if self.comma_list else self.item_type

    @property
    def names(self) -> list[str]:
        """`--x/--no-x` for a boolean, else the flag; then the short alias."""
        short = self.field.metadata.get("short")
        aliases = list(self.field.metadata.get("aliases", ()))
        if self.value_type is bool:
            if short or aliases:
                raise TypeError(f"{self.path}: a boolean setting takes no aliases")
            return [f"{self.flag}/--no-{self.flag[2:]}"]
        return [self.flag, *aliases, *([short] if short else [])]

    def shown_default(self) -> str | None:
        """The field's default as `--help` shows it; None when the field's help explains it instead."""
        default = self.field.default
        if default is None or default == "" or default == ():
            return None
        if isinstance(default, bool):
            return "on" if default else "off"
        if isinstance(default, tuple):
            return ", ".join(str(item) for item in default)
        if isinstance(default, float):
            return f"{default:g}"
        return str(default)

    def help(self) -> str:
        text = self.field.metadata["help"]
        if self.repeatable:
            text += " Repeatable."
        elif self.comma_list:
            text += " Comma-separated."
        shown = self.shown_default()
        return f"{text} [default: {shown}]" if shown is not None else text

    def annotation(self) -> Any:
        """`Annotated[Optional[T], typer.Option(...)]`, the parameter Typer turns into this option."""
        value_type = self.value_type
        metavar = self.field.metadata.get("metavar")
        callback = None
        choices = setting_choices(self.field, self.hint)
        bounds = self.field.metadata.get("bounds") or (Bounds() if value_type in (int, float) else None)
        if self.comma_list:  # its items are checked as the list is read (`config_value`)
            item = "|".join(_ON_OFF) if self.item_type is bool else "|".join(choices) if choices else None
            metavar = f"{metavar or item or _METAVARS[self.item_type]},..."
        elif choices is not None:
            callback = choice(choices)
            metavar = metavar or "|".join(choices)
        elif bounds is not None:
            callback = number(bounds.low, bounds.high, bounds.low_open, bounds.high_open)
        if value_type is bool:
            metavar = None
        else:
            metavar = metavar or _METAVARS[value_type]
        option = typer.Option(*self.names, help=self.help(), metavar=metavar, callback=callback, show_default=False,
                              autocompletion=self.completion(choices))
        python_type = list[value_type] if self.repeatable else value_type
        return Annotated[Optional[python_type], option]

    def completion(self, choices: tuple[str, ...] | None) -> Any:
        """What the shell offers for the value: the choices or the values the field offers (for a comma
        list, for the item after the last comma), or the items of a `list_of` setting."""
        offered = choices or self.field.metadata.get("offers")
        if self.comma_list:
            offered = offered or (_ON_OFF if self.item_type is bool else None)
            return completes(offered, comma_list=True) if offered else None
        if offered:
            return completes(offered)
        items = self.field.metadata.get("list_of")
        return completes(items, comma_list=True) if items else None

    def shorthand_parameters(self) -> list[tuple[str, str, Any, Any]]:
        """For each shorthand flag (`--fp8` for `--base-weights fp8`): the command's parameter name, the flag,
        the value it stands for, and the `Annotated` flag option Typer turns it into."""
        parameters = []
        for flag, value in self.field.metadata.get("shorthands", {}).items():
            option = typer.Option(flag, help=f"Same as {self.flag} {value}.", show_default=False)
            parameters.append((flag[2:].replace("-", "_"), flag, value, Annotated[bool, option]))
        return parameters

    def with_shorthands(self, value: Any, given: dict[str, bool]) -> Any:
        """The value typed, or the one a shorthand flag stands for; both, disagreeing: a one-line error."""
        for _, flag, meant, _ in self.shorthand_parameters():
            if not given.get(flag):
                continue
            if value is not None and value != meant:
                raise ConfigError(f"{flag} means {self.flag} {meant}; it contradicts {self.flag} {value}")
            value = meant
        return value

    def config_value(self, value: Any) -> Any:
        """The config's value for what was typed: tuples for repeated options and comma lists, strings for paths."""
        if value is None:
            return None
        if self.comma_list:
            return tuple(self._list_item(item) for item in list_items(value)) or None
        if self.repeatable:
            return tuple(str(item) for item in value) or None
        return str(value) if isinstance(value, Path) else value

    def _list_item(self, text: str) -> Any:
        """One item of a comma list (`16`, `on`), checked against the field's choices and bounds."""
        kind = self.item_type
        if kind is bool:
            if text.lower() not in _TRUE_WORDS + _FALSE_WORDS:
                raise ConfigError(f"{self.flag}: '{text}' is not on or off")
            return text.lower() in _TRUE_WORDS
        try:
            value = kind(text)
        except ValueError as exc:
            raise ConfigError(f"{self.flag}: '{text}' is not a {kind.__name__}") from exc
        choices = setting_choices(self.field, self.hint)
        bounds = self.field.metadata.get("bounds") or (Bounds() if kind is float else None)
        problem = bounds.problem(value) if bounds is not None else None
        if choices is not None and value not in choices:
            problem = f"'{value}' is not one of {', '.join(choices)}"
        if problem:
            raise ConfigError(f"{self.flag}: {problem}")
        return value


def setting_options(config_cls: type, exclude: Iterable[str] = ()) -> list[SettingOption]:
    """The options of every field of `config_cls` (and its sections) declared with a flag, in field order."""
    options: list[SettingOption] = []

    def walk(cls: type, prefix: str) -> None:
        hints = field_types(cls)
        for field in dataclasses.fields(cls):
            path = f"{prefix}{field.name}"
            hint = hints[field.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{path}.")
            elif field.metadata.get("flag"):
                options.append(SettingOption(path, field, strip_optional(hint)))

    walk(config_cls, "")
    excluded = set(exclude)
    unknown = excluded - {o.path for o in options}
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no flagged settings {sorted(unknown)}")
    return [o for o in options if o.path not in excluded]


def settings_options(config_cls: type, exclude: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Decorate a command: the options of `config_cls`'s flagged fields take the place of its
    `overrides` parameter, and it is called with `overrides` (dotted path -> value or None).

    `exclude` leaves out fields by dotted path (a command that takes one of them as an argument).
    """
    options = setting_options(config_cls, exclude)

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        if "overrides" not in signature.parameters:
            raise TypeError(f"{command.__name__} needs an `overrides` parameter for the settings' options")
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name == "overrides":
                parameters += [inspect.Parameter(o.param, keyword_only, default=None, annotation=o.annotation())
                               for o in options]
                parameters += [inspect.Parameter(name, keyword_only, default=False, annotation=annotation)
                               for o in options for name, _, _, annotation in o.shorthand_parameters()]
            else:
                parameters.append(parameter.replace(kind=keyword_only))
        names = [p.name for p in parameters]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:
            raise TypeError(f"{command.__name__}: parameters {clashes} are declared twice")

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            overrides = {}
            for o in options:
                given = {flag: values.pop(name) for name, flag, _, _ in o.shorthand_parameters()}
                overrides[o.path] = o.with_shorthands(o.config_value(values.pop(o.param)), given)
            return command(**values, overrides=overrides)

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        run.settings = tuple(options)  # type: ignore[attr-defined]  # for tests and tools
        return run

    return decorate
