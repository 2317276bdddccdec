"""Where MLflow writes, and the small helpers every MLflow writer here shares (registration, sweep logging).

Without `tracking_uri` or MLFLOW_TRACKING_URI everything stays in the workspace: an SQLite store
at `<workspace>/mlflow/mlflow.db` and artifacts under `<workspace>/mlflow/artifacts`, both absolute
(Ray changes the cwd).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_jobs.errors import UserInputError

_REPO = Path(__file__).resolve().parents[2]


def _mlflow_dir(workspace: str | Path) -> Path:
    return Path(workspace).expanduser().resolve() / "mlflow"


def default_tracking_uri(workspace: str | Path = "workspace") -> str:
    """The embedded store: `sqlite:////abs/<workspace>/mlflow/mlflow.db` (absolute: Ray changes the cwd)."""
    return f"sqlite:///{_mlflow_dir(workspace) / 'mlflow.db'}"


def default_artifact_location(workspace: str | Path = "workspace") -> str:
    """`file:///abs/<workspace>/mlflow/artifacts`, set explicitly on the experiment."""
    return (_mlflow_dir(workspace) / "artifacts").as_uri()


def resolve_tracking_uri(
    tracking_uri: str | None = None, workspace: str | Path = "workspace", create: bool = True
) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else the workspace's SQLite store.

    `create=False` is for readers: a missing embedded store is a `UserInputError` instead of a new
    empty database (which would only fail later with a vaguer "model not found").
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = _mlflow_dir(workspace)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not (folder / "mlflow.db").is_file():
        raise UserInputError(f"no model registry at {folder / 'mlflow.db'}: run `train-food register` first, "
                             "or pass --workspace / --tracking-uri")
    return default_tracking_uri(workspace)


def ensure_experiment(client: Any, name: str, uri: str, workspace: str | Path) -> str:
    """The experiment's id, creating it (with an explicit artifact location for the embedded store)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    embedded = uri == default_tracking_uri(workspace)
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(workspace) if embedded else None)
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def code_version() -> str:
    """`git describe` of this checkout (commit, `-dirty` if modified), else the installed package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=_REPO, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"train-food {importlib.metadata.version('train-food')}"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"data": {"image_size": 32}}` -> `{"data.image_size": "32"}` for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_params(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat
