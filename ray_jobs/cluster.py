"""Joining a Ray cluster, or starting a local one: shared by training, sweeps and serving."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local cluster with the dashboard on 127.0.0.1.

    `address="local"` is explicit so a stale `/tmp/ray/ray_current_cluster` is never joined.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
