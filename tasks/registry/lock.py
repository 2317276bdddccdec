"""The registry's lock: one registration at a time reads the champion, decides and moves the alias.

Without it two concurrent registrations can both see the same champion (or none) and the worse
one can take the alias last. `promotion_lock` is an `fcntl.flock` on a file next to an SQLite
database or file store (the default embedded store is `<workspace>/mlflow/mlflow.db`); for a
remote tracking server, a Prefect global concurrency limit of 1, inside a Prefect flow or task
or whenever `PREFECT_API_URL` names a Prefect server (it serialises every registration that shares
that server, the flow's and `train-food register`'s alike). A registration against a remote
server with neither is refused: there would be no lock at all.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray_jobs.errors import UserInputError

__all__ = ["promotion_lock"]


def _lock_file(tracking_uri: str) -> Path | None:
    """The lock file of a store on this machine's file system (SQLite DB or file store); None for servers."""
    if tracking_uri.startswith("sqlite:///"):
        database = tracking_uri[len("sqlite:///"):].split("?")[0]
        return Path(database + ".lock").resolve() if database and database != ":memory:" else None
    if tracking_uri.startswith("file:") or (tracking_uri != "databricks" and ":" not in tracking_uri):
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(tracking_uri)).resolve() / ".train-food-registry.lock"
    return None


def _in_prefect_run() -> bool:
    """Only inside a flow or task is there a Prefect server to hold a concurrency limit."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _ensure_prefect_lock(name: str) -> None:
    """Create (or repair) the global concurrency limit `name` with limit 1.

    `prefect.concurrency.sync.concurrency` does not create a missing limit: with `strict=False` it
    only logs a warning and does not block at all, so the limit must exist before it is used.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
            except ObjectAlreadyExists:  # created meanwhile by a concurrent registration
                pass
            return
        if found.limit != 1 or not found.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


@contextmanager
def promotion_lock(tracking_uri: str, model_name: str) -> Iterator[None]:
    """Hold the registry's lock for `model_name` while reading the champion, deciding and moving the alias.

    - SQLite database or file store: an exclusive `fcntl.flock` on a lock file next to it (one lock
      per store; SQLite serialises its writers anyway, so nothing is lost, and holding the lock
      over the whole registration also avoids "database is locked" between concurrent runs);
    - any other store (an http(s) tracking server, a database server), inside a Prefect flow or
      task or with `PREFECT_API_URL` set: the Prefect global concurrency limit `train-food-registry-<model_name>` with limit 1,
      created if missing;
    - otherwise (a remote store and no Prefect server to hold a lock): `UserInputError`, one line.
    """
    path = _lock_file(tracking_uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, also if the process dies
            yield
        return
    if _in_prefect_run() or _prefect_server() is not None:
        from prefect.concurrency.sync import concurrency

        name = f"train-food-registry-{model_name}"
        _ensure_prefect_lock(name)
        with concurrency(name, occupy=1, strict=True):
            yield
        return
    raise UserInputError(f"register: no lock for the remote registry {tracking_uri}: set PREFECT_API_URL to the "
                         "Prefect server the flow uses (registrations then take its lock), or register from the flow")


def _prefect_server() -> str | None:
    """The Prefect API `PREFECT_API_URL` names, if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None
