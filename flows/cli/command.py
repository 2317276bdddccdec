"""What one `train-food` subcommand is: its help, a function adding its flags, and its handler.

Verb modules import their configs inside `add_flags` and the handler, so the top-level `--help`
builds every subparser's name and help without importing a single stage config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Verb:
    """One subcommand. `add_flags` runs only for the verb being parsed (or all, for tests and docs)."""

    name: str
    help: str
    description: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    handler: Handler
