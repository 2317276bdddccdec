"""The `train-food` console script: thin argparse front-ends over the installed packages.

Each verb module generates its flags from the stage configs and imports what it needs lazily; only
the verb being run gets its flags, so `train-food --help` imports no stage config. Handlers return
an exit code; bad input raised as `UserInputError` is printed as one line (no traceback), exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.cli.command import Handler, Verb


def verbs() -> tuple[Verb, ...]:
    """In walkthrough order: run, deploy; ingest; train, tune; evaluate, register; predict, serve.

    Imported here, not at module level: a process that `multiprocessing` spawns (ingestion's decode
    workers) re-imports the console script, which imports this module; it should cost nothing.
    """
    from flows.cli import evaluation_commands, ingest_commands, model_commands, pipeline_commands, training_commands

    modules = (pipeline_commands, ingest_commands, training_commands, evaluation_commands, model_commands)
    return tuple(verb for module in modules for verb in module.VERBS)


def _build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand; with `only`, just that one gets its flags (the others are never parsed)."""
    parser = argparse.ArgumentParser(prog="train-food", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in verbs():
        verb_parser = sub.add_parser(verb.name, help=verb.help, description=verb.description)
        verb_parser.set_defaults(handler=verb.handler)
        if only is None or only == verb.name:
            verb.add_flags(verb_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ray_jobs.errors import UserInputError

    # Offline, the temporary Prefect server's telemetry heartbeat fails with a "database is locked"
    # traceback; nothing is lost without it. On a busy 2-core machine that server can take longer
    # than Prefect's default 20 s to start. A user's own settings win.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser(only=argv[0] if argv else "").parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserInputError as err:
        print(f"train-food {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
