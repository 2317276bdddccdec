"""FoodNet shapes per arch, heads, and the no-download weight loading rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from ray_jobs.config import ModelConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.foodnet import FoodNet, LGMHead, build_model, head_for_loss

ARCHS = ["efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0"]


# Every backbone with the linear head; the LGM head does not depend on the backbone, one arch is enough.
@pytest.mark.parametrize(("arch", "head"), [(a, "linear") for a in ARCHS] + [("resnet18", "lgm")])
def test_each_arch_builds_and_returns_features_and_logits(arch: str, head: str) -> None:
    """Cheap on purpose: 32 px, batch 2, eval mode."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, pretrained=False, feat_dim=16), num_classes=5, head=head).eval()
    assert isinstance(model, FoodNet)
    assert isinstance(model.head, LGMHead if head == "lgm" else torch.nn.Linear)
    with torch.no_grad():
        features, logits = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 16) and logits.shape == (2, 5)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    if head == "lgm":
        assert (logits <= 0).all()  # -1/2 squared distances


def test_head_for_loss() -> None:
    assert head_for_loss("softmax") == "linear"
    assert head_for_loss("center") == "linear"
    assert head_for_loss("lgm") == "lgm"
    with pytest.raises(UserInputError):
        head_for_loss("arcface")


def _backbone_matches(model: FoodNet, state: dict[str, torch.Tensor]) -> bool:
    own = model.backbone.state_dict()
    backbone_keys = [k for k in state if not k.startswith("fc.")]
    return set(own) == set(backbone_keys) and all(torch.equal(own[k], state[k]) for k in backbone_keys)


def test_weights_path_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = torchvision.models.resnet18().state_dict()  # torchvision format, fc.* included
    path = tmp_path / "resnet18_backbone.pth"
    torch.save(saved, path)
    model = build_model(ModelConfig(arch="resnet18", feat_dim=8, weights_path=str(path)), 3, "linear")
    assert _backbone_matches(model, saved)

    # A saved FoodNet state dict loads too (its backbone.* part).
    foodnet_path = tmp_path / "foodnet.pth"
    torch.save(model.state_dict(), foodnet_path)
    again = build_model(ModelConfig(arch="resnet18", feat_dim=8, weights_path=str(foodnet_path)), 3, "linear")
    assert _backbone_matches(again, saved)


def test_weights_path_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserInputError, match="nope.pth"):
        build_model(ModelConfig(arch="resnet18", weights_path=str(missing)), 3, "linear")
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), wrong)
    with pytest.raises(UserInputError, match=r"mobilenet\.pth.*resnet18"):
        build_model(ModelConfig(arch="resnet18", weights_path=str(wrong)), 3, "linear")


def test_pretrained_without_cache_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserInputError, match="weights_path"):
        build_model(ModelConfig(arch="resnet18", pretrained=True), 3, "linear")
    assert not any(tmp_path.rglob("*.pth"))  # nothing was downloaded


def test_pretrained_uses_the_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(2)
    saved = torchvision.models.resnet18().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(saved, cache / "resnet18-f37072fd.pth")  # the file name in ResNet18_Weights.DEFAULT.url
    model = build_model(ModelConfig(arch="resnet18", pretrained=True), 3, "linear")
    assert _backbone_matches(model, saved)


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_frozen_batch_norm_makes_a_samples_features_independent_of_its_batch(arch: str) -> None:
    """What lets N workers train like one on the same global batch (tests/test_multinode.py). Drop-path is
    off: its draws come from each rank's own stream, so with it on no two worker counts match anyway."""
    images = torch.randn(8, 3, 32, 32)
    for batch_norm, independent in (("train", False), ("frozen", True)):
        torch.manual_seed(0)
        net = build_model(ModelConfig(arch=arch, pretrained=False, batch_norm=batch_norm, feat_dim=8,
                                      drop_path_rate=0.0), 3, "linear")
        net.train()
        whole, _ = net(images)
        halves = torch.cat([net(images[:4])[0], net(images[4:])[0]])
        assert torch.allclose(whole, halves, atol=1e-5) is independent, batch_norm
        trainable = {name for name, p in net.backbone.named_parameters() if p.requires_grad}
        assert any("bn" in name for name in trainable) is not independent
