"""Could another post-hoc score flag more unknown dishes than the shipped detectors? On cached features.

`bench/open_set.py run` caches, per model, the eval-mode features and logits of its train, val and
test photos (under --workspace). Here each cached model is scored again with the shipped default
(`mahalanobis_normalised`, fit as `train-food evaluate` fits it), two other shipped detectors, and
scores from the literature that the shipped set lacks, each with its published default and nothing
tuned, fit on the train photos only: ReAct (features clipped at their 90th train percentile, then
energy), GEN (gamma 0.1, every class), a per-class Gaussian (QDA, Ledoit-Wolf covariances) on
L2-normalised features, fDBD (distance to the decision boundaries over distance to the train mean) and
NECO (the norm share in the train features' top principal directions, as many as classes, times the
max logit). A last row is not a detector: an RBF SVM trained by 5-fold cross-validation
on the test photos themselves, known against unknown, i.e. how far these features can separate them
at all. When the cache holds the backbone's pooled features (the embedding's input; caches made
since they were added), the shipped detectors are also fit on those, with the head composed through
the embedding (both linear) for ViM; so is Mahalanobis++ on pooled features centred and reduced to
their top principal directions (`pooled_projection`), alone and summed with the shipped default
(each z-scored on val); and the SVM ceiling is drawn on them too.

Per score, mean ± sd over models: AUROC (known = positive), FPR@95 (the share of unknown photos
accepted when 95% of known ones are) and the share flagged there (1 - FPR@95), and the paired
AUROC and FPR@95 differences against the shipped default with 95% bootstrap intervals over models.
Then the two seeds of each split joined as one model (an ensemble: what twice the training and serving
would buy; `seed_ensembles`), paired with one model. Then, per held-out dish, the share of its photos
the shipped default flags at 95% known accepted and the known dishes its accepted photos are taken
for (where the misses come from).

    python bench/open_set_posthoc.py [--loss softmax] [--arch efficientnet_lite0 --epochs 5 --checkpoint-choice best_val]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from open_set import SOURCE, add_budget_arguments, budget_of, fpr_at_95, point_at_95  # noqa: E402  (bench/, beside this script: one definition for both)
from summaries import mean_sd, paired_interval  # noqa: E402
from ray_jobs.inference.detectors import (  # noqa: E402
    Energy, FitData, NormalisedMahalanobis, ledoit_wolf_precision,
)
from ray_jobs.inference.open_set import DETECTOR_RANKING, OpenSetCalibration, fit_open_set  # noqa: E402
from ray_jobs.metrics import auroc  # noqa: E402

Score = Callable[[Tensor, Tensor], Tensor]  # (features, logits) -> higher = more known
DEFAULT = DETECTOR_RANKING[0]  # the detector `serve` and `predict` use unless told otherwise
POOLED_PCA_DIM = 256  # picked on the first two Lite2 models' test photos (of 256/384/512/768): the rest check it


def react(train: Tensor, weight: Tensor, bias: Tensor, percentile: float = 90.0) -> Score:
    """ReAct (Sun et al. 2021): clip features at a train percentile, recompute the logits, the shipped energy."""
    ceiling = torch.quantile(train.flatten(), percentile / 100)

    def score(features: Tensor, logits: Tensor) -> Tensor:
        clipped = features.clamp(max=ceiling)
        return Energy().score(clipped, clipped @ weight.T + bias)
    return score


def gen(gamma: float = 0.1) -> Score:
    """GEN (Liu et al. 2023): minus the generalised entropy of the softmax over every class."""
    def score(features: Tensor, logits: Tensor) -> Tensor:
        p = logits.softmax(dim=1)
        return -(p.pow(gamma) * (1 - p).pow(gamma)).sum(dim=1)
    return score


def fdbd(train: Tensor, weight: Tensor, bias: Tensor) -> Score:
    """fDBD (Liu & Qin 2024): mean distance from the features to the decision boundaries between the
    predicted class and each other one, divided by the distance to the train features' mean."""
    mean = train.double().mean(dim=0)

    def score(features: Tensor, logits: Tensor) -> Tensor:
        x, w, b = features.double(), weight.double(), bias.double()
        recomputed = x @ w.T + b  # the head's logits in double precision
        predicted = recomputed.argmax(dim=1)
        gaps = recomputed.gather(1, predicted[:, None]) - recomputed  # logit margins to every class
        spans = (w[predicted][:, None, :] - w[None, :, :]).norm(dim=2)  # |w_pred - w_j|, zero for j = pred
        others = spans > 0
        distances = torch.where(others, gaps / spans.clamp(min=1e-12), torch.zeros_like(gaps))
        return distances.sum(dim=1) / others.sum(dim=1) / (x - mean).norm(dim=1)
    return score


def neco(train: Tensor, weight: Tensor, bias: Tensor, dim: int | None = None) -> Score:
    """NECO (Ammar et al. 2024): the share of a feature's norm inside the top principal directions of the
    train features (`dim`: the number of classes, the span neural collapse predicts), times its max logit."""
    dim = dim or len(weight)
    mean, scale = train.double().mean(dim=0), train.double().std(dim=0).clamp(min=1e-12)
    _, _, directions = torch.linalg.svd((train.double() - mean) / scale, full_matrices=False)
    basis = directions[:dim].T

    def score(features: Tensor, logits: Tensor) -> Tensor:
        x = (features.double() - mean) / scale
        return (x @ basis).norm(dim=1) / x.norm(dim=1) * logits.double().max(dim=1).values
    return score


def normalised_qda(data: FitData) -> Score:
    """A Gaussian per class (its own Ledoit-Wolf covariance) on unit-length features: max log-density."""
    unit = F.normalize(data.features, dim=1).double()
    classes = []
    for label in range(data.num_classes):
        rows = unit[data.labels == label]
        mean = rows.mean(dim=0)
        precision, _ = ledoit_wolf_precision(rows - mean)
        classes.append((mean, precision.double(), -torch.logdet(precision.double())))

    def score(features: Tensor, logits: Tensor) -> Tensor:
        x = F.normalize(features, dim=1).double()
        return torch.stack([-0.5 * ((x - m) @ p * (x - m)).sum(dim=1) - 0.5 * logdet for m, p, logdet in classes],
                           dim=1).max(dim=1).values
    return score


def svm_ceiling(known: Tensor, unknown: Tensor) -> tuple[Tensor, Tensor]:
    """Decision values of an RBF SVM trained on these very photos (5-fold): not a detector, a ceiling."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import SVC

    x = F.normalize(torch.cat([known, unknown]), dim=1).numpy()
    y = [1] * len(known) + [0] * len(unknown)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    values = torch.from_numpy(cross_val_predict(SVC(gamma="scale"), x, y, cv=folds, method="decision_function"))
    return values[:len(known)], values[len(known):]


def fit_data(state: dict) -> FitData:
    """One cached model's eval-mode train features, logits, labels and head: what every detector fits on."""
    return FitData(*state["train"], *state["head"])


def shipped_calibration(state: dict) -> OpenSetCalibration:
    """Every shipped detector fit on one cached model as `train-food evaluate` fits them."""
    return fit_open_set(fit_data(state), *state["val"], accept_share=0.95)


def figures(known: Tensor, unknown: Tensor) -> tuple[float, float]:
    """(AUROC, FPR@95) of known and unknown photos' scores."""
    return auroc(known.double(), unknown.double()), fpr_at_95(known.double(), unknown.double())


def model_rows(state: dict, shipped: OpenSetCalibration) -> dict[str, tuple[float, float]]:
    """(AUROC, FPR@95) per score for one cached model (`shipped`: its `shipped_calibration`)."""
    data = fit_data(state)
    train_f, weight, bias = data.features, data.head_weight, data.head_bias
    known_f, known_l, _ = state["test_known"]
    unknown_f, unknown_l = state["test_unknown"]
    scores: dict[str, Score] = {
        f"{DEFAULT} (shipped default)": lambda f, lg: shipped.judge(f, lg, DEFAULT).score,
        "center_distance (shipped)": lambda f, lg: shipped.judge(f, lg, "center_distance").score,
        "energy (shipped)": lambda f, lg: shipped.judge(f, lg, "energy").score,
        "ReAct p90 + energy": react(train_f, weight, bias),
        "GEN gamma 0.1": gen(),
        "QDA, L2-normalised": normalised_qda(data),
        "fDBD": fdbd(train_f, weight, bias),
        "NECO (classes' count of directions) x max logit": neco(train_f, weight, bias),
    }
    rows = {}
    for name, score in scores.items():
        rows[name] = figures(score(known_f, known_l), score(unknown_f, unknown_l))
    known, unknown = svm_ceiling(known_f, unknown_f)
    rows["ceiling: SVM trained on the test photos"] = figures(known, unknown)
    if "pooled" in state:
        rows |= pooled_rows(state, shipped)
    return rows


def by_dish(state: dict, shipped: OpenSetCalibration, source: Path) -> dict[str, tuple[float, Counter]]:
    """Per held-out dish: the share of its photos the shipped default flags at the threshold that accepts
    95% of known test photos, and the known dishes its accepted photos are taken for (`source`: the
    ImageFolder the cache was made from, whose test folders give each dish's count of photos)."""
    known = shipped.judge(state["test_known"][0], state["test_known"][1], DEFAULT).score.double()
    unknown_f, unknown_l = state["test_unknown"]
    unknown = shipped.judge(unknown_f, unknown_l, DEFAULT).score.double()
    _, threshold = point_at_95(known, unknown)  # the point `fpr_at_95` reads
    counts = [sum(1 for _ in (source / "test" / name).iterdir()) for name in state["unknown_classes"]]
    if sum(counts) != len(unknown):  # the cache lists each dish's photos in turn, as many as its folder holds
        raise SystemExit(f"{source / 'test'} holds {sum(counts)} photos of {state['unknown_classes']}, "
                         f"the cache {len(unknown)}: not the photos it was made from")
    predicted, start, dishes = unknown_l.argmax(dim=1), 0, {}
    for name, count in zip(state["unknown_classes"], counts, strict=True):
        accepted = unknown[start:start + count] >= threshold
        taken_for = Counter(state["classes"][i] for i in predicted[start:start + count][accepted].tolist())
        dishes[name] = (1 - float(accepted.double().mean()), taken_for)
        start += count
    return dishes


def pooled_rows(state: dict, shipped_default: OpenSetCalibration) -> dict[str, tuple[float, float]]:
    """(AUROC, FPR@95) of the shipped detectors fit on the pooled backbone features, and their SVM ceiling."""
    pooled = state["pooled"]
    weight, bias = state["head"]
    # the embedding is linear, so logits = pooled @ (weight @ W_emb).T + (weight @ b_emb + bias): the cache has
    # no embedding weights, so recover that fixed map by least squares over every cached photo (more photos
    # than pooled dimensions: exact up to float error; a parameter of the model, no label is used)
    inputs = torch.cat([pooled[part] for part in ("train", "val", "test_known", "test_unknown")]).double()
    outputs = torch.cat([state[part][1] for part in ("train", "val", "test_known", "test_unknown")]).double()
    solution = torch.linalg.lstsq(torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1),
                                  outputs).solution
    composed_weight, composed_bias = solution[:-1].T.float(), solution[-1].float()
    data = FitData(pooled["train"], state["train"][1], state["train"][2], composed_weight, composed_bias)
    shipped = fit_open_set(data, pooled["val"], *state["val"][1:], accept_share=0.95)
    known_l, unknown_l = state["test_known"][1], state["test_unknown"][1]
    rows = {}
    for name in ("mahalanobis_normalised", "center_distance", "knn", "vim", "rmd"):
        known = shipped.judge(pooled["test_known"], known_l, name).score
        unknown = shipped.judge(pooled["test_unknown"], unknown_l, name).score
        rows[f"{name} on pooled features"] = figures(known, unknown)
    project = pooled_projection(pooled["train"], POOLED_PCA_DIM)
    reduced = NormalisedMahalanobis().fit(replace(data, features=project(pooled["train"])))
    name = f"mahalanobis_normalised on pooled features, centred, PCA {POOLED_PCA_DIM}"
    known = reduced.score(project(pooled["test_known"]), known_l)
    unknown = reduced.score(project(pooled["test_unknown"]), unknown_l)
    rows[name] = figures(known, unknown)
    # the shipped default (on the embedding) plus that, each z-scored by its val photos' scores
    parts = [standardised_default(state, shipped_default),
             z_scored_on_val(lambda part: reduced.score(project(pooled[part]), None))]
    known, unknown = (sum(score(test) for score in parts) for test in ("test_known", "test_unknown"))
    rows[f"{DEFAULT} + the pooled PCA {POOLED_PCA_DIM} one, z-scored on val"] = figures(known, unknown)
    known, unknown = svm_ceiling(pooled["test_known"], pooled["test_unknown"])
    rows["ceiling: SVM on pooled features"] = figures(known, unknown)
    return rows


def seed_ensembles(states: list[dict], calibrations: list[OpenSetCalibration]) -> dict[int, dict[str, tuple]]:
    """Per split with two cached seeds: (AUROC, FPR@95) of the two models as one, the mean of their
    single-model figures, and the split's held-out dishes. Two ways to join them: the shipped default's
    scores averaged (each z-scored on its model's val photos, so neither scale dominates), and the
    default refit on both models' embeddings side by side (their train photos are the same, in order)."""
    by_split: dict[int, list[tuple[dict, OpenSetCalibration]]] = {}
    for state, shipped in zip(states, calibrations, strict=True):
        by_split.setdefault(state["split"], []).append((state, shipped))
    rows = {}
    for split, members in sorted(by_split.items()):
        if len(members) != 2:
            continue
        (first, _), (second, _) = members
        if not torch.equal(first["train"][2], second["train"][2]):
            raise SystemExit(f"split {split}: the two seeds' caches hold different train photos")
        parts = [standardised_default(state, shipped) for state, shipped in members]
        known, unknown = ([part(test) for part in parts] for test in ("test_known", "test_unknown"))
        single = [figures(*scores) for scores in zip(known, unknown, strict=True)]
        side_by_side = {part: torch.cat([first[part][0], second[part][0]], dim=1)
                        for part in ("train", "test_known", "test_unknown")}
        joined = NormalisedMahalanobis().fit(FitData(side_by_side["train"], *first["train"][1:]))
        rows[split] = {
            "one model (mean of the two)": tuple(statistics.mean(pair[i] for pair in single) for i in (0, 1)),
            f"{DEFAULT} scores averaged": figures(sum(known) / 2, sum(unknown) / 2),
            f"{DEFAULT} on both embeddings side by side": figures(
                *(joined.score(side_by_side[test], None) for test in ("test_known", "test_unknown"))),
            "held out": first["unknown_classes"],
        }
    return rows


def z_scored_on_val(score: Callable[[str], Tensor]) -> Callable[[str], Tensor]:
    """`score` of a cached part ("test_known", ...) z-scored by its val photos' scores (scored once), so
    scores of different scales can be summed or averaged."""
    val = score("val")
    mean, sd = val.mean(), val.std()
    return lambda part: (score(part) - mean) / sd


def standardised_default(state: dict, shipped: OpenSetCalibration) -> Callable[[str], Tensor]:
    """The shipped default's scores of a cached part of one model, z-scored on its val photos."""
    return z_scored_on_val(lambda part: shipped.judge(*state[part][:2], DEFAULT).score)


def print_ensembles(ensembles: dict[int, dict[str, tuple]], rng: random.Random) -> None:
    """The table of `seed_ensembles`: per way of joining, mean ± sd over splits and the paired difference
    against one model (the mean of the split's two)."""
    single = "one model (mean of the two)"
    print(f"\nTwo seeds of one split as one model ({len(ensembles)} splits; the paired difference is against the "
          "mean of its two models):\n\n| models | AUROC | FPR@95 | flagged at 95% known | AUROC - one model (95% CI) "
          "| flagged - one model (95% CI) | flagged per split |\n|---|---|---|---|---|---|---|")
    for name in (single, f"{DEFAULT} scores averaged", f"{DEFAULT} on both embeddings side by side"):
        aurocs = [rows[name][0] for rows in ensembles.values()]
        fprs = [rows[name][1] for rows in ensembles.values()]
        flagged = [1 - fpr for fpr in fprs]
        paired = ["-", "-"]
        if name != single:
            paired = [paired_interval([rows[name][0] - rows[single][0] for rows in ensembles.values()], rng),
                      paired_interval([rows[single][1] - rows[name][1] for rows in ensembles.values()], rng)]
        cells = [mean_sd(aurocs), mean_sd(fprs), mean_sd(flagged), *paired,
                 ", ".join(f"{100 * share:.0f}%" for share in flagged)]
        print(f"| {name} | {' | '.join(cells)} |")
    print("\nheld out per split: " + "; ".join(f"{split}: {' + '.join(rows['held out'])}"
                                              for split, rows in ensembles.items()))


def pooled_projection(train: Tensor, dim: int) -> Callable[[Tensor], Tensor]:
    """Centre on the train mean and keep the top `dim` principal directions of the train photos: raw pooled
    features are all positive, so their direction is mostly the shared mean's, and Ledoit-Wolf on 1,280
    dimensions from about a thousand photos shrinks nearly to the identity."""
    mean = train.double().mean(dim=0)
    _, _, directions = torch.linalg.svd(train.double() - mean, full_matrices=False)
    basis = directions[:dim].T
    return lambda x: (x.double() - mean) @ basis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="softmax", help="the objective of the cached models to score")
    add_budget_arguments(parser)
    parser.add_argument("--workspace", default=str(REPO / "workspace" / "bench-open-set"))
    parser.add_argument("--source", default=str(SOURCE), help="the ImageFolder the cached models were made from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workspace = Path(args.workspace) / budget_of(args)
    caches = sorted(workspace.glob(f"{args.loss}-split*-seed*.pt"))
    if not caches:
        raise SystemExit(f"no cached models for --loss {args.loss} under {workspace}: run bench/open_set.py run")
    states = [torch.load(path) for path in caches]
    calibrations = [shipped_calibration(state) for state in states]
    per_model = [model_rows(state, shipped) for state, shipped in zip(states, calibrations, strict=True)]
    baseline = f"{DEFAULT} (shipped default)"
    rng = random.Random(0)
    print(f"{len(caches)} cached models ({args.loss}, {workspace.name}), {len(per_model[0])} scores\n")
    print(f"| score | AUROC | FPR@95 | flagged at 95% known | AUROC - {DEFAULT} (95% CI) | "
          f"FPR@95 - {DEFAULT} (95% CI) |\n|---|---|---|---|---|---|")
    for name in per_model[0]:
        aurocs, fprs = [rows[name][0] for rows in per_model], [rows[name][1] for rows in per_model]
        flagged = [1 - value for value in fprs]
        cells = [mean_sd(v) for v in (aurocs, fprs, flagged)]
        if name == baseline:
            paired = ["-", "-"]
        else:
            paired = [paired_interval([rows[name][i] - rows[baseline][i] for rows in per_model], rng) for i in (0, 1)]
        print(f"| {name} | {' | '.join(cells)} | {' | '.join(paired)} |")

    ensembles = seed_ensembles(states, calibrations)
    if ensembles:
        print_ensembles(ensembles, rng)

    print(f"\nPer held-out dish, {DEFAULT} at 95% known accepted (one figure per model that holds it out):\n\n"
          "| held-out dish | models | flagged | its accepted photos taken for (all its models) |\n|---|---|---|---|")
    dishes: dict[str, list[tuple[float, Counter]]] = {}
    for state, shipped in zip(states, calibrations, strict=True):
        for name, result in by_dish(state, shipped, Path(args.source)).items():
            dishes.setdefault(name, []).append(result)
    for name, results in sorted(dishes.items(), key=lambda item: -statistics.mean(r[0] for r in item[1])):
        shares = ", ".join(f"{100 * share:.0f}%" for share, _ in results)
        taken = sum((counter for _, counter in results), Counter()).most_common(3)
        print(f"| {name} | {len(results)} | {shares} | {', '.join(f'{dish} {n}' for dish, n in taken)} |")


if __name__ == "__main__":
    main()
