"""The flow's parameters as one validated object, and the stage configs derived from it.

Prefect deployments take flat `-p key=value` parameters, so the flow signature is flat; this
module turns those values into the per-stage configs (ingest, train or sweep, evaluate, register)
so every default still lives with its stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_jobs.config import (
    Arch,
    CheckpointChoice,
    DataConfig,
    LossConfig,
    LossKind,
    ModelConfig,
    OptimConfig,
    Placement,
    RunConfig,
    ScalingConfig,
    SweepConfig,
    TrainConfig,
    WorkerCount,
)
from tasks.evaluation.report import EvaluateConfig
from tasks.ingest.config import FINGERPRINT_FIELD, IngestConfig
from tasks.registry.config import RegisterConfig
from tasks.serving import ServingConfig, ServingUrl
from tasks.tune import Tracking

BUNDLED_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "food-sample"


def _stage(config: type[BaseModel], field: str) -> Any:
    """A stage config's default: the flow restates no default of its own (bar `DEMO_BUDGET`)."""
    return config.model_fields[field].get_default(call_default_factory=True)


# The flow's one departure from the stage defaults: a budget that trains the bundled 128-px sample in
# minutes on a laptop (the stages default to EfficientNet-Lite2 at its 260 px and 10 epochs, for real
# data). Pass the flow parameters to train at the stage defaults
# (`-p arch=efficientnet_lite2 -p image_size=260 -p epochs=10`).
DEMO_BUDGET: dict[str, Any] = {"arch": "efficientnet_lite0", "max_side": 128, "image_size": 112, "epochs": 3,
                               "sweep_samples": 4}


class PipelineConfig(BaseModel):
    """Everything a `train-food` flow run needs; defaults make a bare run work on the bundled sample."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(default=str(BUNDLED_SAMPLE), description="ImageFolder of photos to ingest.")
    workspace: str = Field(default="workspace", description="Datasets, runs, reports and the MLflow store.")
    max_side: int | None = Field(default=DEMO_BUDGET["max_side"], ge=1, description="Ingest: re-encode larger images.")
    image_size: int = Field(default=DEMO_BUDGET["image_size"], ge=16, description="Square crop fed to the model.")
    batch_size: int = Field(default=_stage(DataConfig, "batch_size"), ge=1,
                            description="Global batch, split over the workers.")
    epochs: int = Field(default=DEMO_BUDGET["epochs"], ge=1, description="Training epochs (one warm-up epoch first).")
    min_crop_scale: float = Field(default=_stage(DataConfig, "min_crop_scale"), gt=0.0, le=1.0,
                                  description="Augmentation: smallest crop area.")
    arch: Arch = Field(default=DEMO_BUDGET["arch"], description="Backbone.")
    pretrained: bool = Field(default=_stage(ModelConfig, "pretrained"),
                             description="Fine-tune ImageNet weights (False: from scratch).")
    feat_dim: int = Field(default=_stage(ModelConfig, "feat_dim"), ge=2, description="Width of the embedding.")
    loss: LossKind | None = Field(
        default=None, description=f"Objective; None: {_stage(LossConfig, 'kind')}, or center loss for a sweep (whose "
                                  "lambda and alpha it tunes).")
    lam: float = Field(default=_stage(LossConfig, "lam"), ge=0.0, description="Center-loss weight (sweep off).")
    alpha: float = Field(default=_stage(LossConfig, "alpha"), ge=0.0, le=1.0,
                         description="Center learning rate (sweep off).")
    lr: float = Field(default=_stage(OptimConfig, "lr"), gt=0.0,
                      description="AdamW lr of the new layers; the backbone's is 0.3x.")
    sweep: bool = Field(default=False, description="Tune lambda and alpha instead of one training run.")
    sweep_samples: int = Field(default=DEMO_BUDGET["sweep_samples"], ge=1, description="Trials of the sweep.")
    workers: WorkerCount = Field(default=_stage(ScalingConfig, "num_workers"),
                                 description="Ray Train workers per run or trial: N, or MIN-MAX for an elastic group; "
                                             "0 = in-process.")
    cpus_per_worker: float = Field(default=_stage(ScalingConfig, "cpus_per_worker"), gt=0.0,
                                   description="CPUs each Ray Train worker reserves.")
    placement: Placement = Field(default=_stage(ScalingConfig, "placement"),
                                 description="spread: Ray Train workers on different nodes.")
    use_gpu: bool = Field(default=_stage(ScalingConfig, "use_gpu"), description="One GPU per Ray Train worker.")
    ray_address: str | None = Field(default=_stage(RunConfig, "ray_address"),
                                    description="Ray cluster; None: RAY_ADDRESS, else local.")
    storage: str | None = Field(
        default=None, description="Checkpoints: a path or pyarrow.fs URI every Ray node reads (s3://bucket/prefix?"
                                  "endpoint_override=host:port); None: <workspace>/ray_results.")
    mlflow_uri: str | None = Field(default=_stage(RegisterConfig, "tracking_uri"),
                                   description="MLflow server; None: workspace SQLite.")
    model_name: str = Field(default=_stage(RegisterConfig, "model_name"), description="Registered model name.")
    serving_url: ServingUrl | None = Field(
        default=None, description="After a new champion: wait until `train-food serve` at this URL answers with it "
                                  "(its replicas follow the alias); None: skip.")
    limit_per_split: int | None = Field(default=_stage(DataConfig, "limit_per_split"), ge=1,
                                        description="Smoke tests: rows per split.")
    loader_workers: int = Field(default=_stage(DataConfig, "loader_workers"), ge=0,
                                description="DataLoader processes per Ray worker.")
    seed: int = Field(default=_stage(RunConfig, "seed"), description="Seeds the split, the data order and the init.")
    checkpoint_choice: CheckpointChoice = Field(default=_stage(RunConfig, "checkpoint_choice"),
                                                description="The checkpoint evaluated and registered: the last "
                                                            "epoch's, or the best by val top-1.")

    @model_validator(mode="after")
    def _sweep_needs_knobs(self) -> PipelineConfig:
        if self.sweep and self.loss == "softmax":
            raise ValueError("sweep tunes lambda and alpha, which softmax does not have: set loss to center, "
                             "contrastive_center or lgm")
        return self

    @property
    def objective(self) -> LossKind:
        """The loss kind this run trains with (see `loss`)."""
        return self.loss or ("center" if self.sweep else _stage(LossConfig, "kind"))

    @property
    def root(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    def ingest(self) -> IngestConfig:
        """Ingest into `<workspace>/datasets/<source name>-<fingerprint16>`: one immutable folder per build,
        named by `ingest` once its one read of the source has given the fingerprint."""
        name = Path(self.source.rstrip("/")).name or "dataset"
        return IngestConfig(out=str(self.root / "datasets" / f"{name}-{FINGERPRINT_FIELD}"), src=self.source,
                            max_side=self.max_side, seed=self.seed)

    def train(self, dataset: str, run_name: str) -> TrainConfig:
        return TrainConfig(
            data=DataConfig(dataset=dataset, image_size=self.image_size, batch_size=self.batch_size,
                            min_crop_scale=self.min_crop_scale, loader_workers=self.loader_workers,
                            limit_per_split=self.limit_per_split),
            model=ModelConfig(arch=self.arch, pretrained=self.pretrained, feat_dim=self.feat_dim),
            loss=LossConfig(kind=self.objective, lam=self.lam, alpha=self.alpha),
            optim=OptimConfig(lr=self.lr, epochs=self.epochs, warmup_epochs=min(1, self.epochs - 1)),
            scaling=ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu,
                                  cpus_per_worker=self.cpus_per_worker, placement=self.placement),
            run=RunConfig(name=run_name, storage_path=self.storage or str(self.root / "ray_results"), seed=self.seed,
                          ray_address=self.ray_address, checkpoint_choice=self.checkpoint_choice),
        )

    def sweep_config(self, dataset: str, sweep_name: str) -> SweepConfig:
        train = self.train(dataset, run_name="unused")
        train = train.model_copy(update={"run": train.run.model_copy(update={"name": None})})
        return SweepConfig(train=train, name=sweep_name, num_samples=self.sweep_samples,
                           report_dir=str(self.root / "sweeps"))

    def evaluate(self, checkpoint: str, dataset: str, run_name: str) -> EvaluateConfig:
        return EvaluateConfig(checkpoint=checkpoint, dataset=dataset, reports=str(self.root / "reports" / run_name),
                              loader_workers=0)

    def register(self, run_name: str, sweep: str | None) -> RegisterConfig:
        return RegisterConfig(model_name=self.model_name, tracking_uri=self.mlflow_uri, workspace=str(self.root),
                              run_name=f"register-{run_name}", sweep=sweep)

    def serving(self) -> ServingConfig | None:
        return ServingConfig(url=self.serving_url) if self.serving_url else None

    def tracking(self) -> Tracking:
        return Tracking(tracking_uri=self.mlflow_uri, workspace=str(self.root))
