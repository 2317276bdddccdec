"""`train-food ingest`: an ImageFolder tree validated into Parquet shards, flags from `IngestConfig`."""

from __future__ import annotations

import argparse

from flows.cli.command import Verb
from flows.cli.flags import Fields


def _ingest_fields() -> Fields:
    from tasks.ingest.config import IngestConfig

    return Fields(IngestConfig, positional=frozenset({"src"}), metavars={"out": "DIR"})


def _ingest(args: argparse.Namespace) -> int:
    from tasks.ingest.pipeline import ingest

    print(ingest(_ingest_fields().validated(args)).summary())
    return 0


VERBS = (
    Verb(
        "ingest",
        help="validate an ImageFolder tree and write it as Parquet shards + manifest.json",
        description="Decode every image once, quarantine bad files, drop exact duplicates, split "
        "train/val/test (stratified, seeded) and write Parquet shards to DIR atomically. "
        "Unset options take the IngestConfig defaults (tasks/ingest/config.py).",
        add_flags=lambda parser: _ingest_fields().add(parser),
        handler=_ingest,
    ),
)
