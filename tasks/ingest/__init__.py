"""Ingestion: an ImageFolder tree -> validated Parquet shards and a manifest (`pipeline.ingest`).

scan (list, classify) -> fingerprint -> decode (process pool) -> plan (dedupe, split) -> store
(shards, manifest, atomic publish). `files` and `decode` import no torch: spawned workers load them.
"""
