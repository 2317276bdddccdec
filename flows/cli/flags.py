"""Command-line flags generated from the pydantic stage configs, so defaults, help and choices live in one place.

Each field becomes `--field-name` (a `Fields` can rename a few, e.g. `--workers` for
`scaling.num_workers`); its description plus `(default: X)` is the help, a `Literal` gives the choices.
Every flag defaults to `argparse.SUPPRESS`: only what the user typed reaches the config, which
holds the only default. Config classes are passed in, never imported here, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from ray_jobs.errors import UserInputError, invalid_options

_FIELD_ATTR = "config_field"  # set on each generated argparse action: which config field it fills


@dataclass(frozen=True)
class FieldRef:
    """The config field an argparse action sets (the help test derives the expected choices from it)."""

    config: type[BaseModel]
    name: str
    borrowed: bool = False  # the verb takes only some fields of this config (`Fields.only`), on purpose

    @property
    def info(self) -> FieldInfo:
        return self.config.model_fields[self.name]


def field_of(action: argparse.Action) -> FieldRef | None:
    """The config field behind a generated flag; None for hand-made ones (such as -h)."""
    return getattr(action, _FIELD_ATTR, None)


def tag(action: argparse.Action, config: type[BaseModel], name: str, borrowed: bool = False) -> argparse.Action:
    """Mark a hand-added alias (e.g. `--lower-is-better`) as setting `config.name`."""
    setattr(action, _FIELD_ATTR, FieldRef(config, name, borrowed))
    return action


def unwrap(annotation: Any) -> Any:
    """`X | None` and `Annotated[X, ...]` -> X: argparse parses X, pydantic validates the rest.

    A union of several types (`int | tuple[int, int]`, the worker count) is read as a string: its
    validator knows the forms (`2`, `1-4`).
    """
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(kinds) > 1:
                return str
            annotation = kinds[0]
        else:
            return annotation


def choices_of(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal` field (None for any other type)."""
    annotation = unwrap(annotation)
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _parse_kwargs(annotation: Any) -> dict[str, Any]:
    """How argparse reads one field's value(s), from its type."""
    annotation = unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"type": type(args[0]), "choices": args}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": args[0], "nargs": "+"}
    if origin is tuple:
        return {"type": args[0], "nargs": len(args)}
    if origin is list:
        return {"type": args[0], "nargs": "+"}
    if origin is dict:
        return {"action": "append", "metavar": "KEY=VALUE"}
    return {"type": annotation}


def _shown(value: Any) -> str:
    """A default as the user would type it: tuples space-separated, an empty dict as `none`."""
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "none" if value == {} else str(value)


def help_text(info: FieldInfo) -> str:
    """The field's description plus `(default: X)`; `%` escaped for argparse."""
    text = (info.description or "").strip()
    if typing.get_origin(unwrap(info.annotation)) is dict:
        text += " Repeatable."
    if not info.is_required():
        text += f" (default: {_shown(info.get_default(call_default_factory=True))})"
    return text.strip().replace("%", "%%")


_NUMBER_METAVARS: dict[Any, str] = {int: "N", float: "X"}


@dataclass(frozen=True)
class Fields:
    """Which fields of one config become flags, how they are spelled, and how their values come back."""

    config: type[BaseModel]
    prefix: str = ""  # of each dest, e.g. "data." for a section of TrainConfig
    only: frozenset[str] | None = None
    skip: frozenset[str] = frozenset()
    positional: frozenset[str] = frozenset()
    names: Mapping[str, str] = field(default_factory=dict)  # field -> flag without "--"
    metavars: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    title: str | None = None  # argument group in --help

    def selected(self) -> dict[str, FieldInfo]:
        return {name: info for name, info in self.config.model_fields.items()
                if (self.only is None or name in self.only) and name not in self.skip}

    def flag(self, name: str) -> str:
        return "--" + self.names.get(name, name).replace("_", "-")

    def add(self, parser: argparse.ArgumentParser) -> Any:
        """One argument per selected field, each tagged with its `FieldRef`; returns the group they went to."""
        target: Any = parser.add_argument_group(self.title) if self.title else parser
        for name, info in self.selected().items():
            kwargs = {"default": argparse.SUPPRESS, "help": help_text(info), **_parse_kwargs(info.annotation)}
            if "choices" not in kwargs and kwargs.get("action") is None:  # choices show as {a,b}: no metavar
                kwargs["metavar"] = self.metavars.get(name) or _NUMBER_METAVARS.get(
                    kwargs["type"], self.names.get(name, name).upper())
            if name in self.positional:
                action = target.add_argument(self.prefix + name, **kwargs)
            else:
                action = target.add_argument(self.flag(name), dest=self.prefix + name,
                                             required=info.is_required(), **kwargs)
            tag(action, self.config, name, borrowed=self.only is not None)
        return target

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """The values the user typed for these fields; unset flags are absent, so the config keeps its default."""
        values = vars(args)
        options = {name: values[self.prefix + name] for name in self.selected() if self.prefix + name in values}
        for name, value in options.items():
            if typing.get_origin(unwrap(self.config.model_fields[name].annotation)) is dict:
                options[name] = self._pairs(name, value)
        return options

    def _pairs(self, name: str, items: list[str]) -> dict[str, str]:
        pairs = [item.partition("=") for item in items]
        if any(not key or not sep for key, sep, _ in pairs):
            raise UserInputError(f"{self.flag(name)} expects KEY=VALUE, got {items}")
        return {key: value for key, _, value in pairs}

    def value(self, args: argparse.Namespace, name: str) -> Any:
        """One field's typed value, else its config default (for flags whose config is not built whole)."""
        default = self.config.model_fields[name].get_default(call_default_factory=True)
        return vars(args).get(self.prefix + name, default)

    def error_flag(self, loc: tuple[Any, ...]) -> str:
        """The flag (without "--") that a pydantic error location points at, as `invalid_options` wants it."""
        return self.names.get(str(loc[0]), str(loc[0]))

    def validated(self, args: argparse.Namespace, **fixed: Any) -> Any:
        """The config from the typed flags (plus `fixed` values); a bad one is a one-line `UserInputError`."""
        try:
            return self.config(**self.given(args), **fixed)
        except ValidationError as err:
            raise invalid_options(err, self.error_flag) from None


# TrainConfig's sections are nested; these flags read better than the field names.
_TRAIN_FLAG_NAMES = {
    ("data", "dataset"): "dataset",
    ("loss", "kind"): "loss",
    ("optim", "name"): "optimizer",
    ("scaling", "num_workers"): "workers",
    ("run", "name"): "name",
}


def _sections(config_cls: type[BaseModel]) -> list[Fields]:
    """One `Fields` per section of a nested config such as TrainConfig (dests `section.field`)."""
    return [
        Fields(section_field.annotation, prefix=f"{section}.", title=section,
               names={name: flag for (sec, name), flag in _TRAIN_FLAG_NAMES.items() if sec == section})
        for section, section_field in config_cls.model_fields.items()
    ]


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[BaseModel] | None = None) -> None:
    """One argument group per section of `config_cls` (default: TrainConfig), one flag per field."""
    for section in _sections(config_cls or _train_config()):
        section.add(parser)


def config_from_args(args: argparse.Namespace, config_cls: type[BaseModel] | None = None) -> Any:
    """The validated nested config from the flags given; a bad value is a `UserInputError` naming the flag."""
    config_cls = config_cls or _train_config()
    nested = {section.prefix[:-1]: section.given(args) for section in _sections(config_cls)}
    try:
        return config_cls.model_validate({key: value for key, value in nested.items() if value})
    except ValidationError as err:
        raise invalid_options(err, lambda loc: _TRAIN_FLAG_NAMES.get(loc[:2], str(loc[-1]))) from None


def _train_config() -> type[BaseModel]:
    from ray_jobs.config import TrainConfig

    return TrainConfig
