"""Center loss (value, gradient, alpha rule, distributed sync), L-GM math and the Objective interface."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ray_jobs.config import LossConfig, ModelConfig
from ray_jobs.errors import UserInputError
from ray_jobs.training.losses import (
    CenterLoss,
    CenterLossObjective,
    ContrastiveCenterObjective,
    LGMObjective,
    LossOutput,
    Objective,
    SoftmaxObjective,
    build_objective,
)

# ray_jobs.model (torchvision, ~2-3 s to import) is imported inside the tests that need it: every
# spawned worker re-imports this module, and the center-sync workers should start fast.
# The hand example shared by the center tests: C=3, D=2.
HAND_CENTERS = torch.tensor([[1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
HAND_X = torch.tensor([[3.0, 1.0], [0.0, 0.0], [2.0, 4.0]])
HAND_Y = torch.tensor([0, 1, 1])


def _hand_center_loss() -> CenterLoss:
    cl = CenterLoss(num_classes=3, feat_dim=2, alpha=0.5)
    cl.centers.copy_(HAND_CENTERS)
    return cl


def test_centers_start_at_zero_in_fp32() -> None:
    cl = CenterLoss(num_classes=4, feat_dim=3, alpha=0.5)
    assert cl.centers.dtype == torch.float32
    assert torch.equal(cl.centers, torch.zeros(4, 3))


def test_update_centers_matches_hand_computation() -> None:
    """alpha = 0.5, centers c0=(1,1), c1=(0,2), c2=(-1,0); batch x=(3,1)->0, (0,0)->1, (2,4)->1.

    class 0: n=1, sum(c0 - x) = (-2, 0), delta = (-2, 0)/2 = (-1, 0), c0 = (1,1) - 0.5*(-1,0) = (1.5, 1)
    class 1: n=2, sum(c1 - x) = (0,2) + (-2,-2) = (-2, 0), delta = (-2/3, 0), c1 = (0,2) + (1/3, 0) = (1/3, 2)
    class 2: no samples, delta = 0, stays (-1, 0)
    """
    cl = _hand_center_loss()
    cl.update_centers(HAND_X, HAND_Y)
    expected = torch.tensor([[1.5, 1.0], [1.0 / 3.0, 2.0], [-1.0, 0.0]])
    torch.testing.assert_close(cl.centers, expected, atol=1e-6, rtol=0)


def test_loss_value_and_gradient_by_hand() -> None:
    """x - c_y = (2,0), (0,-2), (2,2): 1/2 |.|^2 = 2, 2, 4 -> mean 8/3; d/dx = (x - c_y) / B, B = 3."""
    cl = _hand_center_loss()
    x = HAND_X.clone().requires_grad_(True)
    loss = cl.loss(x, HAND_Y)
    assert loss.item() == pytest.approx(8.0 / 3.0, abs=1e-6)
    loss.backward()
    expected_grad = torch.tensor([[2.0, 0.0], [0.0, -2.0], [2.0, 2.0]]) / 3.0
    torch.testing.assert_close(x.grad, expected_grad, atol=1e-6, rtol=0)
    assert not cl.centers.requires_grad and cl.centers.grad is None


def test_update_skips_non_finite_batch() -> None:
    cl = _hand_center_loss()
    x = HAND_X.clone()
    x[1, 0] = float("nan")
    cl.update_centers(x, HAND_Y)
    assert torch.equal(cl.centers, HAND_CENTERS)


def test_center_state_dict_round_trip_and_shape_check() -> None:
    cl = _hand_center_loss()
    state = cl.state_dict()
    assert state["centers"].device.type == "cpu" and state["alpha"] == 0.5
    other = CenterLoss(3, 2, alpha=0.1)
    other.load_state_dict(state)
    assert torch.equal(other.centers, HAND_CENTERS) and other.alpha == 0.5
    with pytest.raises(UserInputError, match="shape"):
        CenterLoss(4, 2, alpha=0.5).load_state_dict(state)


# ---- distributed: 2 gloo processes ---------------------------------------------------------------

SYNC_C, SYNC_D, SYNC_ALPHA = 5, 4, 0.5


def _sync_batches() -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Per step (rank-0 batch, rank-1 batch): different sizes (one empty), classes 0-1 only on rank 0,
    class 3 only on rank 1, class 2 on both, class 4 never."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for n0, n1 in [(5, 3), (2, 7), (4, 0), (6, 4), (3, 5)]:
        x0 = torch.randn(n0, SYNC_D, generator=g) * 3 + 1
        y0 = torch.randint(0, 3, (n0,), generator=g)
        x1 = torch.randn(n1, SYNC_D, generator=g) * 3 - 1
        y1 = torch.randint(2, 4, (n1,), generator=g)
        steps.append(((x0, y0), (x1, y1)))
    return steps


def _naive_update(centers: torch.Tensor, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's rule written per class, independent of the implementation under test."""
    new = centers.clone()
    for j in range(centers.shape[0]):
        xj = x[y == j]
        new[j] = centers[j] - alpha * (centers[j] - xj).sum(dim=0) / (1 + len(xj))
    return new


def _center_sync_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    original = dist.all_reduce
    numels: list[int] = []

    def counting_all_reduce(tensor: torch.Tensor, *args, **kwargs):
        numels.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # ray_jobs.training.losses looks it up on the module at call time
    try:
        cl = CenterLoss(SYNC_C, SYNC_D, alpha=SYNC_ALPHA)
        calls_per_step = []
        for step in _sync_batches():
            before = len(numels)
            cl.update_centers(*step[rank])
            calls_per_step.append(len(numels) - before)
        result = {"centers": cl.centers, "calls": calls_per_step, "numels": numels}
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


def test_distributed_update_equals_single_process_on_global_batch(tmp_path: Path) -> None:
    mp.spawn(_center_sync_worker, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))

    # Exactly one fused all-reduce of C*D + C floats per step, on both ranks.
    steps = len(_sync_batches())
    assert r0["calls"] == r1["calls"] == [1] * steps
    assert r0["numels"] == r1["numels"] == [SYNC_C * SYNC_D + SYNC_C] * steps
    # Ranks hold bit-identical centers (no drift).
    assert torch.equal(r0["centers"], r1["centers"])

    # One process, concatenated batches: the implementation (fp32) and the per-class rule (fp64).
    single = CenterLoss(SYNC_C, SYNC_D, alpha=SYNC_ALPHA)
    naive = torch.zeros(SYNC_C, SYNC_D, dtype=torch.float64)
    for (x0, y0), (x1, y1) in _sync_batches():
        x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
        single.update_centers(x, y)
        naive = _naive_update(naive, x.double(), y, SYNC_ALPHA)
    torch.testing.assert_close(r0["centers"], single.centers, atol=1e-6, rtol=0)
    torch.testing.assert_close(r0["centers"].double(), naive, atol=1e-5, rtol=0)
    assert torch.equal(r0["centers"][4], torch.zeros(SYNC_D))  # never seen: never moves
    assert (r0["centers"][:4].abs().sum(dim=1) > 0).all()


def _lam0_ddp_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    from ray_jobs.model.foodnet import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        model = build_model(ModelConfig(arch="resnet18", pretrained=False, feat_dim=8), num_classes=3, head="linear")
        ddp = DistributedDataParallel(model)  # default settings: find_unused_parameters=False
        objective = build_objective(LossConfig(kind="center", lam=0.0, alpha=0.5), num_classes=3, feat_dim=8)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(100 + rank)
        outputs = []
        for _ in range(2):  # DDP reports unused parameters on the forward *after* the first step
            x = torch.randn(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 3, (4,), generator=g)
            features, logits = ddp(x)
            out = objective(features, logits, y)
            optimizer.zero_grad()
            out.total.backward()
            optimizer.step()
            objective.after_step(features.detach(), y)
            outputs.append(out)
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(
            {
                "centers": objective.state_dict()["centers"],
                "params": params,
                "total_equals_ce": all(torch.equal(o.total, o.ce) for o in outputs),
                "aux_positive": all(o.aux.item() > 0 for o in outputs),
            },
            Path(out_dir) / f"{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_lambda_zero_trains_under_default_ddp_and_still_moves_centers(tmp_path: Path) -> None:
    mp.spawn(_lam0_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["total_equals_ce"] and r0["aux_positive"]
    assert r0["centers"].abs().sum() > 0
    assert torch.equal(r0["centers"], r1["centers"])
    torch.testing.assert_close(r0["params"], r1["params"])


# ---- L-GM ------------------------------------------------------------------------------------------


def test_lgm_logits_and_loss_by_hand() -> None:
    """means mu0=(0,0), mu1=(2,0); x_a=(0.5,0) label 0, x_b=(2,1) label 1; margin 0.5, lam 0.1.

    |x_a-mu|^2 = 0.25, 2.25 -> logits (-0.125, -1.125); |x_b-mu|^2 = 5, 1 -> logits (-2.5, -0.5).
    margin scales the true-class logit by 1.5: (-0.1875, -1.125) and (-2.5, -0.75).
    CE_a = 0.1875 + log(e^-0.1875 + e^-1.125), CE_b = 0.75 + log(e^-2.5 + e^-0.75);
    aux = mean(0.125, 0.5) = 0.3125; total = mean CE + 0.1 * 0.3125.
    """
    from ray_jobs.model.foodnet import LGMHead

    head = LGMHead(num_classes=2, feat_dim=2)
    with torch.no_grad():
        head.means.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    x = torch.tensor([[0.5, 0.0], [2.0, 1.0]])
    y = torch.tensor([0, 1])
    logits = head(x)
    torch.testing.assert_close(logits, torch.tensor([[-0.125, -1.125], [-2.5, -0.5]]), atol=1e-6, rtol=0)

    out = LGMObjective(lam=0.1, margin=0.5)(x, logits, y)
    ce_a = 0.1875 + math.log(math.exp(-0.1875) + math.exp(-1.125))
    ce_b = 0.75 + math.log(math.exp(-2.5) + math.exp(-0.75))
    assert out.ce.item() == pytest.approx((ce_a + ce_b) / 2, abs=1e-6)
    assert out.aux.item() == pytest.approx(0.3125, abs=1e-6)
    assert out.total.item() == pytest.approx((ce_a + ce_b) / 2 + 0.1 * 0.3125, abs=1e-6)


def test_lgm_argmax_is_nearest_mean() -> None:
    from ray_jobs.model.foodnet import LGMHead

    g = torch.Generator().manual_seed(0)
    head = LGMHead(num_classes=7, feat_dim=5)
    with torch.no_grad():
        head.means.copy_(torch.randn(7, 5, generator=g))
    x = torch.randn(64, 5, generator=g) * 2
    assert torch.equal(head(x).argmax(dim=1), torch.cdist(x, head.means.detach()).argmin(dim=1))


# ---- the Objective interface -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"), [("softmax", SoftmaxObjective), ("center", CenterLossObjective), ("lgm", LGMObjective),
                      ("contrastive_center", ContrastiveCenterObjective)]
)
def test_build_objective_kinds_share_the_interface(kind: str, cls: type) -> None:
    objective = build_objective(LossConfig(kind=kind, lam=0.5), num_classes=3, feat_dim=4)
    assert isinstance(objective, cls) and isinstance(objective, Objective) and objective.kind == kind
    g = torch.Generator().manual_seed(0)
    features, logits = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = objective(features, logits, labels)
    assert isinstance(out, LossOutput) and all(t.ndim == 0 for t in (out.total, out.ce, out.aux))
    torch.testing.assert_close(out.total, out.ce + 0.5 * out.aux)
    if kind == "softmax":
        assert out.aux.item() == 0.0
    objective.after_step(features, labels)
    assert objective.to("cpu") is objective


def test_center_objective_after_step_moves_centers_and_round_trips() -> None:
    objective = build_objective(LossConfig(kind="center", lam=0.0, alpha=0.5), num_classes=3, feat_dim=2)
    objective.after_step(HAND_X, HAND_Y)
    state = objective.state_dict()
    # From zero centers: c0 = 0.5 * (3,1) / 2, c1 = 0.5 * (2,4) / 3, c2 stays 0.
    expected = torch.tensor([[0.75, 0.25], [1.0 / 3.0, 2.0 / 3.0], [0.0, 0.0]])
    torch.testing.assert_close(state["centers"], expected, atol=1e-6, rtol=0)
    fresh = build_objective(LossConfig(kind="center"), num_classes=3, feat_dim=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state_dict()["centers"], state["centers"])


@pytest.mark.parametrize("kind", ["softmax", "center", "lgm", "contrastive_center"])
def test_objective_under_bf16_autocast_returns_fp32(kind: str) -> None:
    from ray_jobs.model.foodnet import LGMHead

    torch.manual_seed(0)
    embed = torch.nn.Linear(6, 4)
    head = LGMHead(3, 4) if kind == "lgm" else torch.nn.Linear(4, 3)
    objective = build_objective(LossConfig(kind=kind, lam=0.1), num_classes=3, feat_dim=4)
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = embed(x)
        out = objective(features, head(features), y)
    assert features.dtype == torch.bfloat16
    assert out.total.dtype == out.ce.dtype == out.aux.dtype == torch.float32
    out.total.backward()
    assert embed.weight.grad is not None and torch.isfinite(embed.weight.grad).all()
    ref_features = embed(x)
    ref = objective(ref_features, head(ref_features), y)
    assert out.total.item() == pytest.approx(ref.total.item(), rel=5e-2)


# ---- recipe: label smoothing, contrastive-center loss -------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "center", "lgm", "contrastive_center"])
def test_label_smoothing_reaches_every_objective(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    features, logits, labels = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2] * 2)
    plain = build_objective(LossConfig(kind=kind, label_smoothing=0.0), num_classes=3, feat_dim=4)
    smooth = build_objective(LossConfig(kind=kind, label_smoothing=0.2), num_classes=3, feat_dim=4)
    assert smooth(features, logits, labels).ce.item() != pytest.approx(plain(features, logits, labels).ce.item())
    if kind != "lgm":  # L-GM smooths the margin-scaled logits
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
        torch.testing.assert_close(smooth(features, logits, labels).ce, expected)


def test_contrastive_center_term_by_hand_and_its_gradient_pushes_from_other_centers() -> None:
    objective = build_objective(LossConfig(kind="contrastive_center", lam=1.0, delta=1.0), num_classes=3, feat_dim=2)
    objective.load_state_dict({"centers": torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), "alpha": 0.5})
    x = torch.tensor([[1.0, 0.0]], requires_grad=True)
    out = objective(x, torch.zeros(1, 3), torch.tensor([0]))
    # own: |(1,0)|^2 = 1; others: |(1,0)-(2,0)|^2 + |(1,0)-(0,2)|^2 = 1 + 5 = 6 -> 0.5 * 1 / (6 + 1)
    assert out.aux.item() == pytest.approx(0.5 / 7)
    out.aux.backward()
    # d/dx of 0.5 * a/b, a = |x-c0|^2, b = |x-c1|^2 + |x-c2|^2 + 1: 0.5 * (2(x-c0) b - a (2(x-c1) + 2(x-c2))) / b^2
    a, b = 1.0, 7.0
    grad = 0.5 * (2 * torch.tensor([1.0, 0.0]) * b - a * (2 * torch.tensor([-1.0, 0.0]) + 2 * torch.tensor([1.0, -2.0]))) / b**2
    torch.testing.assert_close(x.grad[0], grad)
    center = build_objective(LossConfig(kind="center", alpha=0.5), num_classes=3, feat_dim=2)
    center.load_state_dict(objective.state_dict())
    features, labels = torch.tensor([[1.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1])
    objective.after_step(features, labels)
    center.after_step(features, labels)
    assert torch.equal(objective.state_dict()["centers"], center.state_dict()["centers"]), "same alpha rule"
