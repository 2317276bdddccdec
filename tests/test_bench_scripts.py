"""Every benchmark script still imports and parses its options: a moved module breaks them silently otherwise
(bench/open_set.py imported `auroc` from its old home for a whole round). And the recipe report keeps budgets apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if "__main__" in p.read_text())  # not its shared helpers


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


def test_the_recipe_report_pairs_each_objective_with_softmax_at_the_last_epoch(tmp_path: Path) -> None:
    """The default hands on the last epoch: the verdict on center loss must also be read there, seed by seed."""
    import json

    def record(name: str, seed: int, best: str, last: str) -> dict:
        return {"stage": "final", "name": name, "arch": "efficientnet_lite2", "image_size": 260, "epochs": 10,
                "seed": seed, "val_acc1": 0.8, "test_acc1": best.count("1") / 4, "test_compactness": 0.5,
                "test_margin": 0.4, "train_minutes": 1.0, "correct": best, "last_epoch": 10, "best_epoch": 9,
                "last_test_acc1": last.count("1") / 4, "last_correct": last}

    runs = [record("softmax", 0, "1111", "1100"), record("softmax", 1, "1111", "1000"),
            record("center", 0, "0000", "1110"), record("center", 1, "0000", "1100"),
            record("center", 2, "0000", "1111")]  # seed 2 has no softmax run: left out of the pair
    for index, run in enumerate(runs):
        (tmp_path / f"final_{index}.json").write_text(json.dumps(run))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "recipe.py"), "report", "--results", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("efficientnet_lite2 260 px, 10 epochs, last-epoch checkpoints: center 0.625 ± 0.177 minus softmax "
            "0.375 ± 0.177: +25.0 points") in done.stdout, done.stdout
    assert "seeds 0, 1\n" in done.stdout + "\n"


def test_the_recipe_report_scores_the_shipped_default_at_its_checkpoint_choice(tmp_path: Path) -> None:
    """The default now is read from the configs (backbone, epochs, objective) at the checkpoint it hands on."""
    import json

    from ray_jobs.config import ModelConfig, OptimConfig
    from ray_jobs.model.inputs import backbone_inputs

    arch = ModelConfig.model_fields["arch"].default
    epochs = OptimConfig.model_fields["epochs"].default
    now = {"stage": "final", "name": "softmax", "arch": arch, "image_size": backbone_inputs(arch).image_size,
           "epochs": epochs, "seed": 0, "val_acc1": 0.8, "test_acc1": 0.0, "test_compactness": 0.5,
           "test_margin": 0.4, "train_minutes": 1.0, "correct": "0000", "last_epoch": epochs, "best_epoch": 1,
           "last_test_acc1": 1.0, "last_correct": "1111"}
    before = now | {"name": "old recipe center", "arch": "efficientnet_lite0", "image_size": 224, "epochs": 5,
                    "test_acc1": 0.5, "correct": "1100"}
    before = {key: value for key, value in before.items() if not key.startswith("last")}
    for index, record in enumerate((now, before)):
        (tmp_path / f"final_{index}.json").write_text(json.dumps(record))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "recipe.py"), "report", "--results", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"the default now ({arch}, {epochs} epochs, last checkpoint) 1.000 minus the default before" in done.stdout
    assert "0.500: +50.0 points" in done.stdout, done.stdout


def _shipped_budget() -> str:
    """The budget folder the shipped configs name, spelled out here (not `open_set.budget_folder`) so a bench
    that stopped following them fails."""
    from ray_jobs.config import ModelConfig, OptimConfig, RunConfig

    return (f"{ModelConfig.model_fields['arch'].default}-{OptimConfig.model_fields['epochs'].default}ep-"
            f"{RunConfig.model_fields['checkpoint_choice'].default}")


def _open_set_record(split: int, unknown_classes: list[str], separated: bool) -> dict:
    """A `bench/open_set.py run` record: every detector scores 4 known photos 1-4 and 2 unknown ones either
    below all of them (AUROC 1) or amid them (AUROC 0.5)."""
    from ray_jobs.inference.detector_names import DETECTORS

    unknown = [0.0, 0.1] if separated else [2.0, 3.0]
    detectors = {name: {"threshold": 0.5, "known": [1.0, 2.0, 3.0, 4.0], "unknown": unknown} for name in DETECTORS}
    return {"split": split, "seed": 0, "unknown_classes": unknown_classes, "top1": 0.9, "knn_k": 10,
            "train_minutes": 1.0, "detectors": detectors}


def test_the_open_set_report_reads_the_shipped_budget_and_keeps_older_ones_apart(tmp_path: Path) -> None:
    """The Lite0 5-epoch best-val models must not land in the table of the shipped default (Lite2, 10, last)."""
    import json

    shipped = _shipped_budget()
    for folder, separated in ((shipped, True), ("efficientnet_lite0-5ep-best_val", False)):
        (tmp_path / folder).mkdir()
        record = _open_set_record(0, ["a", "b"], separated)
        (tmp_path / folder / "softmax-split0-seed0.json").write_text(json.dumps(record))

    def report(*options: str) -> str:
        done = subprocess.run([sys.executable, str(REPO / "bench" / "open_set.py"), "report", "--results", str(tmp_path),
                               *options], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert f"1 models (softmax, {shipped};" in report()
    assert "| msp | 1.000 | 0.000 |" in report()
    older = report("--arch", "efficientnet_lite0", "--epochs", "5", "--checkpoint-choice", "best_val")
    assert "| msp | 0.500 | 1.000 |" in older, older
    paired = report("--against-budget", "efficientnet_lite0-5ep-best_val")
    assert "| msp | +0.500 (+0.500, +0.500) | +1.000 | +1.000 |" in paired, paired


def test_the_open_set_posthoc_bench_scores_a_cached_model_of_the_shipped_budget(tmp_path: Path) -> None:
    """bench/open_set_posthoc.py reads the cache `bench/open_set.py run` writes (the shipped budget's folder,
    with pooled features), its default row ranks a far-away cluster as unknown, its per-dish table flags
    every photo of that dish, and the split's two seeds joined as one model do too."""
    import torch

    from ray_jobs.inference.open_set import DETECTOR_RANKING

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 24, generator=gen) * 6  # three known dishes and a far-away unknown one
    embed, head_w, head_b = torch.randn(12, 24, generator=gen), torch.randn(3, 12, generator=gen), torch.zeros(3)

    def photos(label: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = centers[label] + torch.randn(count, 24, generator=gen)
        features = pooled @ embed.T
        return pooled, features, features @ head_w.T + head_b

    def part(count: int, labels: range) -> tuple[torch.Tensor, tuple]:
        parts = [photos(label, count) for label in labels]
        labels_of = torch.tensor([label for label in labels for _ in range(count)])
        pooled, features, logits = (torch.cat([p[i] for p in parts]) for i in range(3))
        return pooled, (features, logits, labels_of)

    (train_p, train), (val_p, val), (known_p, known) = part(40, range(3)), part(20, range(3)), part(20, range(3))
    unknown_p, unknown = part(20, range(3, 4))
    state = {"split": 0, "train": train, "val": val, "test_known": known, "test_unknown": unknown[:2],
             "head": (head_w, head_b), "classes": ["a", "b", "c"], "unknown_classes": ["far_dish"],
             "pooled": {"train": train_p, "val": val_p, "test_known": known_p, "test_unknown": unknown_p}}
    shipped = _shipped_budget()
    (tmp_path / shipped).mkdir()
    torch.save(state, tmp_path / shipped / "softmax-split0-seed0.pt")
    # a second seed of the split (its embedding scaled: another model of the same photos), for the ensemble rows
    second = state | {part: (2 * state[part][0], *state[part][1:])
                      for part in ("train", "val", "test_known", "test_unknown")}
    torch.save(second, tmp_path / shipped / "softmax-split0-seed1.pt")
    source = tmp_path / "source"  # the ImageFolder the cache was made from: the far dish's 20 test photos
    (source / "test" / "far_dish").mkdir(parents=True)
    for index in range(20):
        (source / "test" / "far_dish" / f"{index}.jpg").touch()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "open_set_posthoc.py"), "--workspace", str(tmp_path),
                           "--source", str(source)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"2 cached models (softmax, {shipped})" in done.stdout, done.stdout
    default_row = f"| {DETECTOR_RANKING[0]} (shipped default) | 1.000 ± 0.000 | 0.000 ± 0.000 | 1.000 ± 0.000 | - | - |"
    assert default_row in done.stdout, done.stdout
    assert "on pooled features, centred, PCA 256" in done.stdout
    assert "| far_dish | 2 | 100%, 100% |  |" in done.stdout, done.stdout  # every photo of the held-out dish flagged
    assert "Two seeds of one split as one model (1 splits;" in done.stdout, done.stdout
    for joined in ("scores averaged", "on both embeddings side by side"):
        row = (f"| {DETECTOR_RANKING[0]} {joined} | 1.000 | 0.000 | 1.000 | +0.000 (+0.000, +0.000) "
               "| +0.000 (+0.000, +0.000) | 100% |")
        assert row in done.stdout, done.stdout


def test_the_pairs_draw_holds_every_dish_out_once_and_keeps_its_own_folder(tmp_path: Path) -> None:
    """`--draw pairs` partitions the dishes (the sampled draw repeats some and skips others), its records
    live apart, and `--against-budget` pairs its models with the sampled ones that held out the same dishes."""
    import json

    sys.path.insert(0, str(REPO / "bench"))
    from open_set import held_out

    dishes = [f"dish{i}" for i in range(10)]
    pairs = [held_out(dishes, split, "pairs") for split in range(5)]
    assert sorted(d for pair in pairs for d in pair) == dishes
    assert [held_out(dishes, split, "pairs") for split in range(5)] == pairs  # seeded
    sampled = [d for split in range(5) for d in held_out(dishes, split)]
    assert len(set(sampled)) < 10  # what the partition is for

    budget = "lite-1ep-last"
    (tmp_path / f"{budget}-pairs").mkdir()
    (tmp_path / budget).mkdir()
    for folder, split, unknown, separated in ((f"{budget}-pairs", 3, ["x", "y"], True), (budget, 2, ["x", "y"], False),
                                              (budget, 3, ["x", "z"], True)):
        record = _open_set_record(split, unknown, separated)
        (tmp_path / folder / f"softmax-split{split}-seed0.json").write_text(json.dumps(record))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "open_set.py"), "report", "--results", str(tmp_path),
                           "--arch", "lite", "--epochs", "1", "--checkpoint-choice", "last", "--draw", "pairs",
                           "--against-budget", budget], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 models (softmax, lite-1ep-last-pairs; splits [3]" in done.stdout, done.stdout
    assert "1 paired models (splits x seeds [(3, 0)])" in done.stdout, done.stdout
    # paired with split 2 (same dishes): +0.5; with split 3 (same number, other dishes) it would read +0.000
    assert "| msp | +0.500 (+0.500, +0.500) | +1.000 | +1.000 |" in done.stdout, done.stdout
