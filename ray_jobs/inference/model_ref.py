"""What a model source names in the registry, and which version an alias points at right now.

A server must say which version answered and must notice when `@champion` moves, so
`models:/NAME@ALIAS` is resolved to `models:/NAME/VERSION` before loading: the version loaded is
then exactly the version reported, even if the alias moves during the download. Anything else (a
pinned version, a checkpoint path, a run URI) is loaded as given and never changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_jobs.errors import UserInputError

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model source: `name` is the registered model (or the source itself, e.g. a checkpoint)."""

    source: str
    name: str
    alias: str | None = None  # set: follow this alias
    version: str | None = None  # set: a pinned registry version

    def uri_of(self, version: str) -> str:
        return f"models:/{self.name}/{version}"


def parse_model_ref(source: str) -> ModelRef:
    """Split `models:/NAME@ALIAS` and `models:/NAME/VERSION`; any other source stands for itself."""
    found = _REGISTRY_URI.match(source)
    if found is None:
        return ModelRef(source=source, name=source)
    return ModelRef(source=source, name=found["name"], alias=found["alias"], version=found["version"])


def registry_client(tracking_uri: str | None) -> Any:
    """An MlflowClient for the registry at `tracking_uri` (None: MLflow's own default)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def alias_version(client: Any, ref: ModelRef, tracking_uri: str | None) -> str:
    """The version `ref.alias` points at now; `UserInputError` when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(ref.name, ref.alias).version)
    except MlflowException as err:
        raise UserInputError(f"cannot resolve {ref.source} in {tracking_uri or 'the default MLflow store'}: "
                             f"{err.message}") from None


def check_model_source(ref: ModelRef, tracking_uri: str | None) -> str:
    """Fail fast, before any replica starts, on a source that cannot load; returns what will be served."""
    if ref.alias is not None:
        return ref.uri_of(alias_version(registry_client(tracking_uri), ref, tracking_uri))
    if ref.version is not None:
        from mlflow.exceptions import MlflowException

        try:
            registry_client(tracking_uri).get_model_version(ref.name, ref.version)
        except MlflowException as err:
            raise UserInputError(f"cannot find {ref.source} in {tracking_uri or 'the default MLflow store'}: "
                                 f"{err.message}") from None
        return ref.source
    if ":" not in ref.source and not Path(ref.source).exists():
        raise UserInputError(f"--model {ref.source!r}: no such checkpoint (and not an MLflow model URI)")
    return ref.source
