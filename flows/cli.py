"""The `train-food` console script: thin argparse front-ends over the installed packages.

Each subcommand imports what it needs lazily so `train-food --help` stays fast. Handlers return
an exit code; bad input raised as `UserInputError` is printed as one line (no traceback), exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ray_jobs.errors import UserInputError


Handler = Callable[[argparse.Namespace], int]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train-food", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserInputError as err:
        print(f"train-food {args.command}: error: {err}", file=sys.stderr)
        return 2


# Subcommand registrars: each adds one subparser and sets `handler`.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


if __name__ == "__main__":
    raise SystemExit(main())
