"""The `train-food` flow end to end: under Prefect's test harness, and as a served deployment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

TINY = dict(image_size=32, batch_size=16, feat_dim=16, max_side=64, limit_per_split=32, loader_workers=0, epochs=1)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def registry(workspace: Path):
    import mlflow

    from tasks.registry.store import default_tracking_uri

    uri = default_tracking_uri(workspace)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_flow_sweeps_evaluates_registers_then_hits_the_ingest_cache(prefect_harness, ray_cluster, tmp_path):
    from prefect import get_client

    from flows.train_food import train_food

    first = train_food(workspace=str(tmp_path), sweep=True, loss="center", sweep_samples=2, workers=1,
                       cpus_per_worker=0.5, **TINY)
    assert first["ingest_cached"] is False
    counts = first["counts"]
    assert set(counts) == {"train", "val", "test"} and counts["test"] == 160 and sum(counts.values()) == 800
    assert first["sweep_trials"] == 2 and first["run_name"].startswith("sweep-")
    assert Path(first["checkpoint"], "checkpoint.pt").is_file()
    assert Path(first["report"]).is_file() and all(Path(p).is_file() for p in first["plots"].values())
    assert {"sweep_plot", "confusion_matrix_png"} <= set(first["plots"])
    assert 0.0 <= first["test_acc1"] <= first["test_acc5"] <= 1.0
    assert first["champion"] and first["model_uri"] == "models:/food-classifier/1"
    client = registry(tmp_path)
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "1"
    assert (tmp_path / "sweeps" / first["run_name"] / "trials.csv").is_file()

    second = train_food(workspace=str(tmp_path), sweep=False, workers=0, **TINY)
    assert second["ingest_cached"] is True, "unchanged source and options: ingestion comes from the cache"
    assert second["model_uri"] == "models:/food-classifier/2"
    assert len(client.search_model_versions("name='food-classifier'")) == 2

    async def artifacts_and_logs() -> tuple[dict[str, list], list[str]]:
        from prefect.logging.handlers import APILogHandler

        await APILogHandler.aflush()
        async with get_client() as prefect:
            found: dict[str, list] = {}
            for artifact in await prefect.read_artifacts():
                found.setdefault(artifact.key, []).append(artifact)
            return found, [log.message for log in await prefect.read_logs()]

    import asyncio
    import base64

    found, logs = asyncio.run(artifacts_and_logs())
    assert {"train-food-summary", "sweep-trials"} <= set(found)
    # Live progress: each stage's bar, ended at 100% (the second ingest was a cache hit: also 100%).
    assert [artifact.type for artifact in found["ingest-progress"]] == ["progress"] * 2
    for key, runs in (("ingest-progress", 2), ("sweep-progress", 1), ("training-progress", 1)):
        assert [float(artifact.data) for artifact in found[key]] == [100.0] * runs, key
    # The epoch lines are in the flow runs' logs, once each: 2 sweep trials and 1 training run, 1 epoch each.
    epoch_lines = [message for message in logs if "epoch 1/1  loss" in message]
    assert len(epoch_lines) == 3, epoch_lines
    assert sum(message.startswith("trial ") for message in epoch_lines) == 2
    # The plots are inline PNGs (the UI cannot open file:// links): the newest summary embeds this run's files.
    summary = max(found["train-food-summary"], key=lambda artifact: artifact.created).data
    embedded = dict(re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", summary))
    assert set(embedded) == set(second["plots"]) and "file://" not in summary
    for role, encoded in embedded.items():
        assert base64.b64decode(encoded) == Path(second["plots"][role]).read_bytes()


@pytest.mark.slow
def test_flow_fails_with_the_stage_message_on_a_missing_source(prefect_harness, tmp_path):
    from flows.train_food import train_food
    from ray_jobs.errors import UserInputError

    with pytest.raises(UserInputError, match="nowhere"):
        train_food(source=str(tmp_path / "nowhere"), workspace=str(tmp_path), workers=0, **TINY)
    assert not (tmp_path / "mlflow").exists(), "nothing registered after a failed ingest"


def test_run_rejects_bad_parameters_naming_them(capsys):
    from flows.cli.main import main

    assert main(["run", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["run", "--loss", "arcface"])
    assert exited.value.code == 2 and "--loss" in capsys.readouterr().err
    assert main(["run", "--serving-url", "localhost:8000"]) == 2  # refused before any training, not after
    err = capsys.readouterr().err
    assert "--serving-url" in err and "not an http(s) URL with a host" in err and err.count("\n") == 1


def _wait(condition, seconds: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    pytest.fail(f"{what} not ready after {seconds}s; logs in {logs}")


@pytest.mark.slow
def test_deployment_runs_on_a_real_prefect_server(tmp_path):
    bin_dir = Path(sys.executable).parent
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS", "MLFLOW_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    workspace = tmp_path / "ws"
    logs = tmp_path / "logs"
    logs.mkdir()
    started = []
    try:
        started.append(subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                         "--port", str(port)], env=env, start_new_session=True,
                                        stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT))

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{api}/health", timeout=2).status == 200
            except OSError:
                return False

        _wait(healthy, 120, "Prefect server", logs)
        started.append(subprocess.Popen([str(bin_dir / "train-food"), "deploy"], env=env, start_new_session=True,
                                        stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT))
        prefect = str(bin_dir / "prefect")
        _wait(lambda: subprocess.run([prefect, "deployment", "inspect", "train-food/train-food"], env=env,
                                     capture_output=True).returncode == 0, 120, "deployment", logs)
        params = [f"-p{key}={value}" for key, value in TINY.items()] + [f"-pworkspace={workspace}", "-pworkers=0"]
        run = subprocess.run([prefect, "deployment", "run", "train-food/train-food", "--watch", *params],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (logs / "serve.log").read_text()[-3000:]
        assert "Completed" in run.stdout
        summary = (workspace / "latest_summary.txt").read_text()
        assert "registered models:/food-classifier/1" in summary
        assert re.search(r"^run train-\S+: softmax$", summary, re.MULTILINE)  # no lambda or alpha: it has none
        assert str(registry(workspace).get_model_version_by_alias("food-classifier", "champion").version) == "1"
    finally:
        for process in reversed(started):
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
