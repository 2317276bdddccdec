"""Live progress where the user looks: a Prefect progress artifact per stage, and the lines in the run's logs.

The stages' plain functions report progress through a callback (`ingest`'s files done,
`fit`'s epochs, `run_sweep`'s trials); `StageProgress` is that callback inside a Prefect task run.
It may be called from another thread (the training relay), so it keeps the logger and the artifact
id it got in the task's own thread. Updates are throttled: the UI polls, and every update is a
request to the Prefect API.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

MIN_UPDATE_INTERVAL_S = 1.0


class StageProgress:
    """Progress artifact `key` (0 to 100 %) and, for lines, the task run's logger.

    Outside a Prefect task run it only prints, so the same code runs under `train-food train`.
    """

    def __init__(self, key: str, description: str) -> None:
        in_run = TaskRunContext.get() is not None
        self.logger: logging.Logger | logging.LoggerAdapter[Any] | None = get_run_logger() if in_run else None
        self.artifact: UUID | None = create_progress_artifact(0.0, key=key, description=description) if in_run else None
        self.percent = 0.0
        self.last_update = 0.0
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        """One line in the run's logs (which the terminal of `train-food run` shows), else on stdout."""
        if self.logger is not None:
            self.logger.info(line)
        else:
            print(line, flush=True)

    def update(self, fraction: float, description: str, *, force: bool = False) -> None:
        """Move the artifact to `fraction` (0..1); at most once a second unless `force` or done."""
        if self.artifact is None:
            return
        with self.lock:
            percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
            now = time.monotonic()
            if not force and percent < 100.0 and now - self.last_update < MIN_UPDATE_INTERVAL_S:
                return
            if percent < self.percent:  # a resumed stage never moves the bar back
                percent = self.percent
            update_progress_artifact(self.artifact, percent, description=description)
            self.percent, self.last_update = percent, now

    def line(self, progress: Any) -> None:
        """The callback for `fit` and `run_sweep`: log the line, move the bar by its fraction."""
        self.say(progress.line)
        if progress.fraction is not None:
            self.update(progress.fraction, progress.line)
