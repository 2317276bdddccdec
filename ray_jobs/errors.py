"""The one exception type for bad input a user can fix.

Every stage raises `UserInputError` with a message naming the file, value or step at fault; the
CLI prints it as one line and exits 2, and the Prefect flow fails the stage with the same text.
"""

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError


class UserInputError(Exception):
    """Bad input (missing path, wrong value, unschedulable request): fix the input and rerun."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_own_line(message))


_LOADER_WRAPPED = "Caught UserInputError in DataLoader worker"


def _own_line(message: str) -> str:
    """A DataLoader worker re-raises an error as `type("Caught ... Original Traceback: ...")`; keep
    only the error's own line, so bad data found while decoding is still reported as one line."""
    if not message.startswith(_LOADER_WRAPPED):
        return message
    _, found, own = message.rpartition(f"{__name__}.UserInputError: ")
    return own.strip() if found else message.splitlines()[0]


def invalid_options(err: ValidationError, flag: Callable[[tuple[Any, ...]], str] | None = None) -> UserInputError:
    """One line naming each bad option as typed on the command line: `--image-size: <why> (got 8)`.

    `flag` maps a pydantic error location to the option's name (default: the location joined by "-").
    """
    problems = []
    for item in err.errors():
        loc = tuple(item["loc"])
        name = "--" + (flag(loc) if flag else "-".join(map(str, loc))).replace("_", "-") if loc else "options"
        problems.append(f"{name}: {item['msg']} (got {item.get('input')!r})")
    return UserInputError("; ".join(problems))

