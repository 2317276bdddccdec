"""The fine-tuning recipe: weight-decay groups, EMA, per-backbone preprocessing, old checkpoints' meaning, bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import InterpolationMode, v2

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, ScalingConfig, TrainConfig, saved_train_config
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibrate import calibrate_checkpoint, fit_subset
from ray_jobs.model.checkpoint import load_checkpoint, save_checkpoint
from ray_jobs.model.foodnet import build_model, head_for_loss
from ray_jobs.model.inputs import eval_preprocessing, input_spec, with_resolved_inputs
from ray_jobs.training.engine import Precision, evaluate, predict
from ray_jobs.training.optim import optimizer_for
from ray_jobs.training.trainer import fit
from test_train import tiny_config


def _expected_no_decay(model: nn.Module) -> set[int]:
    """Every norm's parameters, every bias and the L-GM means, found by module type, not by the rule under test."""
    ids = set()
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            ids |= {id(p) for p in module.parameters(recurse=False)}
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            ids.add(id(module.bias))
    ids |= {id(p) for name, p in model.named_parameters() if name == "head.means"}
    return ids


@pytest.mark.parametrize(("arch", "kind"), [("efficientnet_lite0", "lgm"), ("resnet18", "center")])
def test_norms_biases_and_lgm_means_are_never_decayed(arch: str, kind: str) -> None:
    cfg = TrainConfig(data=DataConfig(dataset="unused"), model=ModelConfig(arch=arch, pretrained=False, feat_dim=8),
                      loss=LossConfig(kind=kind), optim=OptimConfig(weight_decay=0.05))
    model = build_model(cfg.model, num_classes=3, head=head_for_loss(kind))
    groups = optimizer_for(cfg, model).param_groups
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    expected = _expected_no_decay(model)
    assert undecayed == expected and len(expected) > 10
    assert decayed == {id(p) for p in model.parameters()} - expected
    if kind == "lgm":
        assert id(model.head.means) in undecayed
    old = optimizer_for(cfg.model_copy(update={"optim": OptimConfig(weight_decay=0.05, decay_norm_and_bias=True)}),
                        model)
    assert [g["weight_decay"] for g in old.param_groups] == [0.05, 0.05], "the old recipe: two groups, all decayed"


def test_each_backbone_is_evaluated_with_its_own_interpolation_and_crop() -> None:
    for arch, resize, crop in (("efficientnet_lite0", 256, 224), ("efficientnet_lite1", 272, 240),
                               ("efficientnet_lite2", 292, 260)):
        cfg = with_resolved_inputs(TrainConfig(data=DataConfig(dataset="unused"), model=ModelConfig(arch=arch)))
        assert cfg.data.image_size == crop and cfg.data.interpolation == "bicubic"
        resize_step, crop_step = eval_preprocessing(cfg).transforms[:2]
        assert isinstance(resize_step, v2.Resize) and resize_step.size == [resize]
        assert resize_step.interpolation == InterpolationMode.BICUBIC
        assert crop_step.size == (crop, crop)
    resnet = with_resolved_inputs(TrainConfig(data=DataConfig(dataset="unused"), model=ModelConfig(arch="resnet18")))
    assert eval_preprocessing(resnet).transforms[0].interpolation == InterpolationMode.BILINEAR


def _old_checkpoint_config() -> dict:
    """A config as the code before the recipe fields saved it (no augment, interpolation, crop_pct, ...)."""
    cfg = TrainConfig(data=DataConfig(dataset="unused", image_size=144)).model_dump(mode="json")
    for section, keys in {"data": ("augment", "random_erasing", "interpolation", "crop_pct"),
                          "model": ("drop_path_rate",), "loss": ("label_smoothing", "delta"),
                          "optim": ("decay_norm_and_bias", "ema_decay"), "scaling": ("precision",)}.items():
        for key in keys:
            del cfg[section][key]
    return cfg


def test_an_old_checkpoint_keeps_the_preprocessing_and_recipe_it_was_trained_with() -> None:
    old = saved_train_config(_old_checkpoint_config())
    assert (old.data.interpolation, old.data.augment, old.data.random_erasing) == ("bilinear", "crop_flip", 0.0)
    assert (old.loss.label_smoothing, old.model.drop_path_rate, old.optim.decay_norm_and_bias) == (0.0, 0.0, True)
    resize_step, crop_step = eval_preprocessing(old).transforms[:2]
    assert resize_step.size == [round(144 * 256 / 224)] and crop_step.size == (144, 144)
    assert resize_step.interpolation == InterpolationMode.BILINEAR
    new = with_resolved_inputs(TrainConfig(data=DataConfig(dataset="unused", image_size=144)))
    assert eval_preprocessing(new).transforms[0].interpolation == InterpolationMode.BICUBIC


def test_resuming_an_old_checkpoint_under_the_new_recipe_is_refused_in_one_line(tiny_dataset, tmp_path) -> None:
    cfg = tiny_config(tiny_dataset, tmp_path, workers=0, epochs=2, name="old", limit=16)
    fit(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 1})}))
    folder = tmp_path / "old" / "checkpoint_epoch_0001"
    state = load_checkpoint(folder)
    for key in ("augment", "random_erasing", "interpolation", "crop_pct"):  # as an older train-food wrote it
        del state["config"]["data"][key]
    del state["config"]["loss"]["label_smoothing"]
    save_checkpoint(folder, state)
    with pytest.raises(UserInputError) as refused:
        fit(cfg)
    message = str(refused.value)
    assert "\n" not in message and "data.augment 'crop_flip' -> 'randaugment'" in message
    assert "loss.label_smoothing 0.0 -> 0.1" in message and "data.interpolation 'bilinear' -> 'bilinear'" not in message


def test_with_an_ema_the_average_is_evaluated_and_saved_and_resume_continues_the_trained_weights(
        tiny_dataset, tmp_path) -> None:
    cfg = tiny_config(tiny_dataset, tmp_path, workers=0, epochs=2, name="ema", limit=32)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"ema_decay": 0.9})})
    result = fit(cfg)
    state = load_checkpoint(tmp_path / "ema" / "checkpoint_epoch_0002")
    assert set(state["model"]) == set(state["trained_model"])
    assert any(not torch.equal(state["model"][k], state["trained_model"][k]) for k in state["model"])
    saved = saved_train_config(state["config"])
    val = ParquetImageDataset(tiny_dataset, "val", eval_preprocessing(saved), limit=32)
    net = build_model(saved.model.model_copy(update={"pretrained": False}), len(state["classes"]), "linear")
    scores = {}
    for part in ("model", "trained_model"):
        net.load_state_dict(state[part])
        scores[part] = evaluate(net.eval(), DataLoader(val, batch_size=16), torch.device("cpu"),
                                len(state["classes"]), precision=Precision(torch.device("cpu"), "fp32"))["val_ce_loss"]
    assert result.history[-1]["val_ce_loss"] == pytest.approx(scores["model"], abs=1e-6)
    assert scores["model"] != pytest.approx(scores["trained_model"], abs=1e-6)

    # the open-set calibration is fit on the kept (EMA) model's features, never the trained weights'
    checkpoint = tmp_path / "ema" / "checkpoint_epoch_0002"
    calibration = calibrate_checkpoint(checkpoint, tiny_dataset)
    train = ParquetImageDataset(tiny_dataset, "train", eval_preprocessing(saved))
    rows = Subset(train, fit_subset(train.labels))
    bank = {}
    for part in ("model", "trained_model"):
        net.load_state_dict(state[part])
        features = predict(net, DataLoader(rows, batch_size=64), torch.device("cpu"))[0]
        bank[part] = torch.nn.functional.normalize(features.double(), dim=1).float().double()
    stored = calibration.detectors["knn"].tensors["bank"]
    torch.testing.assert_close(stored, bank["model"], atol=1e-6, rtol=0)
    assert not torch.allclose(stored, bank["trained_model"], atol=1e-4)


def test_the_center_loss_arithmetic_stays_fp32_when_the_model_runs_in_bf16() -> None:
    from ray_jobs.training.losses import build_objective

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", pretrained=False, feat_dim=8), num_classes=3, head="linear")
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    precision = Precision(torch.device("cpu"), "bf16")
    with precision.autocast():
        features, logits = model(images)
    assert features.dtype == logits.dtype == torch.bfloat16
    objective = build_objective(LossConfig(kind="center", alpha=0.5), num_classes=3, feat_dim=8)
    out = objective(features, logits, labels)
    assert out.aux.dtype == out.total.dtype == torch.float32
    objective.after_step(features.detach(), labels)
    centers = objective.state_dict()["centers"]
    assert centers.dtype == torch.float32
    x = features.detach().float()  # the fp32 rule applied to the bf16 features
    expected = torch.stack([0.5 * x[labels == j].sum(0) / (1 + (labels == j).sum()) for j in range(3)])
    torch.testing.assert_close(centers, expected, atol=1e-6, rtol=0)
    assert Precision(torch.device("cpu"), "fp32").enabled is False


def test_auto_precision_picks_bf16_on_a_cpu_only_where_it_measured_faster() -> None:
    from ray_jobs.training.engine import cpu_has_bf16

    cpu = torch.device("cpu")
    assert Precision(cpu, "auto", image_size=128).enabled is False
    assert Precision(cpu, "auto", image_size=224).enabled is cpu_has_bf16()
    assert Precision(cpu, "bf16", image_size=32).enabled is True


def test_the_resolved_input_is_what_the_checkpoint_records(tiny_dataset, tmp_path) -> None:
    cfg = tiny_config(tiny_dataset, tmp_path, workers=0, epochs=1, name="inputs", limit=16)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": None}),
                                 "scaling": ScalingConfig(num_workers=0, precision="fp32")})
    fit(cfg)
    saved = load_checkpoint(tmp_path / "inputs" / "checkpoint_epoch_0001")["config"]
    assert (saved["data"]["image_size"], saved["data"]["interpolation"], saved["data"]["crop_pct"]) == (224, "bilinear", 0.875)
    assert saved["model"]["drop_path_rate"] == 0.0 and input_spec(saved_train_config(saved)).resize == 256
    assert Path(tmp_path / "inputs").is_dir()
