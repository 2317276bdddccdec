"""The pipeline's stages: ingestion, evaluation, the MLflow registry, sweep logging, serving roll-forward,
and their Prefect wrappers (`stages`) and artifacts.

Folders by job: `ingest` (ImageFolder -> Parquet), `evaluation` (report, figures), `registry`
(MLflow store, registration, the champion rule and lock). May import `ray_jobs`, never `flows`.
"""
