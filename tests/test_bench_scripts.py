"""Every benchmark script still imports and parses its options: a moved module breaks them silently otherwise
(bench/open_set.py imported `auroc` from its old home for a whole round). And the recipe report keeps budgets apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "bench").glob("*.py"))


def test_there_are_benchmarks_to_check() -> None:
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_the_script_imports_and_shows_its_help(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_recipe_report_keeps_runs_of_other_budgets_apart(tmp_path: Path) -> None:
    """10-epoch runs once landed in the 5-epoch row of the same objective and moved every paired figure."""
    import json

    def record(epochs: int, correct: str) -> dict:
        return {"stage": "final", "name": "softmax", "arch": "efficientnet_lite0", "image_size": 224, "epochs": epochs,
                "seed": 0, "val_acc1": 0.8, "test_acc1": correct.count("1") / len(correct), "test_compactness": 0.5,
                "test_margin": 0.4, "train_minutes": 1.0, "correct": correct}

    for epochs, correct in ((5, "1100"), (10, "1110")):
        (tmp_path / f"final_{epochs}.json").write_text(json.dumps(record(epochs, correct)))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "recipe.py"), "report", "--results", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| softmax")]
    assert [row.split(" | ")[5] for row in rows] == ["0.500", "0.750"], rows  # each budget its own test top-1
    assert "softmax: 10 epochs minus 5: +25.0 points" in done.stdout
