"""Open-set detectors against each other on food101_mini10: can a model trained on 8 dishes flag the other 2?

For each split (2 of the 10 classes held out, seeded) and training seed, one model trains on the
other 8 with the default recipe, backbone, budget and checkpoint choice (as `train-food train`
ships them; `--arch`, `--epochs`, `--checkpoint-choice` remake older figures, `--loss` tries a
training-time option), in this process. The chosen checkpoint's eval-mode features and logits are
cached (under --workspace, not committed): the train photos the detectors fit on (the same capped,
seeded subset `ray_jobs.inference.calibrate` uses), val, and the known and unknown test photos
read from their files, as a user's photo is. Then the shipped code fits and thresholds every
detector (`ray_jobs.inference.open_set.fit_open_set`: KNN's k chosen on val by leaving a class
out, thresholds accepting 95% of val) and each model's per-photo test scores go to a small JSON
file under --results (committed), so `report` needs only those and a session that ends mid-run
resumes at the next model (`--rescore` refits from the cached features after a detector changes).
Each budget (backbone, epochs, checkpoint choice) keeps its own folder under both, named by
`budget_folder`, so remaking the figures on a new default never mixes or overwrites the old ones.

Per detector, mean ± sd over models: AUROC (known = positive); FPR@95, the share of unknown test
photos accepted at the threshold that accepts 95% of the known test photos (`roc_curve`); AUPR
(known positive); at the val threshold, the shares of known test photos accepted and unknown
ones flagged; the paired AUROC difference against MSP with a 95% bootstrap interval over models.

    python bench/open_set.py run [--splits 5] [--seeds 0 1] [--loss center]
    python bench/open_set.py report [--loss center] [--against softmax] [--against-budget efficientnet_lite0-5ep-best_val]
    python bench/open_set.py report --arch efficientnet_lite0 --epochs 5 --checkpoint-choice best_val
    python bench/open_set.py run --draw pairs    # each dish held out once (its own folder, `...-pairs`)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from sklearn.metrics import average_precision_score, roc_curve
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_jobs.config import (  # noqa: E402
    DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig,
)
from ray_jobs.data.decode import read_image  # noqa: E402
from ray_jobs.data.parquet import ParquetImageDataset  # noqa: E402
from ray_jobs.inference.calibrate import fit_subset  # noqa: E402
from ray_jobs.inference.detector_names import DETECTORS  # noqa: E402
from ray_jobs.inference.detectors import FitData  # noqa: E402
from ray_jobs.inference.loading import CheckpointModel, model_from_checkpoint  # noqa: E402
from ray_jobs.inference.open_set import fit_open_set  # noqa: E402
from ray_jobs.metrics import auroc  # noqa: E402
from ray_jobs.model.inputs import eval_preprocessing, input_spec  # noqa: E402
from ray_jobs.training.engine import Precision, predict  # noqa: E402
from ray_jobs.training.trainer import fit  # noqa: E402
from summaries import mean_sd, paired_interval  # noqa: E402  (bench/, beside this script)
from tasks.ingest.config import IngestConfig  # noqa: E402
from tasks.ingest.pipeline import ingest  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "food101_mini10"
CPU = torch.device("cpu")


DRAWS = ("sampled", "pairs")  # how splits pick their held-out dishes: see `held_out`


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The four options that pick a training budget (and so its `budget_folder`), shared with
    bench/open_set_posthoc.py so both scripts read the same models by default."""
    parser.add_argument("--arch", default=ModelConfig().arch, help="the backbone (default: the shipped one)")
    parser.add_argument("--epochs", type=int, default=OptimConfig().epochs)
    parser.add_argument("--checkpoint-choice", choices=("last", "best_val"), default=RunConfig().checkpoint_choice,
                        help="the checkpoint whose features the detectors see (default: the one a run hands on)")
    parser.add_argument("--label-smoothing", type=float, default=LossConfig().label_smoothing,
                        help="of the cross-entropy (a training-time option for rejection)")
    parser.add_argument("--draw", choices=DRAWS, default="sampled",
                        help="how splits pick their held-out dishes: sampled (seeded, per split; the committed "
                             "figures) or pairs (a seeded partition: each dish held out in exactly one split)")


def budget_of(args: argparse.Namespace) -> str:
    """`budget_folder` of the options `add_budget_arguments` added."""
    return budget_folder(args.arch, args.epochs, args.checkpoint_choice, args.label_smoothing, args.draw)


def budget_folder(arch: str, epochs: int, checkpoint_choice: str, label_smoothing: float | None = None,
                  draw: str = "sampled") -> str:
    """The results and cache subfolder of one training budget, e.g. `efficientnet_lite2-10ep-last` (with
    `-ls0.0` appended when the label smoothing is not LossConfig's, `-pairs` for the partition draw)."""
    smoothing = "" if label_smoothing in (None, LossConfig().label_smoothing) else f"-ls{label_smoothing}"
    return f"{arch}-{epochs}ep-{checkpoint_choice}{smoothing}{'' if draw == 'sampled' else '-' + draw}"


def held_out(classes: list[str], split: int, draw: str = "sampled", count: int = 2) -> list[str]:
    """The `count` classes split `split` treats as unknown, seeded so reruns hold out the same ones.
    `sampled` draws each split on its own, so a dish may be held out in several splits and another in
    none; `pairs` cuts one seeded shuffle of the classes into consecutive groups, each dish held out in
    exactly one split (as many splits as there are groups)."""
    if draw == "sampled":
        return sorted(random.Random(f"0:{split}").sample(classes, count))
    order = sorted(classes)
    random.Random("pairs").shuffle(order)
    if (split + 1) * count > len(order):
        raise SystemExit(f"--draw pairs has {len(order) // count} splits of {count} of {len(order)} dishes, "
                         f"not a split {split}")
    return sorted(order[split * count:(split + 1) * count])


def known_source(known: list[str], out: Path, limit: int | None) -> Path:
    """`out/{train,test}/<known class>/` with (at most `limit` per class of) the source's photos, hard-linked."""
    for split in ("train", "test"):
        for name in known:
            folder = out / split / name
            folder.mkdir(parents=True)
            for path in sorted(p for p in (SOURCE / split / name).iterdir() if p.is_file())[:limit]:
                try:
                    os.link(path, folder / path.name)
                except OSError:  # another filesystem
                    shutil.copyfile(path, folder / path.name)
    return out


class PooledFeatures:
    """Collects the backbone's pooled features (the embedding's input) of every forward while entered,
    so the cache also holds the wider features a detector could fit on instead of the embedding's."""

    def __init__(self, loaded: CheckpointModel) -> None:
        self.embedding, self.parts = loaded.net.embedding, []

    def __enter__(self) -> PooledFeatures:
        self.handle = self.embedding.register_forward_hook(lambda _m, args, _out: self.parts.append(args[0].float()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def joined(self) -> torch.Tensor:
        return torch.cat(self.parts)


def _split(loaded: CheckpointModel, dataset: ParquetImageDataset | Subset) -> tuple[torch.Tensor, ...]:
    """Features, logits, labels and pooled backbone features of every photo of `dataset`."""
    with PooledFeatures(loaded) as pooled:
        outputs = predict(loaded.net, DataLoader(dataset, batch_size=50), CPU, Precision(CPU, "fp32"))
    return (*outputs, pooled.joined())


@torch.no_grad()
def _files(loaded: CheckpointModel, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, logits and pooled backbone features of photo files, decoded and preprocessed as
    `train-food predict` does it."""
    preprocess, net = eval_preprocessing(loaded.config), loaded.net.eval()
    with PooledFeatures(loaded) as pooled:
        parts = [net(torch.stack([preprocess(read_image(p)) for p in paths[i : i + 50]]))
                 for i in range(0, len(paths), 50)]
    return torch.cat([f for f, _ in parts]).float(), torch.cat([lg for _, lg in parts]).float(), pooled.joined()


def cache_features(split: int, seed: int, args: argparse.Namespace, out: Path) -> None:
    """Train one model on the known classes of `split`; store what the detectors fit on and score."""
    classes = sorted(p.name for p in (SOURCE / "train").iterdir())
    unknown = held_out(classes, split, args.draw)
    known = [name for name in classes if name not in unknown]
    with tempfile.TemporaryDirectory(prefix="bench-open-set-") as tmp:
        source = known_source(known, Path(tmp) / "src", args.limit_per_class)
        dataset = ingest(IngestConfig(src=str(source), out=f"{tmp}/data", max_side=args.max_side)).out
        cfg = TrainConfig(data=DataConfig(dataset=dataset, batch_size=32, loader_workers=1, image_size=args.image_size),
                          model=ModelConfig(arch=args.arch),
                          loss=loss_config(args.loss).model_copy(update={"label_smoothing": args.label_smoothing}),
                          optim=OptimConfig(epochs=args.epochs, warmup_epochs=1),
                          scaling=ScalingConfig(num_workers=0),
                          run=RunConfig(storage_path=f"{tmp}/runs", name=f"split{split}-seed{seed}", seed=seed,
                                        keep_checkpoints=1, checkpoint_choice=args.checkpoint_choice))
        start = time.perf_counter()
        result = fit(cfg)
        minutes = (time.perf_counter() - start) / 60
        loaded = model_from_checkpoint(result.checkpoint)
        preprocess = eval_preprocessing(loaded.config)
        train = ParquetImageDataset(dataset, "train", preprocess)
        test_known = [p for name in loaded.classes for p in sorted((SOURCE / "test" / name).iterdir())]
        test_unknown = [p for name in unknown for p in sorted((SOURCE / "test" / name).iterdir())]
        *train_outputs, train_pooled = _split(loaded, Subset(train, fit_subset(train.labels)))
        *val_outputs, val_pooled = _split(loaded, ParquetImageDataset(dataset, "val", preprocess))
        *known_outputs, known_pooled = _files(loaded, test_known)
        *unknown_outputs, unknown_pooled = _files(loaded, test_unknown)
        head = loaded.net.head
        state = {
            "split": split, "seed": seed, "loss": args.loss, "unknown_classes": unknown, "classes": loaded.classes,
            "epoch": loaded.state["epoch"], "checkpoint_choice": args.checkpoint_choice, "train_minutes": round(minutes, 2),
            "image_size": input_spec(loaded.config).image_size,
            "train": tuple(train_outputs), "val": tuple(val_outputs),
            "test_known": (*known_outputs, torch.tensor(
                [i for i, name in enumerate(loaded.classes) for _ in sorted((SOURCE / "test" / name).iterdir())])),
            "test_unknown": tuple(unknown_outputs),
            "head": (head.weight.detach().float(), head.bias.detach().float()),
            # the backbone's pooled features of the same photos, for detectors tried on them post hoc
            "pooled": {"train": train_pooled, "val": val_pooled, "test_known": known_pooled,
                       "test_unknown": unknown_pooled},
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").rename(out)


def loss_config(kind: str) -> LossConfig:
    """The default objective (LossConfig's knobs) when `kind` is the default kind; else softmax, or a center
    objective at the knobs `bench/recipe.py`'s grid chose."""
    if kind in (LossConfig().kind, "softmax"):
        return LossConfig(kind=kind) if kind == "softmax" else LossConfig()
    sys.path.insert(0, str(REPO / "bench"))
    from recipe import best_of_grid

    return LossConfig(**best_of_grid(REPO / "bench" / "results" / "recipe")[kind])


def score(state: dict) -> dict:
    """Fit and threshold every detector as `train-food evaluate` does; the test photos' scores per detector."""
    train_f, train_l, train_y = state["train"]
    weight, bias = state["head"]
    calibration = fit_open_set(FitData(train_f, train_l, train_y, weight, bias), *state["val"], accept_share=0.95)
    known_f, known_l, known_y = state["test_known"]
    unknown_f, unknown_l = state["test_unknown"]
    per_detector = {}
    for name in DETECTORS:
        per_detector[name] = {
            "threshold": calibration.thresholds[name],
            "known": [round(v, 6) for v in calibration.judge(known_f, known_l, name).score.tolist()],
            "unknown": [round(v, 6) for v in calibration.judge(unknown_f, unknown_l, name).score.tolist()],
        }
    return {key: state[key] for key in ("split", "seed", "loss", "unknown_classes", "classes", "train_minutes",
                                        "image_size")} | {
        # caches made before the budget folders hold the best-val checkpoint's epoch under "best_epoch"
        "epoch": state.get("epoch", state.get("best_epoch")),
        "checkpoint_choice": state.get("checkpoint_choice", "best_val"),
        "top1": float((known_l.argmax(1) == known_y).double().mean()), "knn_k": calibration.detectors["knn"].options["k"],
        "default": calibration.default, "detectors": per_detector}


def point_at_95(known: torch.Tensor, unknown: torch.Tensor) -> tuple[float, float]:
    """(share of unknown photos accepted, threshold) at the first ROC point that accepts 95% of known ones
    (known = positive; a photo is accepted when its score >= the threshold)."""
    fpr, tpr, thresholds = roc_curve([1] * len(known) + [0] * len(unknown), torch.cat([known, unknown]).numpy())
    point = (tpr >= 0.95).argmax()
    return float(fpr[point]), float(thresholds[point])


def fpr_at_95(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Share of unknown photos accepted by the threshold that accepts 95% of known ones (known = positive)."""
    return point_at_95(known, unknown)[0]


def metrics(entry: dict) -> dict[str, float]:
    known, unknown = torch.tensor(entry["known"]).double(), torch.tensor(entry["unknown"]).double()
    labels = [1] * len(known) + [0] * len(unknown)
    return {"auroc": auroc(known, unknown), "fpr95": fpr_at_95(known, unknown),
            "aupr": float(average_precision_score(labels, torch.cat([known, unknown]).numpy())),
            "known_accepted": float((known >= entry["threshold"]).double().mean()),
            "unknown_flagged": float((unknown < entry["threshold"]).double().mean())}


def report(results: Path, loss: str) -> str:
    models = [json.loads(path.read_text()) for path in sorted(results.glob(f"{loss}-split*-seed*.json"))]
    if not models:
        return f"no results for --loss {loss} under {results}: run `bench/open_set.py run` first"
    rows = {name: [metrics(model["detectors"][name]) for model in models] for name in DETECTORS}
    ranked = sorted(DETECTORS, key=lambda name: -statistics.mean(r["auroc"] for r in rows[name]))
    lines = [f"{len(models)} models ({loss}, {results.name}; splits {sorted({m['split'] for m in models})} x seeds "
             f"{sorted({m['seed'] for m in models})}), closed-set top-1 {mean_sd([m['top1'] for m in models])}, "
             f"KNN k chosen {sorted(m['knn_k'] for m in models)}, train {mean_sd([m['train_minutes'] for m in models])} "
             "min a model", "",
             "| detector | AUROC | FPR@95 | AUPR | known accepted (val 95%) | unknown flagged | AUROC - MSP (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    rng = random.Random(0)
    msp = [row["auroc"] for row in rows["msp"]]
    for name in ranked:
        diffs = [row["auroc"] - base for row, base in zip(rows[name], msp, strict=True)]
        cells = [mean_sd([row[key] for row in rows[name]]) for key in ("auroc", "fpr95", "aupr", "known_accepted",
                                                                         "unknown_flagged")]
        interval = paired_interval(diffs, rng)  # drawn for MSP too, so each row's interval keeps its draws
        paired = "-" if name == "msp" else interval
        lines.append(f"| {name} | {' | '.join(cells)} | {paired} |")
    lines += ["", f"ranking by mean AUROC: {', '.join(ranked)}"]
    return "\n".join(lines)


def compare_runs(results: Path, loss: str, baseline: str, baseline_results: Path | None = None) -> str:
    """Per detector, AUROC of `loss`'s models minus `baseline`'s with the same held-out dishes and seed: a
    training-time option (another loss), or another budget's models (`baseline_results`, another budget
    folder; a model of another draw pairs with the one that held out the same dishes)."""
    def load(folder: Path, name: str) -> dict[tuple[tuple[str, ...], int], dict]:
        return {(tuple(m["unknown_classes"]), m["seed"]): m
                for m in (json.loads(p.read_text()) for p in sorted(folder.glob(f"{name}-split*-seed*.json")))}

    baseline_results = baseline_results or results
    ours, theirs = load(results, loss), load(baseline_results, baseline)
    pairs = sorted(set(ours) & set(theirs), key=lambda key: (ours[key]["split"], ours[key]["seed"]))
    if not pairs:
        return (f"no run with the same held-out dishes and seed for both {loss} in {results.name} and {baseline} "
                f"in {baseline_results.name}")
    rng = random.Random(0)
    names = (f"{loss}, {results.name}", f"{baseline}, {baseline_results.name}")
    splits = [(ours[key]["split"], ours[key]["seed"]) for key in pairs]
    lines = [f"{names[0]} minus {names[1]}, {len(pairs)} paired models (splits x seeds {splits}); closed-set top-1 "
             f"{statistics.mean(ours[k]['top1'] - theirs[k]['top1'] for k in pairs):+.3f}", "",
             "| detector | AUROC difference (95% CI) | unknown flagged difference (val threshold) "
             "| flagged at 95% known difference |", "|---|---|---|---|"]
    for name in DETECTORS:
        rows = [(metrics(ours[k]["detectors"][name]), metrics(theirs[k]["detectors"][name])) for k in pairs]
        diffs = [mine["auroc"] - other["auroc"] for mine, other in rows]
        flagged = [mine["unknown_flagged"] - other["unknown_flagged"] for mine, other in rows]
        flagged_95 = [other["fpr95"] - mine["fpr95"] for mine, other in rows]  # flagged = 1 - FPR@95
        lines.append(f"| {name} | {paired_interval(diffs, rng)} "
                     f"| {statistics.mean(flagged):+.3f} | {statistics.mean(flagged_95):+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("run", "report"))
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    add_budget_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, help="None: the backbone's native size")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--loss", default=LossConfig().kind,
                        help="the objective's kind (default: LossConfig's, at its knobs); another center objective "
                             "trains at the knobs bench/recipe.py's grid chose")
    parser.add_argument("--limit-per-class", type=int, default=None, help="smoke runs: photos per class and split")
    parser.add_argument("--rescore", action="store_true", help="run: refit the detectors on every cached model")
    parser.add_argument("--against", default=None, help="report: also pair --loss's models with this loss's")
    parser.add_argument("--against-budget", default=None,
                        help="report: also pair the models with those of this budget folder (same --loss, or --against)")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "open_set"))
    parser.add_argument("--workspace", default=str(REPO / "workspace" / "bench-open-set"))
    args = parser.parse_args()
    budget = budget_of(args)
    results, workspace = Path(args.results) / budget, Path(args.workspace) / budget
    if args.stage == "report":
        print(report(results, args.loss))
        if args.against or args.against_budget:
            other = Path(args.results) / args.against_budget if args.against_budget else None
            print("\n" + compare_runs(results, args.loss, args.against or args.loss, other))
        return
    for split in range(args.splits):
        for seed in args.seeds:
            name = f"{args.loss}-split{split}-seed{seed}"
            cached, scored = workspace / f"{name}.pt", results / f"{name}.json"
            if scored.is_file() and not args.rescore:
                print(f"{name}: scored earlier", flush=True)
                continue
            if not cached.is_file():
                cache_features(split, seed, args, cached)
            record = score(torch.load(cached))
            results.mkdir(parents=True, exist_ok=True)
            scored.with_suffix(".tmp").write_text(json.dumps(record))
            scored.with_suffix(".tmp").rename(scored)
            print(f"{name}: top-1 {record['top1']:.3f}, default {record['default']} AUROC "
                  f"{metrics(record['detectors'][record['default']])['auroc']:.3f}", flush=True)


if __name__ == "__main__":
    main()
