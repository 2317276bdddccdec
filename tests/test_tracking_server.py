"""The `train-food` flow against a real `mlflow server`: every run, trial, file and alias goes over HTTP.

The server has its own SQLite store and proxies artifacts (`--artifacts-destination`), so the
client uploads files through the server and never learns a local path. Everything is then read
back through the server's REST API, and the workspace's own embedded registry must stay absent.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from test_flow import TINY, prefect_harness  # noqa: F401 - prefect_harness is a fixture used below

pytestmark = pytest.mark.slow

MODEL = "food-classifier"
STARTUP_SECONDS = 300  # import + schema migration: 20-80 s seen here with other jobs on the 2 CPUs
STOP_SECONDS = 20


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI, uvicorn and its workers); SIGKILL what is left after a while."""
    with suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        server.wait(timeout=STOP_SECONDS)
    with suppress(ProcessLookupError):  # a child that outlived the server, or a server deaf to SIGTERM
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=STOP_SECONDS)


@dataclass(frozen=True)
class MlflowServer:
    url: str
    root: Path  # its SQLite store, artifact destination, cwd and log
    process: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.root / "server.log"


@pytest.fixture
def mlflow_server_process(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server` on a free loopback port, started (not yet ready); stopped at teardown even on failure.

    Its backend is a SQLite file and its artifacts are proxied to a folder of its own; the server's
    cwd is that folder too, so a stray `./mlruns` or `./mlartifacts` could not land anywhere else.
    """
    root = tmp_path / "mlflow-server"
    root.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes (GenAI jobs) on 2 CPUs
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    with (root / "server.log").open("w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield MlflowServer(url=f"http://127.0.0.1:{port}", root=root, process=process)
    finally:
        _stop(process)


@pytest.fixture
def mlflow_server(mlflow_server_process: MlflowServer, prefect_harness, ray_cluster) -> MlflowServer:  # noqa: F811
    """The server once `/health` answers; waiting after Prefect and Ray have started overlaps their start-ups."""
    server = mlflow_server_process
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _healthy(server.url):
        if server.process.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.process.returncode} before answering {server.url}/health; "
                        f"log tail:\n{_tail(server.log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer {server.url}/health within {STARTUP_SECONDS}s; "
                        f"log tail:\n{_tail(server.log)}")
        time.sleep(0.5)
    return server


def test_sweep_flow_logs_trials_artifacts_and_champion_through_a_tracking_server(
    mlflow_server: MlflowServer, ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import mlflow

    from flows.train_food import train_food
    from ray_jobs.inference.loading import load_model
    from tasks.tune import PARENT_TAG, SWEEP_TAG, TRIAL_TAG

    url, server_root = mlflow_server.url, mlflow_server.root
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's own fallbacks are cwd-relative (./mlruns, ./mlflow.db): catch them here
    workspace = tmp_path / "ws"
    gcs = ray_cluster.get_runtime_context().gcs_address

    summary = train_food(workspace=str(workspace), sweep=True, loss="center", sweep_samples=2, workers=1,
                         cpus_per_worker=0.5,
                         mlflow_uri=url, **TINY)

    assert ray_cluster.get_runtime_context().gcs_address == gcs, "the flow joined the session's Ray cluster"
    assert summary["sweep_trials"] == 2 and summary["model_uri"] == f"models:/{MODEL}/1" and summary["champion"]
    sweep = summary["run_name"]

    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.get_experiment_by_name("train-food")
    assert experiment is not None, "the flow created its experiment on the server"
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), (
        f"the server, not the client, decides where artifacts go: {experiment.artifact_location}")

    # The sweep: one parent run and one nested run per trial, each tagged with its parent.
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in runs]
    parent = parents[0]
    trials = [run for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(runs) == 3 and len(trials) == 2
    assert len({run.data.tags[TRIAL_TAG] for run in trials}) == 2
    assert all({"lam", "alpha"} <= set(run.data.params) for run in trials)
    assert all(client.get_metric_history(run.info.run_id, "val_acc1") for run in trials)
    assert parent.data.metrics["trials"] == 2
    sweep_files = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"trials.csv", "trials.parquet", "sweep.png"} <= sweep_files, sweep_files

    # The champion, found by its alias, and the registration run's files, listed and read back via HTTP.
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1" and version.tags["sweep"] == sweep
    assert version.source.startswith("mlflow-artifacts:"), version.source
    register_run = client.get_run(version.run_id)
    assert register_run.info.artifact_uri.startswith("mlflow-artifacts:"), register_run.info.artifact_uri
    evaluation = {Path(f.path).name: f for f in client.list_artifacts(version.run_id, "evaluation")}
    plots = {Path(path).name for role, path in summary["plots"].items() if role != "sweep_plot"}
    assert plots == {"confusion_matrix.png", "projection.png"} and plots | {"report.json"} <= set(evaluation)
    assert all(evaluation[name].file_size > 1000 for name in plots)
    assert {Path(f.path).name for f in client.list_artifacts(version.run_id, "model")} >= {"MLmodel", "weights.pt"}
    fetched = Path(client.download_artifacts(version.run_id, "evaluation/report.json", str(tmp_path)))
    assert fetched.read_bytes() == Path(summary["report"]).read_bytes()
    stored = list((server_root / "artifacts").rglob("weights.pt"))
    assert len(stored) == 1, "the model's files were uploaded into the server's artifact destination"
    champion = load_model(f"models:/{MODEL}@champion", tracking_uri=url)
    assert champion.classes == json.loads(fetched.read_text())["classes"]

    # The flow used the server only: no embedded registry in the workspace, no MLflow fallback in the cwd.
    assert not (workspace / "mlflow").exists(), sorted(p.name for p in (workspace / "mlflow").iterdir())
    assert not [p.name for p in cwd.iterdir() if p.name.startswith(("mlruns", "mlartifacts", "mlflow"))]


class _DroppingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the real server; the answers to the first `server.drops` create-version
    requests are dropped (the connection closes unanswered), as a flaky network would lose them."""

    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        request = urllib.request.Request(self.server.target + self.path, data=body, method=self.command,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                status, answer_headers, data = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as err:
            status, answer_headers, data = err.code, err.headers, err.read()
        if self.path.startswith("/api/2.0/mlflow/model-versions/create") and self.server.drops > 0:
            self.server.drops -= 1
            self.close_connection = True  # the server made the version; the client never hears of it
            return
        self.send_response(status)
        for key, value in answer_headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


def test_a_lost_create_version_answer_still_leaves_one_version(
    mlflow_server: MlflowServer, evaluation, trained_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import mlflow

    from tasks.registry.config import RegisterConfig
    from tasks.registry.register import register_model

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # MLflow's defaults back off for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DroppingProxy)
    proxy.target, proxy.drops = mlflow_server.url, 1
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        result = register_model(RegisterConfig(tracking_uri=url, workspace=str(tmp_path / "ws")), evaluation,
                                trained_checkpoint)
    finally:
        proxy.shutdown()
    assert proxy.drops == 0, "the proxy never dropped an answer"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == [result.version] and result.champion
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == result.version
