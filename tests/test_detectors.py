"""Open-set detectors: each ranks a far-away cluster as unknown, and agrees with pytorch-ood where both exist."""

from __future__ import annotations

import pytest
import torch

from ray_jobs.inference.detectors import (
    DETECTORS,
    FitData,
    detector_from_state,
    ledoit_wolf_precision,
    make_detector,
)
from ray_jobs.metrics import auroc

D, C, PER_CLASS = 16, 4, 200


def _clusters(seed: int = 0) -> tuple[FitData, torch.Tensor, torch.Tensor]:
    """4 known Gaussian classes at 6 e_k (unit spread), a linear head that reads them, known test photos,
    and an unknown cluster at 6 e_10: orthogonal to every class, so its logits are flat."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(C, D)
    means[range(C), range(C)] = 6.0
    labels = torch.arange(C).repeat_interleave(PER_CLASS)
    features = means[labels] + torch.randn(len(labels), D, generator=g)
    weight, bias = means / 3, torch.zeros(C)
    known = means[torch.arange(C).repeat(50)] + torch.randn(200, D, generator=g)
    unknown_center = torch.zeros(D)
    unknown_center[10] = 6.0
    unknown = unknown_center + torch.randn(200, D, generator=g)
    data = FitData(features=features, logits=features @ weight.T + bias, labels=labels, head_weight=weight,
                   head_bias=bias)
    return data, known, unknown


@pytest.mark.parametrize("name", DETECTORS)
def test_each_detector_ranks_a_far_cluster_as_unknown_and_survives_a_round_trip(name: str) -> None:
    data, known, unknown = _clusters()
    options = {"principal_dim": C} if name == "vim" else {}
    detector = make_detector(name, **options).fit(data)
    head = lambda x: x @ data.head_weight.T + data.head_bias  # noqa: E731
    known_scores, unknown_scores = detector.score(known, head(known)), detector.score(unknown, head(unknown))
    assert auroc(known_scores, unknown_scores) > 0.95, name
    restored = detector_from_state(detector.state())
    torch.testing.assert_close(restored.score(unknown, head(unknown)), unknown_scores)


def _fixed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(3).repeat(40)
    features = torch.randn(120, 6, generator=g) + torch.eye(3, 6)[labels] * 3
    weight, bias = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    query = torch.randn(30, 6, generator=g) * 2
    return features, labels, weight, bias, query


def test_scores_match_pytorch_ood_on_fixed_tensors() -> None:
    """pytorch-ood scores outliers high, we score known photos high; its covariances are sums, not means."""
    import pytorch_ood.detector as pod

    features, labels, weight, bias, query = _fixed()
    logits, query_logits = features @ weight.T + bias, query @ weight.T + bias
    data = FitData(features, logits, labels, weight, bias)
    n = len(features)

    def ours(name: str, **options) -> torch.Tensor:
        return make_detector(name, **options).fit(data).score(query, query_logits).float()

    torch.testing.assert_close(ours("msp"), -pod.MaxSoftmax(None).predict_logits(query_logits))
    torch.testing.assert_close(ours("max_logit"), -pod.MaxLogit(None).predict_logits(query_logits))
    torch.testing.assert_close(ours("energy"), -pod.EnergyBased(None).predict_logits(query_logits))
    mahalanobis = pod.Mahalanobis(None).fit_features(features, labels).predict_features(query)
    torch.testing.assert_close(ours("mahalanobis", shrinkage=0.0), -2 * n * mahalanobis, rtol=1e-4, atol=1e-3)
    unit = torch.nn.functional.normalize
    normalised = pod.Mahalanobis(None).fit_features(unit(features, dim=1), labels).predict_features(unit(query, dim=1))
    torch.testing.assert_close(ours("mahalanobis_normalised", shrinkage=0.0), -2 * n * normalised, rtol=1e-4, atol=1e-3)
    rmd = pod.RMD(None).fit_features(features, labels).predict_features(query)
    torch.testing.assert_close(ours("rmd", shrinkage=0.0), -n * rmd, rtol=1e-4, atol=1e-3)
    knn = pod.KNN(None, k=5).fit_features(features, labels).predict_features(query)
    torch.testing.assert_close(ours("knn", k=5), -knn.float(), rtol=1e-5, atol=1e-5)
    vim = pod.ViM(None, d=3, w=weight, b=bias).fit_features(features, labels).predict_features(query)
    torch.testing.assert_close(ours("vim", principal_dim=3), -vim, rtol=1e-4, atol=1e-4)


def test_ledoit_wolf_shrinkage_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf

    features, _, _, _, _ = _fixed()
    centered = features.double() - features.double().mean(0)
    precision, shrinkage = ledoit_wolf_precision(centered)
    covariance, expected = ledoit_wolf(centered.numpy(), assume_centered=True)
    assert shrinkage == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(precision, torch.linalg.inv(torch.from_numpy(covariance)))


def test_a_class_without_photos_or_a_bad_k_is_refused() -> None:
    data, _, _ = _clusters()
    missing = FitData(data.features[:PER_CLASS], data.logits[:PER_CLASS], data.labels[:PER_CLASS])
    with pytest.raises(ValueError, match=r"classes \[1, 2, 3\] have no photos"):
        make_detector("mahalanobis").fit(missing)
    with pytest.raises(ValueError, match="k=5000"):
        make_detector("knn", k=5000).fit(data)
    with pytest.raises(ValueError, match="unknown detector 'odin'"):
        make_detector("odin")
