"""Where a replica's time goes between bytes in and answer out, summed per stage since it started.

Stages of one request: `read` (the body), `decode` (bytes to pixels, in a decode thread), `queue`
(decoded until its batch's forward starts), `forward` (per batch: transform, forward and open-set
scores, in the forward thread; `images` counts what the batches held), and `request` (the route,
start to answer). What a client measures beyond `request` is the proxy and the network.
`GET /stats` shows it; `bench/serve_load.py` prints it under load.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any


class StageTimes:
    """Thread-safe running totals of seconds and counts per stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            self._seconds[stage] += seconds
            self._counts[stage] += count

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stage: how many, the seconds in all, and the mean in milliseconds."""
        with self._lock:
            return {stage: {"count": self._counts[stage], "seconds": round(seconds, 4),
                            "mean_ms": round(1000 * seconds / max(self._counts[stage], 1), 3)}
                    for stage, seconds in self._seconds.items()}
