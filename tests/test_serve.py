"""`train-food serve`: the Ray Serve app answers like `train-food predict`, follows the champion alias
without failing a request, and turns bad uploads into one-line 4xx answers while it keeps serving.

The app runs in-process on the session Ray cluster, over real HTTP on a free loopback port, with
the tiny trained checkpoint registered twice (versions 1 and 2) in a temporary MLflow registry.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import hostile_images as hostile
import httpx
import pytest
import torch
from conftest import free_port

from flows.cli.main import main
from ray_jobs.data.image_prep import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from ray_jobs.errors import UserInputError
from ray_jobs.inference.loading import load_model
from ray_jobs.inference.open_set import DETECTOR_RANKING
from ray_jobs.inference.model_ref import parse_model_ref
from ray_jobs.inference.precision import native_bf16
from ray_jobs.inference.predict import predict_files
from ray_jobs.serving.app import classifier_deployment
from ray_jobs.serving.config import ServeConfig
from tasks.registry.config import RegisterConfig
from tasks.registry.register import register_model
from tasks.registry.store import default_tracking_uri
from tasks.serving import ServingConfig, wait_for_version

MODEL = "food-classifier"


@pytest.fixture(scope="module")
def registry(evaluation, trained_checkpoint, tmp_path_factory) -> str:
    """Versions 1 (champion), 2 and 3 (scored lower, so not promoted) of the tiny checkpoint;
    version 3's weights file is then overwritten with bytes that are not a tensor file."""
    from mlflow import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    workspace = tmp_path_factory.mktemp("serve-workspace")
    uri = default_tracking_uri(workspace)
    cfg = RegisterConfig(tracking_uri=uri, workspace=str(workspace))
    for score in (0.30, 0.10, 0.05):
        report = evaluation.model_copy(update={"metrics": {**evaluation.metrics, "test_acc1": score}})
        register_model(cfg, report, trained_checkpoint)
    broken = MlflowClient(uri, uri).get_model_version(MODEL, "3").source
    (Path(local_file_uri_to_path(broken)) / "weights.pt").write_bytes(b"not a tensor file")
    return uri


@pytest.fixture(scope="module")
def photos(sample_dir) -> list[Path]:
    """One test photo from each of five classes."""
    folders = sorted(path for path in (sample_dir / "test").iterdir() if path.is_dir())[:5]
    return [sorted(folder.glob("*.jpg"))[0] for folder in folders]


@pytest.fixture(scope="module")
def server(ray_cluster, registry) -> str:
    """The app serving models:/food-classifier@champion; Serve is shut down after the module, Ray stays."""
    from ray import serve

    from ray_jobs.serving.app import start

    port = free_port()
    start(ServeConfig(tracking_uri=registry, port=port, alias_poll_s=0.5, replica_cpus=0.5, max_replicas=1,
                      max_batch_size=8))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


# --- without Ray ---------------------------------------------------------------------------------


def test_model_sources_are_parsed_into_registry_name_alias_and_version():
    alias = parse_model_ref("models:/food-classifier@champion")
    assert (alias.name, alias.alias, alias.version) == (MODEL, "champion", None)
    pinned = parse_model_ref("models:/food-classifier/7")
    assert (pinned.name, pinned.alias, pinned.version) == (MODEL, None, "7") and pinned.uri_of("8").endswith("/8")
    path = parse_model_ref("/runs/x/checkpoint_epoch_0002")
    assert (path.name, path.alias, path.version) == ("/runs/x/checkpoint_epoch_0002", None, None)


@pytest.mark.parametrize(("options", "message"), [
    ({"url": "http://[::1"}, "not a URL"),
    ({"url": "127.0.0.1:8000"}, "not an http(s) URL with a host"),
    ({"url": "http://127.0.0.1:8000", "timeout_s": 4, "poll_s": 1}, "leaves no room for 5 answers 1 s apart"),
])
def test_bad_roll_forward_settings_are_refused_up_front(options, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        ServingConfig(**options)


def test_deployment_carries_the_configured_batching_and_autoscaling_bounds():
    cfg = ServeConfig(min_replicas=2, max_replicas=5, max_batch_size=4, replica_cpus=0.25)
    deployment = classifier_deployment(cfg)
    scaling = deployment._deployment_config.autoscaling_config  # Deployment has no public accessor for it
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 5)
    assert deployment.max_ongoing_requests == 32 and deployment.ray_actor_options["num_cpus"] == 0.25  # 2 x 4 < 32


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "no/such/checkpoint"], "--model 'no/such/checkpoint': no such checkpoint"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas: Value error, below min_replicas (3)"),
    (["--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1"),
    ([], "no model registry at "),  # the default champion, in an empty workspace
])
def test_bad_serve_options_are_one_line_errors_before_ray_starts(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["serve", "--workspace", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train-food serve: error: ") and message in err and err.count("\n") == 1


def test_a_missing_alias_is_refused_before_ray_starts(registry, capsys):
    assert main(["serve", "--tracking-uri", registry, "--model", f"models:/{MODEL}@staging"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resolve models:/{MODEL}@staging in {registry}" in err and err.count("\n") == 1


# --- the running app -----------------------------------------------------------------------------


@pytest.mark.slow
def test_health_names_the_champion_version(server):
    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["open_set"].startswith(f"detector {DETECTOR_RANKING[0]}, threshold ")  # the calibration's default
    served_in = "bf16" if native_bf16(torch.device("cpu")) else "fp32"  # --precision auto on this machine
    assert {k: v for k, v in health.items() if k != "open_set"} == {
        "status": "ok", "model": MODEL, "version": "1", "alias": "champion", "classes": 10, "image_size": 32,
        "precision": served_in, "calibration_precision": served_in, "threads": 1,
        "token_required": False, "max_body_bytes": 64 * 2**20}


@pytest.mark.slow
def test_predict_answers_like_the_predict_command(server, photos, trained_checkpoint):
    expected, failures = predict_files(load_model(trained_checkpoint), [str(p) for p in photos], top_k=5)
    assert failures == []
    for photo, reference in zip(photos, expected, strict=True):
        response = httpx.post(f"{server}/predict", content=photo.read_bytes(), timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"], body["unknown"]) == (MODEL, "1", reference.unknown)
        assert body["detector"] == reference.detector == DETECTOR_RANKING[0]
        assert body["score"] == pytest.approx(reference.score, rel=1e-4, abs=1e-4)  # abs: can be near 0
        assert body["threshold"] == reference.threshold
        assert [row["class"] for row in body["top"]] == [name for name, _ in reference.top]
        assert [row["probability"] for row in body["top"]] == pytest.approx([p for _, p in reference.top], abs=1e-5)


@pytest.mark.slow
def test_concurrent_requests_are_batched_without_mixing_answers(server, photos):
    """More clients than the batch size: every answer still belongs to its own photo."""
    alone = {p: httpx.post(f"{server}/predict", content=p.read_bytes(), timeout=30).json()["top"] for p in photos}
    results: dict[int, tuple[Path, list]] = {}

    def ask(index: int) -> None:
        photo = photos[index % len(photos)]
        results[index] = (photo, httpx.post(f"{server}/predict", content=photo.read_bytes(), timeout=60).json()["top"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 20
    for photo, top in results.values():
        assert [r["class"] for r in top] == [r["class"] for r in alone[photo]]
        assert [r["probability"] for r in top] == pytest.approx([r["probability"] for r in alone[photo]], abs=1e-5)


def _expect_refusal(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail


@pytest.mark.slow
def test_bad_uploads_get_one_line_4xx_and_the_server_keeps_serving(server, photos, tmp_path):
    post = f"{server}/predict"
    _expect_refusal(httpx.post(post, content=b"", timeout=30), 400, "request body: empty")
    _expect_refusal(httpx.post(post, content=b"just some text, not a photo", timeout=30), 422,
                    "request body: not a readable image")
    side = int(MAX_IMAGE_PIXELS**0.5) + 1024  # a real PNG bomb: a few kB promising ~80 M pixels
    _expect_refusal(httpx.post(post, content=hostile.png_bomb(side, side), timeout=30), 422,
                    "request body: decompression bomb")
    for width, height in ((65536, 1), (1, 65536)):  # 178 bytes each; resized, once 5 GB of a replica's memory
        _expect_refusal(httpx.post(post, content=hostile.png_bomb(width, height), timeout=30), 422,
                        f"request body: image {width} x {height}: a side over the limit of 16,384 pixels")
    _expect_refusal(httpx.post(post, files={"image": photos[0].read_bytes()}, timeout=30), 415,
                    "not a multipart form")

    def chunks(total: int, size: int = 2**20):  # streamed without Content-Length (chunked)
        for start in range(0, total, size):
            yield b"\0" * min(size, total - start)

    _expect_refusal(httpx.post(post, content=chunks(MAX_FILE_BYTES + 2**20), timeout=60), 413,
                    "too large to be a photo (over ")
    good = httpx.post(post, content=photos[0].read_bytes(), timeout=30)
    assert good.status_code == 200 and len(good.json()["top"]) == 5


@pytest.mark.slow
def test_a_declared_huge_upload_is_refused_before_its_body_is_sent(server):
    """Content-Length promises 1 TB and no byte follows: the 413 comes back anyway, so nothing was read."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {10**12}\r\n\r\n".encode())
        reply = b""
        while b"}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    assert b"too large to be a photo (1,000,000,000,000 bytes, limit 67,108,864)" in body


@pytest.mark.slow
def test_moving_the_champion_alias_switches_versions_without_a_failed_request(server, registry, photos):
    """Four clients keep asking while @champion moves from version 1 to 2: no error, and the answers'
    version goes from 1 to 2 (never back: the replica swaps only once the new model is loaded)."""
    from mlflow import MlflowClient

    stop = threading.Event()
    answers: list[list[str]] = [[] for _ in range(4)]
    errors: list[str] = []

    def client(seen: list[str]) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    response = http.post(f"{server}/predict", content=photos[0].read_bytes())
                    response.raise_for_status()
                    seen.append(response.json()["version"])
                except httpx.HTTPError as err:
                    errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(seen,)) for seen in answers]
    for thread in threads:
        thread.start()
    try:
        _wait_for(lambda: sum(map(len, answers)) >= 8, "answers from version 1")
        MlflowClient(registry, registry).set_registered_model_alias(MODEL, "champion", "2")
        _wait_for(lambda: all(seen and seen[-1] == "2" for seen in answers), "every client answered by version 2")
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    every = [version for seen in answers for version in seen]
    assert set(every) == {"1", "2"} and every.count("1") >= 8
    for seen in answers:
        assert seen == sorted(seen), "a client saw version 1 after version 2"
    assert httpx.get(f"{server}/health", timeout=30).json()["version"] == "2"


def _wait_for(condition, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_an_alias_moved_to_a_version_that_does_not_load_keeps_the_old_one_serving(server, registry, photos):
    from mlflow import MlflowClient

    MlflowClient(registry, registry).set_registered_model_alias(MODEL, "champion", "3")
    time.sleep(3.0)  # six alias checks, each refusing version 3 (the first one tries to load it)
    response = httpx.post(f"{server}/predict", content=photos[0].read_bytes(), timeout=30)
    assert response.status_code == 200 and response.json()["version"] == "2"
    assert httpx.get(f"{server}/health", timeout=30).json()["version"] == "2"


def test_the_flow_roll_forward_step_waits_for_the_new_champion_and_says_what_it_saw(server, registry):
    """`tasks.serving.wait_for_version` (the flow's `serving_url` step) returns once /health names the
    version the alias moved to; it fails in one line for a version that never comes and for no server."""
    from mlflow import MlflowClient

    served = httpx.get(f"{server}/health", timeout=30).json()["version"]
    target = "1" if served == "2" else "2"
    MlflowClient(registry, registry).set_registered_model_alias(MODEL, "champion", target)
    seconds = wait_for_version(ServingConfig(url=server, timeout_s=60, poll_s=0.1, confirmations=3), MODEL, target)
    assert seconds >= 2 * 0.1  # three answers in a row, 0.1 s apart
    assert httpx.get(f"{server}/health", timeout=30).json()["version"] == target
    with pytest.raises(UserInputError) as refused:
        wait_for_version(ServingConfig(url=server, timeout_s=1, poll_s=0.1), MODEL, served)
    assert str(refused.value) == (f"serving: {server} did not answer with {MODEL} version {served} 5 times in a "
                                  f"row within 1 s (last answer: {MODEL} version {target}, 0 in a row)")
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserInputError, match=rf"^serving: {nobody} did not answer .* \(last answer: ConnectError: .*, 0 in"):
        wait_for_version(ServingConfig(url=nobody, timeout_s=0.5, poll_s=0.1), MODEL, target)
