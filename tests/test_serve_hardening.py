"""`train-food serve` on a hostile day: tokens, slow clients, a full queue, a registry that stops
answering, a second server asking for another address, and SIGTERM.

Like tests/test_serve.py: the app runs in-process on the session Ray cluster over real loopback
HTTP, serving the tiny checkpoint from its own temporary MLflow registry; the SIGTERM test runs the
real command in a subprocess with a Ray of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from test_serve import MODEL, photos, registry  # noqa: F401 - module-scoped fixtures, rebuilt for this module

from flows.cli.main import main
from ray_jobs.serving.config import ServeConfig
from ray_jobs.serving.live_model import LiveModel

TOKEN = "a-test-token-of-some-length"
REPO = Path(__file__).resolve().parents[1]


# --- without Ray ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_only_loopback_addresses_count_as_private(host, loopback):
    assert ServeConfig(host=host).loopback is loopback


def test_a_public_address_without_a_token_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRAIN_FOOD_SERVE_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0 serves beyond this machine: set --token" in err
    monkeypatch.setenv("TRAIN_FOOD_SERVE_TOKEN", "short")
    assert main(["serve", "--host", "0.0.0.0", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "$TRAIN_FOOD_SERVE_TOKEN: String should have at least 16 characters" in err


def test_the_alias_follower_reports_when_it_dies_or_the_registry_stops_answering(registry, monkeypatch):  # noqa: F811
    live = LiveModel(f"models:/{MODEL}@champion", registry, poll_s=0.2)
    try:
        time.sleep(0.5)
        assert live.problem() is None
        monkeypatch.setattr(live, "_target_version", lambda: (_ for _ in ()).throw(OSError("registry down")))
        deadline = time.monotonic() + 10
        while live.problem() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "not read for" in live.problem() and "registry down" in live.problem()
        class EndsTheLoop:  # the follower's loop ends as if stopped, though nobody stopped it
            def wait(self, timeout: float) -> bool:
                return True

            def is_set(self) -> bool:
                return False

        monkeypatch.setattr(live, "_stop", EndsTheLoop())
        live._thread.join(timeout=10)
        assert "has stopped: version 1 is frozen" in live.problem()
    finally:
        monkeypatch.undo()
        live.close()


# --- the running app -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(ray_cluster, registry) -> str:  # noqa: F811
    """The app with a token, a small batch and queue, short body and poll timeouts."""
    from ray import serve

    from ray_jobs.serving.app import start

    port = free_port()
    start(ServeConfig(tracking_uri=registry, port=port, alias_poll_s=0.5, replica_cpus=0.5, max_replicas=1,
                      max_batch_size=2, max_queued_requests=4, body_timeout_s=2.0, token=TOKEN))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.slow
def test_predict_needs_the_token_and_health_does_not(guarded, photos):  # noqa: F811
    body = photos[0].read_bytes()
    for headers in ({}, _bearer("wrong-token-of-some-length"), {"Authorization": f"Basic {TOKEN}"}):
        refused = httpx.post(f"{guarded}/predict", content=body, headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["detail"] == "missing or wrong bearer token"
    assert httpx.post(f"{guarded}/predict", content=body, headers=_bearer(TOKEN), timeout=30).status_code == 200
    assert httpx.get(f"{guarded}/health", timeout=30).json()["version"] == "1"


@pytest.mark.slow
def test_the_page_asks_for_the_token_and_sends_it_as_curl_does(guarded, browser, photos):  # noqa: F811
    page = browser.new_page()
    page.goto(guarded)
    page.wait_for_function("document.getElementById('model').textContent.includes('version 1')")
    assert page.is_visible("#token")  # /health says a token is required
    page.set_input_files("#photo", str(photos[0]))
    page.wait_for_function("document.getElementById('error').textContent.includes('needs its token')")
    page.get_by_label("This server needs its token").fill(TOKEN)
    page.press("#token", "Enter")  # classifies the chosen photo again, now with the token
    page.wait_for_selector("#result:not([hidden]) #top li")
    assert page.locator("#top li").count() == 5 and page.inner_text("#error") == ""


def _slow_client(port: int, stop: threading.Event) -> None:
    """Announces a 100 kB body, sends 10 bytes, then holds the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Length: 100000\r\n\r\n".encode() + b"\xff\xd8" + bytes(8))
        stop.wait(30)


@pytest.mark.slow
def test_sixty_four_slow_clients_do_not_keep_an_honest_one_waiting(guarded, photos):  # noqa: F811
    port = int(guarded.rsplit(":", 1)[1])
    stop = threading.Event()
    slow = [threading.Thread(target=_slow_client, args=(port, stop), daemon=True) for _ in range(64)]
    try:
        for thread in slow:
            thread.start()
        time.sleep(1.0)  # every slot taken, the queue full
        start = time.monotonic()
        honest = httpx.post(f"{guarded}/predict", content=photos[0].read_bytes(), headers=_bearer(TOKEN), timeout=30)
        took = time.monotonic() - start
        assert honest.status_code in (200, 503) and took < 10, (honest.status_code, took)
    finally:
        stop.set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # once the slow ones are dropped, the server answers as before
        after = httpx.post(f"{guarded}/predict", content=photos[0].read_bytes(), headers=_bearer(TOKEN), timeout=30)
        if after.status_code == 200:
            break
        time.sleep(0.5)
    assert after.status_code == 200


@pytest.mark.slow
def test_a_second_serve_asking_for_another_address_is_refused_with_the_bound_one(guarded, registry, capsys):  # noqa: F811
    port = int(guarded.rsplit(":", 1)[1])
    other = free_port()
    assert main(["serve", "--tracking-uri", registry, "--port", str(other), "--token", TOKEN]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train-food")]  # not Ray's logs
    assert len(ours) == 1 and f"Ray Serve already listens on 127.0.0.1:{port} in this Ray cluster" in ours[0]
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200  # the running app was left alone


@pytest.mark.slow
def test_health_fails_while_the_alias_cannot_be_read(guarded, registry):  # noqa: F811
    """Last in the module: the champion alias is deleted from the registry, then set back."""
    from mlflow import MlflowClient

    client = MlflowClient(registry, registry)
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200
    client.delete_registered_model_alias(MODEL, "champion")
    try:
        deadline, health = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            health = httpx.get(f"{guarded}/health", timeout=30)
            if health.status_code == 503:
                break
            time.sleep(0.5)
        assert health.status_code == 503 and "not read for" in health.json()["detail"], health.text
        served = httpx.post(f"{guarded}/predict", content=b"x", headers=_bearer(TOKEN), timeout=30)
        assert served.status_code == 422  # still serving the version it has
    finally:
        client.set_registered_model_alias(MODEL, "champion", "1")
    deadline = time.monotonic() + 30
    while httpx.get(f"{guarded}/health", timeout=30).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200


# --- the real command ----------------------------------------------------------------------------


def _processes_under(marker: str) -> list[str]:
    """Command lines of running processes that mention `marker` (the Ray temp dir of one command)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_sigterm_stops_serve_and_every_process_of_the_ray_it_started(trained_checkpoint, tmp_path):
    ray_tmp = Path("/tmp") / f"tfs-{os.getpid()}"  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "flows.cli.main", "serve", "--model", trained_checkpoint,
               "--port", str(free_port()), "--replica-cpus", "0.5", "--max-replicas", "1"]
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines[-20:])
        started = _processes_under(str(ray_tmp))
        assert any("DashboardAgent" in c or "dashboard/agent.py" in c for c in started), started
        assert any("runtime_env" in c.lower() for c in started), started
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while _processes_under(str(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_under(str(ray_tmp)) == []
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
