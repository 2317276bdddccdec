"""`make clean` deletes only inside the project's own workspace, and datasets or the registry only by name.

Runs the real Makefile and infra/clean.sh in a copy of the project skeleton (they need no .venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project copy with a workspace holding datasets, a registry, scratch, and a link out of it."""
    root = tmp_path / "project"
    (root / "infra").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root)
    shutil.copy(REPO / "infra" / "clean.sh", root / "infra")
    workspace = root / "workspace"
    for folder in ("datasets/food-0123", "mlflow/artifacts", "ray_results/run-1", "reports/run-1", "logs", "prefect"):
        (workspace / folder).mkdir(parents=True)
        (workspace / folder / "file").write_text("data")
    (workspace / "latest_summary.txt").write_text("summary")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.tex").write_text("precious")
    (workspace / "sweeps").symlink_to(outside)  # deleting the link must not delete its target
    return root


def make(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", "-C", str(project), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_clean_keeps_datasets_registry_and_everything_outside_the_workspace(project: Path) -> None:
    victims = [project.parent / "victim-arg", project.parent / "victim-env"]
    for victim in victims:
        victim.mkdir()
        (victim / "keep.txt").write_text("keep")
    runs = [make(project, "clean", f"WORKSPACE={victims[0]}"), make(project, "clean", env={"WORKSPACE": str(victims[1])})]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "leaving WORKSPACE=" in run.stderr
    assert listing(project / "workspace") == ["datasets", "mlflow"]
    assert (project / "workspace" / "datasets" / "food-0123" / "file").read_text() == "data"
    assert (project / "workspace" / "mlflow" / "artifacts" / "file").read_text() == "data"
    assert all((victim / "keep.txt").read_text() == "keep" for victim in victims)
    assert (project.parent / "precious" / "thesis.tex").read_text() == "precious"


def test_datasets_and_registry_go_only_when_asked_for_by_name(project: Path) -> None:
    assert make(project, "clean-datasets").returncode == 0
    assert "datasets" not in listing(project / "workspace") and "mlflow" in listing(project / "workspace")
    assert make(project, "clean-registry").returncode == 0
    assert "mlflow" not in listing(project / "workspace") and "ray_results" in listing(project / "workspace")


def test_a_workspace_that_is_a_symbolic_link_is_not_followed(project: Path) -> None:
    target = project.parent / "home"
    shutil.move(project / "workspace", target)
    (project / "workspace").symlink_to(target)
    run = make(project, "clean")
    assert run.returncode != 0 and "symbolic link" in run.stderr
    assert "ray_results" in listing(target) and "datasets" in listing(target)
