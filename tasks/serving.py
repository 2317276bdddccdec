"""Roll serving forward: after a flow run promotes a new champion, see `train-food serve` answer with it.

Why the flow waits instead of redeploying: the application's replicas follow `models:/NAME@champion`
themselves (`ray_jobs.live_model`: each checks the alias every `alias_poll_s` and swaps in the new
version without failing a request), so whatever moves the alias (this flow, a person in the MLflow
UI) rolls the application forward. The flow's part is to make that visible and checked: it asks
`GET /health` until `confirmations` answers in a row name the new version (a request reaches one
replica at a time, so several in a row make it likely every replica switched), and fails the step
with one line naming the URL, the version expected and the last answer when that takes longer
than `timeout_s` (a server that follows another alias or registry, or is not running).
"""

from __future__ import annotations

import time

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ray_jobs.errors import UserInputError


class ServingConfig(BaseModel):
    """Where `train-food serve` listens and how long the flow waits for it to switch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="The application's base URL, e.g. http://127.0.0.1:8000.")
    timeout_s: float = Field(default=120.0, gt=0.0, description="Fail the step after this long.")
    poll_s: float = Field(default=1.0, gt=0.0, description="Seconds between /health requests.")
    confirmations: int = Field(default=5, ge=1, description="Answers in a row that must name the new version.")


def wait_for_version(cfg: ServingConfig, model_name: str, version: str) -> float:
    """Seconds until `cfg.url` answered `confirmations` times in a row with `model_name` `version`."""
    url = cfg.url.rstrip("/") + "/health"
    start = time.monotonic()
    in_a_row, last = 0, "no answer yet"
    with httpx.Client(timeout=min(cfg.timeout_s, 30.0)) as http:
        while True:
            try:
                body = http.get(url).raise_for_status().json()
                served = (str(body.get("model")), str(body.get("version")))
                last = f"{served[0]} version {served[1]}"
            except (httpx.HTTPError, ValueError, AttributeError) as err:
                served, last = None, f"{type(err).__name__}: {err}".splitlines()[0]
            in_a_row = in_a_row + 1 if served == (model_name, version) else 0
            elapsed = time.monotonic() - start
            if in_a_row >= cfg.confirmations:
                return elapsed
            if elapsed + cfg.poll_s > cfg.timeout_s:
                raise UserInputError(f"serving: {cfg.url} did not answer with {model_name} version {version} "
                                     f"within {cfg.timeout_s:g} s (last answer: {last})")
            time.sleep(cfg.poll_s)
