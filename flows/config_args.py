"""Command-line flags generated from the stage configs, so defaults and help live in one place.

Every field of `TrainConfig`'s sections becomes `--field-name` (a few get friendlier names, e.g.
`--workers` for `scaling.num_workers`). Only the flags a user gives override the defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from ray_jobs.config import TrainConfig
from ray_jobs.errors import invalid_options

_FLAG_NAMES = {
    ("data", "dataset"): "dataset",
    ("loss", "kind"): "loss",
    ("optim", "name"): "optimizer",
    ("scaling", "num_workers"): "workers",
    ("run", "name"): "name",
}


def _scalar_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse type, choices) for an annotation like `int`, `float | None` or `Literal[...]`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:  # e.g. `ServingUrl`: argparse parses the base type
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return str, typing.get_args(annotation)
    return annotation, None


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[BaseModel] = TrainConfig) -> None:
    """One argument group per config section, one flag per field."""
    for section, section_field in config_cls.model_fields.items():
        section_cls = section_field.annotation
        group = parser.add_argument_group(section)
        for name, field in section_cls.model_fields.items():
            flag = "--" + _FLAG_NAMES.get((section, name), name).replace("_", "-")
            dest = f"{section}.{name}"
            help_text = f"{field.description or ''} (default: {field.default})".strip()
            if field.annotation is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
                continue
            kind, choices = _scalar_type(field.annotation)
            required = field.is_required()
            group.add_argument(
                flag, dest=dest, type=kind, choices=choices, default=None, required=required, metavar=name.upper(),
                help=field.description if required else help_text,
            )


def add_flat_arguments(parser: argparse.ArgumentParser, config_cls: type[BaseModel]) -> None:
    """One `--field-name` flag per field of a flat config; unset flags are left out of the namespace."""
    for name, field in config_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} (default: {field.default})".strip()
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        kind, choices = _scalar_type(field.annotation)
        parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS, metavar=name.upper(),
                            help=help_text)


def config_from_args(args: argparse.Namespace, config_cls: type[BaseModel] = TrainConfig) -> Any:
    """The validated config from the flags given; a bad value is a `UserInputError` naming the flag."""
    nested: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            nested.setdefault(section, {})[name] = value
    try:
        return config_cls.model_validate(nested)
    except ValidationError as err:
        raise invalid_options(err, lambda loc: _FLAG_NAMES.get(loc[:2], str(loc[-1]))) from None
