"""How `train-food serve` runs: which model, where it listens, batching, replicas, alias polling.

Defaults live here only; the CLI's flags are generated from these fields. The whole config travels
to each Serve replica as a plain dict and is validated again there.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ray_jobs.data.image_prep import MAX_FILE_BYTES
from ray_jobs.inference.detector_names import DetectorName
from ray_jobs.inference.precision import InferencePrecision
from ray_jobs.inference.loading import DEFAULT_MODEL_URI

TOKEN_ENV = "TRAIN_FOOD_SERVE_TOKEN"


MIN_ONGOING_REQUESTS = 32


class ServeConfig(BaseModel):
    """One Ray Serve application answering `POST /predict` and `GET /health` over HTTP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        default=DEFAULT_MODEL_URI,
        description="models:/NAME@ALIAS (followed when the alias moves), models:/NAME/VERSION or a checkpoint path.",
    )
    tracking_uri: str | None = Field(
        default=None, description="MLflow server or store; None: MLFLOW_TRACKING_URI, else the workspace SQLite."
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0: every interface).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field(default="train-food", min_length=1, description="Ray Serve application name.")
    top_k: int = Field(default=5, ge=1, description="Classes returned per image.")
    detector: DetectorName | None = Field(
        default=None, description="Open-set detector that flags unknown dishes; None: the model calibration's default."
    )
    precision: InferencePrecision = Field(
        default="auto", description="Forward precision: fp32, bf16 (autocast), or auto (bf16 where the "
        "hardware runs it natively and the model has a bf16 calibration, else fp32).")
    max_batch_size: int = Field(default=16, ge=1, description="Requests classified in one forward pass (1: no batching).")
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0.0, description="How long a batch waits for more requests before it runs."
    )
    min_replicas: int = Field(default=1, ge=1, description="Autoscaling lower bound.")
    max_replicas: int = Field(default=2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        default=16.0, gt=0.0, description="Requests per replica the autoscaler aims for (one batch's worth)."
    )
    replica_cpus: float = Field(default=1.0, gt=0.0, description="CPUs reserved by each replica.")
    alias_poll_s: float = Field(
        default=10.0, ge=0.0, description="Seconds between checks of the alias (0: never switch versions)."
    )
    max_body_bytes: int = Field(
        default=MAX_FILE_BYTES, ge=1, description="Larger uploads get 413 before their body is read."
    )
    token: str | None = Field(
        default=None, min_length=16,
        description=f"Bearer token POST /predict requires (Authorization: Bearer ...; default: ${TOKEN_ENV}); "
                    "required when --host is not a loopback address.",
    )
    request_timeout_s: float = Field(default=30.0, gt=0.0, description="A request unanswered after this gets 408.")
    body_timeout_s: float = Field(
        default=5.0, gt=0.0, description="A body not received in full after this gets 408 (slow clients)."
    )
    decode_timeout_s: float = Field(default=5.0, gt=0.0, description="An image not decoded after this gets 422.")
    max_queued_requests: int = Field(
        default=64, ge=1, description="Requests waiting for a replica beyond this get a fast 503."
    )

    @field_validator("max_replicas")
    @classmethod
    def _at_least_min_replicas(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_replicas")
        if low is not None and value < low:
            raise ValueError(f"below min_replicas ({low})")
        return value

    @property
    def loopback(self) -> bool:
        """Whether `host` is reachable from this machine only (then no token is needed)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to any interface
            return False

    def exposure_problem(self) -> str | None:
        """Why this config must not serve (a non-loopback address without a token), None when it may."""
        if self.loopback or self.token:
            return None
        return (f"--host {self.host} serves beyond this machine: set --token (or ${TOKEN_ENV}) so that "
                "POST /predict needs it")

    @property
    def max_ongoing_requests(self) -> int:
        """Per replica: at least one batch running and the next one filling, and at least 32. A replica
        at its limit makes Serve's router retry with growing back-off: with 2 (unbatched) it served
        6.8 req/s at 32 clients against 30.7 at 1 (`bench/serve_load.py`)."""
        return max(2 * self.max_batch_size, MIN_ONGOING_REQUESTS)
