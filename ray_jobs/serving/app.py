"""The Ray Serve application behind `train-food serve`: FastAPI ingress, batched inference.

`POST /predict` takes the raw image bytes as the request body (`curl --data-binary @photo.jpg`;
a multipart form is refused with a hint). The body is decoded with `train-food predict`'s rules
(`ray_jobs.data.decode.decode_photo`: same pixel limit, same conversions) while the request is on its
own, then waits in the replica's batch queue (`ray_jobs.serving.batcher`), so one forward pass
serves up to `max_batch_size` requests. Bad input gets a 4xx with a one-line `detail` and never
reaches the batch:

- 401 a missing or wrong bearer token, when the server has one (`--token`; required to serve on a
  non-loopback address);
- 400 empty body; 413 body over `max_body_bytes` (a declared Content-Length is checked before
  anything is read; a body without one is read in chunks and dropped once it passes the limit);
  408 a body not received within `body_timeout_s` (a slow client does not keep its slot);
- 415 a multipart form; 422 not a readable image, a header promising an image outside the limits
  of `ray_jobs.data.image_prep` (refused before decoding), or a decode over `decode_timeout_s`.

Waiting is bounded: Serve answers 503 at once when `max_queued_requests` wait for a replica, and
its proxy ends a request after `request_timeout_s`.

`GET /` is a page to try the model in a browser (`page.html`: HTML, CSS and plain JavaScript,
nothing fetched from elsewhere). `GET /stats` shows where the replica's time goes
(`ray_jobs.serving.timings`). `GET /health` names the model, version, alias, precision and
open-set detector; it answers 503 when the model cannot follow its alias (the follower died, or
the registry has not answered for 3 polls). Model
versions are switched by `ray_jobs.serving.live_model.LiveModel` (see there why polling, and why no
request fails).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime.
import asyncio
import functools
import hashlib
import hmac
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment
from torch import Tensor

from ray_jobs.data.decode import decode_photo
from ray_jobs.errors import UserInputError
from ray_jobs.inference.loading import LoadedModel
from ray_jobs.inference.predict import Prediction, predict_tensors
from ray_jobs.serving.batcher import GreedyBatcher
from ray_jobs.serving.config import ServeConfig
from ray_jobs.serving.live_model import LiveModel, Served
from ray_jobs.serving.timings import StageTimes

app = FastAPI(title="train-food", description="Food dish classifier: POST raw image bytes to /predict.")

_WHERE = "request body"
PAGE_FILE = Path(__file__).with_name("page.html")  # self-contained: nothing fetched from elsewhere
# Helpers come before the deployment class: Serve pickles the class when it is decorated.


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, refusing (413) a declared or actual size over `limit` without buffering it, and
    (408) one not received in full within `timeout_s`: a slow client must not hold a slot."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        raise HTTPException(status_code=415, detail="send the image bytes as the body "
                                                    "(curl --data-binary @photo.jpg), not a multipart form")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=too_large(int(declared), limit))
    try:
        data = await asyncio.wait_for(_read_limited(request, limit), timeout_s)
    except TimeoutError:
        raise HTTPException(status_code=408, detail=f"{_WHERE}: not received within {timeout_s:g} s") from None
    if not data:
        raise HTTPException(status_code=400, detail=f"{_WHERE}: empty (send the image bytes, "
                                                    "e.g. curl --data-binary @photo.jpg)")
    return data


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=too_large(size, limit, at_least=True))
        chunks.append(chunk)
    return b"".join(chunks)


def check_token(request: Request, token_sha256: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` whose SHA-256 is `token_sha256`
    (compared in constant time; the replica never holds the token itself)."""
    if token_sha256 is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(given.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, token_sha256):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


@functools.cache
def _page() -> str:
    return PAGE_FILE.read_text(encoding="utf-8")


def too_large(size: int, limit: int, at_least: bool = False) -> str:
    more = "over " if at_least else ""
    return f"{_WHERE}: too large to be a photo ({more}{size:,} bytes, limit {limit:,})"


def one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def answer(prediction: Prediction, served: Served) -> dict[str, Any]:
    """The JSON answer; `unknown`/`detector`/`score`/`threshold` from open-set rejection (null when uncalibrated)."""
    return {
        "model": served.name,
        "version": served.version,
        "top": [{"class": name, "probability": prob} for name, prob in prediction.top],
        "unknown": prediction.unknown,
        "detector": prediction.detector,
        "score": prediction.score,
        "threshold": prediction.threshold,
    }


@serve.deployment
@serve.ingress(app)
class Classifier:
    """One replica: a `LiveModel`, a batch queue, and the HTTP routes."""

    def __init__(self, config: dict[str, Any], token_sha256: str | None) -> None:
        self.cfg = ServeConfig.model_validate(config)
        self.token_sha256 = token_sha256
        # As many torch threads and decode threads as CPUs reserved (more only fight over them, and
        # throughput falls as clients rise); the forward has its own thread, so a batch never waits
        # behind decodes for a free one.
        import torch  # here, not at the top: Serve pickles this module's ingress app, and torch's module does not

        cpus = self.threads = max(1, round(self.cfg.replica_cpus))
        torch.set_num_threads(cpus)
        self.decoding = ThreadPoolExecutor(cpus, thread_name_prefix="decode")
        self.forward = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.times = StageTimes()
        self.live = LiveModel(self.cfg.model, self.cfg.tracking_uri, self.cfg.alias_poll_s, self.cfg.precision)
        self.batcher = GreedyBatcher(self.classify, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)
        self._ids = itertools.count()

    @app.get("/health")
    def health(self) -> dict[str, Any]:
        problem = self.live.problem()
        if problem is not None:
            raise HTTPException(status_code=503, detail=problem)
        served = self.live.current
        calibration = served.model.calibration
        return {"status": "ok", "model": served.name, "version": served.version, "alias": self.live.ref.alias,
                "classes": len(served.model.classes), "image_size": served.model.image_size,
                "precision": served.model.precision, "threads": self.threads,
                "open_set": calibration.describe(self.cfg.detector) if calibration is not None else None,
                "calibration_precision": getattr(calibration, "precision", "fp32") if calibration is not None else None,
                "token_required": self.token_sha256 is not None, "max_body_bytes": self.cfg.max_body_bytes}

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        """The page a person opens to try the model on a photo (it calls /health and /predict)."""
        return _page()

    @app.get("/stats")
    def stats(self) -> dict[str, Any]:
        """Where this replica's time went since it started (`ray_jobs.serving.timings`)."""
        return {"threads": self.threads, "stages": self.times.summary()}

    @app.post("/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        check_token(request, self.token_sha256)
        data = await read_body(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
        read = time.perf_counter()
        try:  # in a decode thread, before the batch: a slow decode never holds up a forward pass
            decoding = asyncio.get_running_loop().run_in_executor(self.decoding, decode_photo, data, _WHERE)
            image = await asyncio.wait_for(decoding, self.cfg.decode_timeout_s)
        except UserInputError as err:
            raise HTTPException(status_code=422, detail=one_line(err)) from None
        except TimeoutError:
            raise HTTPException(status_code=422, detail=f"{_WHERE}: not decoded within "
                                                        f"{self.cfg.decode_timeout_s:g} s") from None
        decoded = time.perf_counter()
        result = await self.batcher.submit((image, decoded))
        self.times.add("read", read - started)
        self.times.add("decode", decoded - read)
        self.times.add("request", time.perf_counter() - started)
        return result

    async def classify(self, items: list[tuple[Tensor, float]]) -> list[dict[str, Any]]:
        """One forward pass for the decoded images that arrived together (each with when it was decoded)."""
        served = self.live.current  # one snapshot per batch: a version switch never splits a batch
        images = [image for image, _ in items]
        names = [f"request-{next(self._ids)}" for _ in images]
        run = functools.partial(self._forward, served.model, images, names, [decoded for _, decoded in items])
        predictions = await asyncio.get_running_loop().run_in_executor(self.forward, run)
        return [answer(prediction, served) for prediction in predictions]

    def _forward(self, model: LoadedModel, images: list[Tensor], names: list[str],
                 decoded_at: list[float]) -> list[Prediction]:
        started = time.perf_counter()
        self.times.add("queue", sum(started - decoded for decoded in decoded_at), len(decoded_at))
        predictions = predict_tensors(model, images, names, self.cfg.top_k, detector=self.cfg.detector)
        self.times.add("forward", time.perf_counter() - started)
        self.times.add("images", 0.0, len(images))
        return predictions

    def __del__(self) -> None:
        self.live.close()
        self.decoding.shutdown(wait=False)
        self.forward.shutdown(wait=False)


def classifier_deployment(cfg: ServeConfig) -> Deployment:
    """The deployment with the config's batching, autoscaling bounds and per-replica CPUs."""
    return Classifier.options(
        name="Classifier",
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
    )


def build_app(cfg: ServeConfig) -> Application:
    """The app; the token travels to the replicas as its SHA-256 only."""
    token_sha256 = hashlib.sha256(cfg.token.encode()).hexdigest() if cfg.token else None
    return classifier_deployment(cfg).bind(cfg.model_dump(exclude={"token"}), token_sha256)


def start(cfg: ServeConfig) -> tuple[str, int]:
    """Start Serve's HTTP proxy on `cfg.host:cfg.port` and deploy the app; returns the address bound.

    When Serve already runs in this Ray cluster, its proxy keeps the address it has: deploying there
    is refused in one line if that is not the address asked for. Returns once every initial replica
    has loaded its model. Needs `ray.init` first.
    """
    from ray.serve.context import _get_global_client

    if problem := cfg.exposure_problem():
        raise UserInputError(problem)
    running = _get_global_client(raise_if_no_controller_running=False)
    if running is not None:
        bound = (running.http_config.host, running.http_config.port)
        if bound != (cfg.host, cfg.port):
            raise UserInputError(f"Ray Serve already listens on {bound[0]}:{bound[1]} in this Ray cluster, not "
                                 f"{cfg.host}:{cfg.port}: pass --host {bound[0]} --port {bound[1]}, or stop it first")
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    http = _get_global_client().http_config
    return http.host, http.port