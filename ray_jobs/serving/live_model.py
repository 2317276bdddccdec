"""The model a server answers with, switched to a new version without dropping a request.

Why polling inside the replica (and not a redeploy with a new `user_config`): a redeploy needs
whatever moves the alias (a flow, a person in the MLflow UI) to redeploy as well. Here each replica
checks the alias every `poll_s` seconds in a background thread; when it has moved, the thread
loads the new version completely *beside* the old one and then rebinds one attribute. A request
takes `current` once (a `Served`: model, name, version) and uses that snapshot to the end, so a
request in flight finishes on the model it started with and reports that version; the next batch
uses the new one. Registry or load failures keep the old model serving and are logged.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ray_jobs.errors import UserInputError
from ray_jobs.inference.loading import LoadedModel, load_model
from ray_jobs.inference.precision import InferencePrecision
from ray_jobs.inference.model_ref import ModelRef, alias_version, parse_model_ref, registry_client

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Served:
    """One loaded model and the registry name/version it answers as (version None: not from the registry)."""

    model: LoadedModel
    name: str
    version: str | None


class LiveModel:
    """Holds the current `Served`; follows `models:/NAME@ALIAS` when `poll_s` > 0."""

    def __init__(self, source: str, tracking_uri: str | None, poll_s: float,
                 precision: InferencePrecision = "auto") -> None:
        self.ref: ModelRef = parse_model_ref(source)
        self.tracking_uri = tracking_uri
        self.precision = precision
        self._client = registry_client(tracking_uri) if self.ref.alias else None
        self._refused: str | None = None  # a version that failed to load: not retried every poll
        self.current: Served = self._load(self._target_version())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_s = poll_s
        self._checked_at = time.monotonic()  # the last time the alias was read from the registry
        self._last_error = ""
        if self.ref.alias and poll_s > 0:
            self._thread = threading.Thread(target=self._follow, args=(poll_s,), name="follow-alias", daemon=True)
            self._thread.start()

    def _target_version(self) -> str | None:
        if self.ref.alias is not None:
            return alias_version(self._client, self.ref, self.tracking_uri)
        return self.ref.version

    def _load(self, version: str | None) -> Served:
        source = self.ref.uri_of(version) if version is not None else self.ref.source
        return Served(model=load_model(source, self.tracking_uri, self.precision), name=self.ref.name, version=version)

    def refresh(self) -> bool:
        """Load and switch to the alias's version if it moved; True when the model changed."""
        version = self._target_version()
        self._checked_at = time.monotonic()
        if version in (self.current.version, self._refused):
            return False
        try:
            loaded = self._load(version)
        except UserInputError as err:
            self._refused = version
            log.warning("keeping version %s: version %s does not load: %s", self.current.version, version, err)
            return False
        previous, self.current = self.current.version, loaded  # one reference rebind: atomic for readers
        log.info("now serving %s version %s (was %s)", self.ref.name, version, previous)
        return True

    def _follow(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - an unreachable registry must not stop serving
                self._last_error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                log.warning("alias check of %s failed, still serving version %s: %s",
                            self.ref.source, self.current.version, err)

    def problem(self) -> str | None:
        """Why this model cannot follow its alias (None: it can, or it follows none): the follower
        thread has died, or the alias has not been read for 3 polls (the registry is unreachable)."""
        if self._thread is None or self._stop.is_set():
            return None
        if not self._thread.is_alive():
            return f"the follower of {self.ref.source} has stopped: version {self.current.version} is frozen"
        age = time.monotonic() - self._checked_at
        if age > 3 * self._poll_s:
            return (f"{self.ref.source} not read for {age:.0f} s (every {self._poll_s:g} s expected): "
                    f"{self._last_error or 'no answer'}")
        return None

    def close(self) -> None:
        """Stop following the alias (the thread exits at its next wake-up)."""
        self._stop.set()
