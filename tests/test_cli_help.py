"""`train-food <verb> --help` documents every option, and shows the choices of every enum option.

The subcommands come from the real parser and the expected choices from the config fields the flags
were generated from, so a new verb, a flag without help or a Literal flag that lost its choices fails here.
"""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from flows.cli.flags import Fields, choices_of, field_of, tag
from flows.cli.main import _build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(sub.choices)


def _shown_choices(action: argparse.Action) -> str:
    return "{" + ",".join(map(str, action.choices or ())) + "}"


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """What `parser --help` fails to say: options without help or config field, enums without their choices."""
    text = parser.format_help()
    problems: list[str] = []
    literal_fields: set[tuple[type[BaseModel], str]] = set()
    flagged: set[tuple[type[BaseModel], str]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
            problems.append(f"{name}: no help text")
        ref = field_of(action)
        if ref is None:
            problems.append(f"{name}: not generated from a config field")
            continue
        if not (ref.info.description or "").strip():
            problems.append(f"{name}: {ref.config.__name__}.{ref.name} has no description")
        flagged.add((ref.config, ref.name))
        if not ref.borrowed:  # a verb that borrows one field of a config (serve's --workspace) owes no others
            literal_fields |= {(ref.config, other) for other, info in ref.config.model_fields.items()
                               if choices_of(info.annotation)}
        expected = choices_of(ref.info.annotation)
        if expected is not None:
            shown = "{" + ",".join(map(str, expected)) + "}"
            if _shown_choices(action) != shown or f"{action.option_strings[-1]} {shown}" not in text:
                problems.append(f"{name}: choices {shown} not shown in --help")
    for config, field in sorted(literal_fields - flagged, key=str):
        problems.append(f"{config.__name__}.{field}: enum field without a flag")
    return problems


def test_every_subcommand_documents_every_option():
    verbs = _subcommands(_build_parser())
    assert {"ingest", "train", "tune", "evaluate", "register", "predict", "serve"} <= set(verbs)
    enum_options = 0
    for verb, parser in verbs.items():
        assert undocumented(parser) == [], verb
        enum_options += sum(choices_of(ref.info.annotation) is not None
                            for ref in map(field_of, parser._actions) if ref is not None)
    assert enum_options >= 10  # --loss, --arch, --split, --detector, --scheduler, --placement, ... were checked


def test_help_renders_through_main(capsys):
    from flows.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["tune", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--scheduler {asha,none}" in out and "--loss {softmax,center,lgm,contrastive_center}" in out


class _Demo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["x", "y"] = Field(default="x", description="An enum.")
    size: int = Field(default=1, description="An int.")


def test_the_checker_fails_on_an_option_without_help_or_choices():
    parser = argparse.ArgumentParser(prog="demo")
    Fields(_Demo).add(parser)
    assert undocumented(parser) == []

    parser.add_argument("--bare")  # hand-made, no help
    problems = undocumented(parser)
    assert "--bare: no help text" in problems and "--bare: not generated from a config field" in problems

    lost = argparse.ArgumentParser(prog="demo")
    tag(lost.add_argument("--mode", help="an enum that lost its choices"), _Demo, "mode")
    tag(lost.add_argument("--size", help="an int"), _Demo, "size")
    assert undocumented(lost) == ["--mode: choices {x,y} not shown in --help"]
