"""The fine-tuning recipe part by part, and center loss against softmax in a paired, fair fight.

Every run trains in local mode on food101_mini10, scores its best-by-val checkpoint on the test split
and is stored as one JSON file under --results (its config, wall time, val and test top-1, test
compactness and margin, and which test photos it got right). A run whose file exists is skipped, so
the bench resumes where a session stopped; `report` reads whatever is there.

    python bench/recipe.py ablate [--seeds 0 1]     # Lite0, 128 px, softmax: old recipe, new, new minus each part
    python bench/recipe.py grid [--seeds 0 1]       # lambda x alpha of center and contrastive_center, on val
    python bench/recipe.py final [--arch efficientnet_lite0] [--seeds 0 1 2]
    python bench/recipe.py last                     # also score each final run's last checkpoint (if kept)
    python bench/recipe.py report                   # markdown tables for docs/results.md

Paired difference of an objective against softmax: per seed, the same test photos, the same data
order and initial weights; the 95% interval is a bootstrap over photos (resampled alike in every seed)
of the mean over seeds of the accuracy difference.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_jobs.config import (  # noqa: E402
    DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig,
)
from ray_jobs.data.parquet import ParquetImageDataset  # noqa: E402
from ray_jobs.inference.loading import model_from_checkpoint  # noqa: E402
from ray_jobs.metrics import classification_metrics  # noqa: E402
from ray_jobs.model.checkpoint import stored_checkpoints  # noqa: E402
from ray_jobs.model.inputs import backbone_inputs, eval_preprocessing  # noqa: E402
from ray_jobs.training.engine import Precision, predict  # noqa: E402
from ray_jobs.training.trainer import fit  # noqa: E402
from tasks.ingest.config import FINGERPRINT_FIELD, IngestConfig  # noqa: E402
from tasks.ingest.pipeline import ingest  # noqa: E402
from summaries import mean_sd  # noqa: E402  (bench/, beside this script)

SOURCE = REPO.parent / "shared" / "data" / "food101_mini10"
# The code before this recipe, spelled out: crop and flip only, bilinear, no smoothing, no drop-path,
# every parameter decayed, fp32 on CPU.
OLD = {"augment": "crop_flip", "random_erasing": 0.0, "interpolation": "bilinear", "label_smoothing": 0.0,
       "drop_path_rate": 0.0, "decay_norm_and_bias": True, "precision": "fp32"}
NEW = {"augment": "trivialaugment", "random_erasing": 0.25, "interpolation": "bicubic", "label_smoothing": 0.1,
       "drop_path_rate": 0.1, "decay_norm_and_bias": False, "precision": "auto"}


def default_recipe() -> dict[str, Any]:
    """The recipe a user gets today: the config's defaults (set from the ablation's figures)."""
    fields = {"augment": DataConfig, "random_erasing": DataConfig, "label_smoothing": LossConfig,
              "decay_norm_and_bias": OptimConfig, "ema_decay": OptimConfig, "precision": ScalingConfig}
    recipe = {key: config.model_fields[key].default for key, config in fields.items()}
    return recipe | {"interpolation": "bicubic", "drop_path_rate": 0.1}  # Lite's pretrained config and default


ABLATIONS = {  # name -> change to NEW
    "old recipe": OLD,
    "new recipe": {},
    "- trivialaugment": {"augment": "crop_flip"},
    "randaugment instead": {"augment": "randaugment"},
    "- random erasing": {"random_erasing": 0.0},
    "- bicubic (bilinear)": {"interpolation": "bilinear"},
    "- label smoothing": {"label_smoothing": 0.0},
    "- drop-path": {"drop_path_rate": 0.0},
    "- no-decay groups": {"decay_norm_and_bias": True},
    "- bf16 (fp32)": {"precision": "fp32"},
    "+ EMA 0.99": {"ema_decay": 0.99},
    # Second round: every part whose removal did not lower mean val top-1 removed at once, RandAugment
    # for TrivialAugment (it scored higher); with the backbone's bicubic and with bilinear (val and test disagreed).
    "chosen, bicubic": {"augment": "randaugment", "random_erasing": 0.0, "label_smoothing": 0.0, "drop_path_rate": 0.0},
    "chosen, bilinear": {"augment": "randaugment", "random_erasing": 0.0, "label_smoothing": 0.0, "drop_path_rate": 0.0,
                         "interpolation": "bilinear"},
}
DEFAULT_EPOCHS = 5  # the budget of every run unless --epochs says otherwise (the report names other budgets)
GRID = {"center": {"lam": (0.01, 0.1, 1.0), "alpha": (0.1, 0.5)},
        "contrastive_center": {"lam": (0.1, 1.0, 10.0), "alpha": (0.1, 0.5)}}


@dataclass(frozen=True)
class Run:
    """One training run of the bench: what it trains and under which key its result is stored."""

    stage: str
    name: str
    arch: str
    image_size: int
    epochs: int
    seed: int
    recipe: dict[str, Any]
    loss: dict[str, Any]

    @property
    def key(self) -> str:
        loss = "-".join(f"{k}{v}" for k, v in sorted(self.loss.items()))
        recipe = "-".join(f"{k}{v}" for k, v in sorted(self.recipe.items())) or "default"
        return f"{self.stage}_{self.arch}_{self.image_size}px_{self.epochs}ep_s{self.seed}_{loss}_{recipe}".replace(" ", "")

    def config(self, dataset: str, storage: str) -> TrainConfig:
        recipe = {**NEW, **self.recipe}
        return TrainConfig(
            data=DataConfig(dataset=dataset, image_size=self.image_size, batch_size=32, loader_workers=1,
                            augment=recipe["augment"], random_erasing=recipe["random_erasing"],
                            interpolation=recipe["interpolation"]),
            model=ModelConfig(arch=self.arch, drop_path_rate=recipe["drop_path_rate"]),
            loss=LossConfig(label_smoothing=recipe["label_smoothing"], **self.loss),
            optim=OptimConfig(epochs=self.epochs, warmup_epochs=1, decay_norm_and_bias=recipe["decay_norm_and_bias"],
                              ema_decay=recipe.get("ema_decay")),
            scaling=ScalingConfig(num_workers=0, precision=recipe["precision"]),
            run=RunConfig(storage_path=storage, name=self.key[:180], seed=self.seed, keep_checkpoints=1,
                          checkpoint_choice="best_val"),  # `last` scores the last epoch beside it
        )


def plan(stage: str, args: argparse.Namespace) -> list[Run]:
    if stage == "ablate":
        return [Run("ablate", name, "efficientnet_lite0", 128, args.epochs, seed, change, {"kind": "softmax"})
                for seed in args.seeds for name, change in ABLATIONS.items()]
    if stage == "grid":
        softmax = [Run("grid", "softmax", "efficientnet_lite0", 128, args.epochs, seed, default_recipe(),
                       {"kind": "softmax"}) for seed in args.seeds]
        return softmax + [Run("grid", f"{kind} lam {lam:g} alpha {alpha:g}", "efficientnet_lite0", 128, args.epochs,
                              seed, default_recipe(), {"kind": kind, "lam": lam, "alpha": alpha})
                          for seed in args.seeds for kind, grid in GRID.items() for lam in grid["lam"]
                          for alpha in grid["alpha"]]
    size = args.image_size or backbone_inputs(args.arch).image_size
    chosen = json.loads(Path(args.objectives).read_text()) if args.objectives else best_of_grid(Path(args.results))
    runs = [Run("final", name, args.arch, size, args.epochs, seed, default_recipe(), loss)
            for seed in args.seeds for name, loss in chosen.items()]
    old_losses = {"softmax": {"kind": "softmax"}, "center": {"kind": "center"}}  # the old code's lam 0.1 alpha 0.1
    runs += [Run("final", f"old recipe {name}", args.arch, size, args.epochs, seed, OLD, old_losses[name])
             for name in args.old_rows for seed in args.seeds]
    return runs


def best_of_grid(results: Path) -> dict[str, dict[str, Any]]:
    """softmax, and each center objective at the lambda and alpha with the best mean val top-1 of the grid."""
    chosen: dict[str, dict[str, Any]] = {"softmax": {"kind": "softmax"}}
    records = [json.loads(path.read_text()) for path in results.glob("grid_*.json")]
    for kind in GRID:
        scores: dict[tuple[float, float], list[float]] = {}
        for record in records:
            if record["loss"]["kind"] == kind:
                scores.setdefault((record["loss"]["lam"], record["loss"]["alpha"]), []).append(record["val_acc1"])
        if not scores:
            raise SystemExit(f"no grid results for {kind} under {results}: run `bench/recipe.py grid` first")
        (lam, alpha), _ = max(scores.items(), key=lambda item: (len(item[1]), statistics.mean(item[1])))
        chosen[kind] = {"kind": kind, "lam": lam, "alpha": alpha}
    return chosen


def dataset_for(image_size: int, workspace: Path) -> str:
    """food101_mini10 ingested once per size, long side twice the eval resize (as the results so far)."""
    max_side = round(image_size * 256 / 224) * 2
    out = workspace / f"food101_mini10-{max_side}-{FINGERPRINT_FIELD}"  # another ingest code, another folder
    return ingest(IngestConfig(src=str(SOURCE), out=str(out), max_side=max_side)).out


def score(checkpoint: str, dataset: str) -> dict[str, Any]:
    """Test top-1/top-5, compactness, margin to the nearest other class mean, and the photos it got right."""
    loaded = model_from_checkpoint(checkpoint)
    test = ParquetImageDataset(dataset, "test", eval_preprocessing(loaded.config))
    features, logits, labels = predict(loaded.net, DataLoader(test, batch_size=50), torch.device("cpu"),
                                       Precision(torch.device("cpu"), "fp32"))
    metrics = classification_metrics(features, logits, labels, len(loaded.classes), "test")
    means = torch.stack([features[labels == c].mean(0) for c in range(len(loaded.classes))])
    distances = torch.cdist(features, means)
    own = distances.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = distances.scatter(1, labels.unsqueeze(1), float("inf")).min(1).values
    metrics["test_margin"] = float(((others - own) / metrics["test_inter"]).mean())
    metrics["correct"] = "".join("1" if ok else "0" for ok in (logits.argmax(1) == labels).tolist())
    return metrics


def execute(run: Run, results: Path, workspace: Path) -> dict[str, Any]:
    path = results / f"{run.key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    dataset = dataset_for(run.image_size, workspace)
    cfg = run.config(dataset, str(workspace / "runs"))
    start = time.perf_counter()
    result = fit(cfg)
    minutes = (time.perf_counter() - start) / 60
    best = result.checkpoint_metrics
    record = {"stage": run.stage, "name": run.name, "arch": run.arch, "image_size": run.image_size,
              "epochs": run.epochs, "seed": run.seed, "recipe": {**NEW, **run.recipe}, "loss": run.loss,
              "dataset": Path(dataset).name,  # names the ingest build (its fingerprint)
              "train_minutes": round(minutes, 2), "best_epoch": best["epoch"], "val_acc1": best["val_acc1"],
              "last_val_acc1": result.history[-1]["val_acc1"], "precision": result.history[-1].get("precision"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip(),
              **score(result.checkpoint, dataset)}
    results.mkdir(parents=True, exist_ok=True)
    _store(path, record)
    return record


def _store(path: Path, record: dict[str, Any]) -> None:
    """Write a run's record whole or not at all (a session may end mid-write)."""
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    path.with_suffix(".tmp").rename(path)


def score_last(results: Path, workspace: Path) -> None:
    """Test top-1 of each final run's last-epoch checkpoint, beside its best-by-val one (150 val photos pick
    noisily). The runs keep their last checkpoint; a record whose run folder is gone is left as it is."""
    for path in sorted(results.glob("final_*.json")):
        record = json.loads(path.read_text())
        if "last_test_acc1" in record:
            continue
        found = stored_checkpoints(str(workspace / "runs" / path.stem[:180]))
        if not found:
            continue
        last = found[-1]
        dataset = (str(workspace / record["dataset"]) if "dataset" in record  # older records: today's build of
                   else dataset_for(record["image_size"], workspace))  # that size, the one they trained on
        scored = record if last.epoch == record["best_epoch"] else score(f"{last.path}/checkpoint.pt", dataset)
        record |= {"last_epoch": last.epoch, "last_test_acc1": scored["test_acc1"], "last_correct": scored["correct"]}
        _store(path, record)
        print(f"{path.stem[:90]}: best-val epoch {record['best_epoch']} test {record['test_acc1']:.3f}, "
              f"last epoch {last.epoch} test {scored['test_acc1']:.3f}", flush=True)


# ---- report -----------------------------------------------------------------------------------------


def paired_difference(runs: list[dict], baseline: list[dict], draws: int = 2000) -> tuple[float, float, float]:
    """Mean over paired seeds of (this - baseline) test top-1, and a 95% bootstrap interval over photos."""
    pairs = [(run["correct"], base["correct"]) for run in runs for base in baseline if base["seed"] == run["seed"]]
    if not pairs:
        return float("nan"), float("nan"), float("nan")
    diffs = [[int(a) - int(b) for a, b in zip(x, y, strict=True)] for x, y in pairs]
    photos = len(diffs[0])
    point = statistics.mean(sum(d) / photos for d in diffs)
    rng = random.Random(0)
    boots = []
    for _ in range(draws):
        sample = [rng.randrange(photos) for _ in range(photos)]
        boots.append(statistics.mean(sum(d[i] for i in sample) / photos for d in diffs))
    boots.sort()
    return point, boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1]


Group = tuple[str, str, int, int]  # run name, arch, image size, epochs


def report(results: Path) -> str:
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    lines = []
    for stage in ("ablate", "grid", "final"):
        groups: dict[Group, list[dict]] = {}
        for record in records:
            if record["stage"] == stage:
                key = (record["name"], record["arch"], record["image_size"], record["epochs"])
                groups.setdefault(key, []).append(record)
        if not groups:
            continue
        lines += [f"\n### {stage}\n", "| run | arch | px | seeds | val top-1 (best) | test top-1 | test compactness "
                  "| test margin | paired vs baseline (95% CI) | train min/run |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (name, arch, size, epochs), done in sorted(groups.items(), key=lambda item: (item[0][1], item[0][3],
                                                                                         item[0][0])):
            base_name = {"ablate": "new recipe", "grid": "softmax",  # final: old rows against the same objective
                         "final": name.removeprefix("old recipe ") if name.startswith("old") else "softmax"}
            base = groups.get((base_name.get(stage, ""), arch, size, epochs), [])
            diff, low, high = paired_difference(done, base) if base and base is not done else (float("nan"),) * 3
            paired = "-" if diff != diff else f"{100 * diff:+.1f} ({100 * low:+.1f}, {100 * high:+.1f})"
            lines.append(
                f"| {_label(name, epochs)} | {arch} | {size} | {', '.join(str(r['seed']) for r in done)} "
                f"| {mean_sd([r['val_acc1'] for r in done])} | {mean_sd([r['test_acc1'] for r in done])} "
                f"| {mean_sd([r['test_compactness'] for r in done])} | {mean_sd([r['test_margin'] for r in done])} "
                f"| {paired} | {statistics.mean(r['train_minutes'] for r in done):.1f} |")
        if stage == "final":
            lines += (_default_against_old_default(groups) + _longer_against_shorter(groups) + _last_against_best(groups)
                      + _objectives_at_last_epoch(groups) + _shipped_default_against_before(groups))
    return "\n".join(lines)


def _label(name: str, epochs: int) -> str:
    """A run's name in the report, with its budget when it is not the bench's default."""
    return name if epochs == DEFAULT_EPOCHS else f"{name}, {epochs} epochs"


def _default_against_old_default(groups: dict[Group, list[dict]]) -> list[str]:
    """The default a user gets now (the new recipe, softmax) against the one they got before (old recipe, center)."""
    lines = []
    for (name, arch, size, epochs), done in sorted(groups.items()):
        old = groups.get(("old recipe center", arch, size, epochs))
        if name == "softmax" and old:
            diff, low, high = paired_difference(done, old)
            lines.append(f"\n{arch} {size} px: the default now (new recipe, softmax) minus the default before (old "
                         f"recipe, center loss): {100 * diff:+.1f} points ({100 * low:+.1f}, {100 * high:+.1f}), "
                         f"seeds {', '.join(str(r['seed']) for r in old)}")
    return lines


def _longer_against_shorter(groups: dict[Group, list[dict]]) -> list[str]:
    """A run trained longer than the bench's default epochs against the same run at the default, seed by seed."""
    lines = []
    for (name, arch, size, epochs), done in sorted(groups.items()):
        short = groups.get((name, arch, size, DEFAULT_EPOCHS))
        if epochs != DEFAULT_EPOCHS and short:
            diff, low, high = paired_difference(done, short)
            lines.append(f"\n{arch} {size} px, {name}: {epochs} epochs minus {DEFAULT_EPOCHS}: {100 * diff:+.1f} points "
                         f"({100 * low:+.1f}, {100 * high:+.1f}), seeds {', '.join(str(r['seed']) for r in done)}")
    return lines


def _at_last_epoch(records: list[dict]) -> list[dict]:
    """The records `last` has scored, with their last-epoch checkpoint's photos and test top-1 in the place of the
    best-val one's, so `paired_difference` and the columns read them alike."""
    return [r | {"correct": r["last_correct"], "test_acc1": r["last_test_acc1"]} for r in records if "last_correct" in r]


def _last_against_best(groups: dict[Group, list[dict]]) -> list[str]:
    """Each run's last-epoch checkpoint against its best-by-val one, seed by seed (runs `last` has scored)."""
    lines = []
    for (name, arch, size, epochs), done in sorted(groups.items()):
        scored = [r for r in done if "last_correct" in r]
        if not scored:
            continue
        diff, low, high = paired_difference(_at_last_epoch(scored), scored)
        lines.append(f"\n{arch} {size} px, {_label(name, epochs)}: last-epoch checkpoint {mean_sd([r['last_test_acc1'] for r in scored])}"
                     f" against best-val {mean_sd([r['test_acc1'] for r in scored])}: {100 * diff:+.1f} points "
                     f"({100 * low:+.1f}, {100 * high:+.1f}), seeds {', '.join(str(r['seed']) for r in scored)} "
                     f"(last epochs {', '.join(str(r['last_epoch']) for r in scored)}, best-val epochs "
                     f"{', '.join(str(r['best_epoch']) for r in scored)})")
    return lines


def _objectives_at_last_epoch(groups: dict[Group, list[dict]]) -> list[str]:
    """Each center objective against softmax, both at their last-epoch checkpoints (what `train-food` hands on by
    default), seed by seed, where `last` has scored both."""
    lines = []
    for (name, arch, size, epochs), done in sorted(groups.items()):
        softmax = _at_last_epoch(groups.get(("softmax", arch, size, epochs), []))
        runs = _at_last_epoch(done)
        seeds = {r["seed"] for r in runs} & {r["seed"] for r in softmax}
        if name == "softmax" or name.startswith("old recipe") or not seeds:
            continue
        runs, softmax = [r for r in runs if r["seed"] in seeds], [r for r in softmax if r["seed"] in seeds]
        diff, low, high = paired_difference(runs, softmax)
        lines.append(f"\n{arch} {size} px, {epochs} epochs, last-epoch checkpoints: {name} "
                     f"{mean_sd([r['test_acc1'] for r in runs])} minus softmax "
                     f"{mean_sd([r['test_acc1'] for r in softmax])}: "
                     f"{100 * diff:+.1f} points ({100 * low:+.1f}, {100 * high:+.1f}), seeds "
                     f"{', '.join(str(r['seed']) for r in runs)}")
    return lines


# What `train-food` trained before issue 23 (Lite0 at 224 px, the old recipe, center loss, best-val checkpoint),
# as the bench ran it: at the finals' 5 epochs.
BEFORE: Group = ("old recipe center", "efficientnet_lite0", 224, DEFAULT_EPOCHS)


def _shipped_default_against_before(groups: dict[Group, list[dict]]) -> list[str]:
    """What `train-food train` ships now (the configs' defaults: backbone, epochs, objective, checkpoint choice)
    against the old recipe's row, seed by seed on the same test photos."""
    arch = ModelConfig.model_fields["arch"].default
    epochs = OptimConfig.model_fields["epochs"].default
    now = groups.get((LossConfig.model_fields["kind"].default, arch, backbone_inputs(arch).image_size, epochs), [])
    if RunConfig.model_fields["checkpoint_choice"].default == "last":
        now = _at_last_epoch(now)
    before = groups.get(BEFORE, [])
    if not now or not before:
        return []
    diff, low, high = paired_difference(now, before)
    return [f"\nthe default now ({arch}, {epochs} epochs, {RunConfig.model_fields['checkpoint_choice'].default} "
            f"checkpoint) {mean_sd([r['test_acc1'] for r in now])} minus the default before ({BEFORE[1]} "
            f"{BEFORE[2]} px, {BEFORE[0]}, {BEFORE[3]} epochs, best-val checkpoint) "
            f"{mean_sd([r['test_acc1'] for r in before])}: {100 * diff:+.1f} points ({100 * low:+.1f}, "
            f"{100 * high:+.1f}), seeds {', '.join(str(r['seed']) for r in now)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("ablate", "grid", "final", "last", "report"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="ablate/grid: 0 1; final: 0 1 2")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--arch", default="efficientnet_lite0", help="final: the backbone")
    parser.add_argument("--image-size", type=int, default=None, help="final: None = the backbone's native size")
    parser.add_argument("--objectives", default=None,
                        help="final: JSON file {name: loss config}; default: softmax and the grid's best lambda and "
                             "alpha of each center objective (most seeds first, then mean val top-1)")
    parser.add_argument("--old-rows", nargs="*", choices=("softmax", "center"), default=["center", "softmax"],
                        help="final: objectives also run with the old recipe (after the new ones; none: skip)")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "recipe"))
    parser.add_argument("--workspace", default=str(REPO / "workspace" / "bench-recipe"))
    args = parser.parse_args()
    results = Path(args.results)
    if args.stage == "report":
        print(report(results))
        return
    if args.stage == "last":
        score_last(results, Path(args.workspace))
        return
    args.seeds = args.seeds or ([0, 1, 2] if args.stage == "final" else [0, 1])
    runs = plan(args.stage, args)
    for index, run in enumerate(runs, 1):
        done = (results / f"{run.key}.json").is_file()
        record = execute(run, results, Path(args.workspace))
        took = "stored earlier" if done else f"{record['train_minutes']} min"
        print(f"[{index}/{len(runs)}] {run.name} seed {run.seed}: val {record['val_acc1']:.3f} test "
              f"{record['test_acc1']:.3f} compactness {record['test_compactness']:.3f} margin "
              f"{record['test_margin']:.3f} ({took})", flush=True)


if __name__ == "__main__":
    main()
