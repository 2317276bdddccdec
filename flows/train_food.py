"""The Prefect flow `train-food`: ingest -> tune (or train) -> evaluate -> register [-> roll-forward-serving].

The flow-run process is the Ray driver: the train and tune tasks call `TorchTrainer.fit()` (or a
Tune sweep) directly and join `ray_address` (or RAY_ADDRESS), else start a local Ray cluster. The
parameters are flat so that `prefect deployment run train-food/train-food -p epochs=3` works; their
defaults come from `PipelineConfig`, the only place they are written down.
"""

from typing import Any

from prefect import flow

from flows.pipeline_config import PipelineConfig
from ray_jobs.config import Arch, CheckpointChoice, LossKind, Placement, WorkerCount
from ray_jobs.training.trainer import new_run_name
from tasks.artifacts import PipelineSummary, publish
from tasks.stages import evaluate_stage, ingest_stage, register_stage, serving_stage, train_stage, tune_stage

FLOW_NAME = "train-food"
DEPLOYMENT_NAME = "train-food"


def _default(name: str) -> Any:
    return PipelineConfig.model_fields[name].default


@flow(name=FLOW_NAME, log_prints=True)
def train_food(
    source: str = _default("source"),
    workspace: str = _default("workspace"),
    max_side: int | None = _default("max_side"),
    image_size: int = _default("image_size"),
    batch_size: int = _default("batch_size"),
    epochs: int = _default("epochs"),
    min_crop_scale: float = _default("min_crop_scale"),
    arch: Arch = _default("arch"),
    pretrained: bool = _default("pretrained"),
    feat_dim: int = _default("feat_dim"),
    loss: LossKind | None = _default("loss"),
    lam: float = _default("lam"),
    alpha: float = _default("alpha"),
    lr: float = _default("lr"),
    sweep: bool = _default("sweep"),
    sweep_samples: int = _default("sweep_samples"),
    workers: WorkerCount = _default("workers"),
    cpus_per_worker: float = _default("cpus_per_worker"),
    placement: Placement = _default("placement"),
    use_gpu: bool = _default("use_gpu"),
    ray_address: str | None = _default("ray_address"),
    storage: str | None = _default("storage"),
    mlflow_uri: str | None = _default("mlflow_uri"),
    model_name: str = _default("model_name"),
    serving_url: str | None = _default("serving_url"),
    limit_per_split: int | None = _default("limit_per_split"),
    loader_workers: int = _default("loader_workers"),
    seed: int = _default("seed"),
    checkpoint_choice: CheckpointChoice = _default("checkpoint_choice"),
) -> dict[str, Any]:
    """Train a food classifier (softmax, or center loss and its kin) on `source` and register it in MLflow."""
    cfg = PipelineConfig(**{name: value for name, value in locals().items()})

    # Content-addressed: <workspace>/datasets/<source name>-<fingerprint16>, reused only if it holds this build.
    ingested = ingest_stage(cfg.ingest())
    dataset = ingested.out

    run_name = new_run_name("sweep" if cfg.sweep else "train")
    trials = None
    if cfg.sweep:
        result, _ = tune_stage(cfg.sweep_config(dataset, run_name), cfg.tracking())
        checkpoint, trials = result.checkpoint, result.table
        lam, alpha = result.best_config["lam"], result.best_config["alpha"]
        plots = {"sweep_plot": str(result.outputs["plot"])}
    else:
        trained = train_stage(cfg.train(dataset, run_name))
        checkpoint, lam, alpha, plots = trained.checkpoint, cfg.lam, cfg.alpha, {}
    if checkpoint is None:
        raise RuntimeError(f"{run_name} produced no checkpoint to evaluate")

    report = evaluate_stage(cfg.evaluate(checkpoint, dataset, run_name))
    registration = register_stage(cfg.register(run_name, run_name if cfg.sweep else None), report)

    metrics = report.metrics
    summary = PipelineSummary(
        dataset=dataset,
        counts={split: sum(per_class.values()) for split, per_class in ingested.manifest["counts"].items()},
        ingest_cached=ingested.skipped,
        run_name=run_name,
        checkpoint=checkpoint,
        objective=cfg.objective,
        best_lam=lam,
        best_alpha=alpha,
        test_acc1=metrics["test_acc1"],
        test_acc5=metrics["test_acc5"],
        test_compactness=metrics["test_compactness"],
        model_uri=registration.model_uri,
        champion=registration.champion,
        registration=registration.reason,
        report=str(report.path),
        plots=plots | {role: str(path) for role, path in report.images().items()},
        sweep_trials=0 if trials is None else len(trials),
    )
    publish(summary, trials)
    (cfg.root / "latest_summary.txt").write_text(summary.text() + "\n")
    print(summary.text())
    serving = cfg.serving()  # last: a server that does not follow must not cost the summary above
    if serving is not None:
        if registration.champion:
            serving_stage(serving, cfg.model_name, registration)
        else:
            print(f"serving: not checked, version {registration.version} did not become champion")
    return summary.as_dict()


def serve() -> None:
    """Serve the deployment `train-food/train-food` from this process until interrupted."""
    train_food.serve(name=DEPLOYMENT_NAME, description=train_food.__doc__)
