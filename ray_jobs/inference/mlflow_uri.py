"""Point MLflow's global tracking and registry URIs at one store for a block of code.

Needed because parts of MLflow ignore explicit URIs: `log_model` uses the fluent API, and
downloading `models:/name@alias` resolves the version's `models:/m-...` source globally. Used by
model loading here and by registration and sweep logging in `tasks.registry`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def using_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's global tracking and registry URIs at `uri` (None: leave them), then undo it.

    Needed because parts of MLflow ignore explicit URIs: `log_model` uses the fluent API, and
    downloading `models:/name@alias` resolves the version's `models:/m-...` source globally.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI (and the registry one) into
    os.environ, so "restoring" the previous *resolved* URI would pin MLflow's cwd-relative default
    for the rest of the process. Instead: unset MLflow's globals and put the variables back as found.
    """
    import mlflow

    if uri is None:
        yield
        return
    saved = {key: os.environ.get(key) for key in _URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def env_default(key: str, value: str) -> Iterator[None]:
    """Set an environment variable for one block, unless the user already set it."""
    if key in os.environ:
        yield
        return
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None)
