"""Roll serving forward: after a flow run promotes a new champion, see `train-food serve` answer with it.

Why the flow waits instead of redeploying: the application's replicas follow `models:/NAME@champion`
themselves (`ray_jobs.serving.live_model`: each checks the alias every `alias_poll_s` and swaps in the new
version without failing a request), so whatever moves the alias (this flow, a person in the MLflow
UI) rolls the application forward. The flow's part is to make that visible and checked: it asks
`GET /health` until `confirmations` answers in a row name the new version (a request reaches one
replica at a time, so several in a row make it likely every replica switched), and fails the step
with one line naming the URL, the version expected and the last answer when that takes longer
than `timeout_s` (a server that follows another alias or registry, or is not running).
"""

from __future__ import annotations

import time
from typing import Annotated

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ray_jobs.errors import UserInputError


def check_serving_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host; `ValueError` otherwise (checked before training starts)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise ValueError(f"not a URL ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000")
    return url


ServingUrl = Annotated[str, AfterValidator(check_serving_url)]  # the flow parameter and the step's config


class ServingConfig(BaseModel):
    """Where `train-food serve` listens and how long the flow waits for it to switch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: ServingUrl = Field(description="The application's base URL, e.g. http://127.0.0.1:8000.")
    timeout_s: float = Field(default=120.0, gt=0.0, description="Fail the step after this long.")
    poll_s: float = Field(default=1.0, gt=0.0, description="Seconds between /health requests.")
    confirmations: int = Field(default=5, ge=1, description="Answers in a row that must name the new version.")

    @model_validator(mode="after")
    def _room_for_every_confirmation(self) -> ServingConfig:
        if self.timeout_s < self.confirmations * self.poll_s:
            raise ValueError(f"timeout_s {self.timeout_s:g} leaves no room for {self.confirmations} answers "
                             f"{self.poll_s:g} s apart")
        return self


def wait_for_version(cfg: ServingConfig, model_name: str, version: str) -> float:
    """Seconds until `cfg.url` answered `confirmations` times in a row with `model_name` `version`."""
    url = cfg.url.rstrip("/") + "/health"
    start = time.monotonic()
    deadline = start + cfg.timeout_s
    in_a_row, last = 0, "no answer yet"
    with httpx.Client() as http:
        while True:
            try:
                body = http.get(url, timeout=max(deadline - time.monotonic(), 0.1)).raise_for_status().json()
                served = (str(body.get("model")), str(body.get("version")))
                last = f"{served[0]} version {served[1]}"
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, AttributeError) as err:
                served, last = None, f"{type(err).__name__}: {err}".splitlines()[0]
            in_a_row = in_a_row + 1 if served == (model_name, version) else 0
            if in_a_row >= cfg.confirmations:
                return time.monotonic() - start
            if time.monotonic() + cfg.poll_s > deadline:
                raise UserInputError(
                    f"serving: {cfg.url} did not answer with {model_name} version {version} {cfg.confirmations} "
                    f"times in a row within {cfg.timeout_s:g} s (last answer: {last}, {in_a_row} in a row)")
            time.sleep(cfg.poll_s)
