"""The pipeline's stages as Prefect tasks: thin wrappers over the plain functions that do the work.

Retries only where a retry can help: training and sweeps resume from their checkpoints under the
same run name, and MLflow writes may hit a busy server. Bad input (`UserInputError`) never retries.
Ingestion has no Prefect cache: its output folder is named after the build's fingerprint, and
`ingest` itself reuses that folder when its manifest holds the same fingerprint.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ray_jobs.config import SweepConfig, TrainConfig
from ray_jobs.errors import UserInputError
from ray_jobs.training.trainer import TrainResult, fit
from ray_jobs.tuning.sweep import SweepResult, trial_count
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig, EvaluationReport
from tasks.ingest.config import IngestConfig, IngestResult
from tasks.ingest.pipeline import ingest
from tasks.registry.config import RegisterConfig, RegistrationResult
from tasks.registry.register import register_model
from tasks.progress import StageProgress
from tasks.serving import ServingConfig, wait_for_version
from tasks.tune import LoggedSweep, Tracking, tune_and_log


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry any failure except a `UserInputError`."""
    try:
        state.result()
    except UserInputError:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_stage(cfg: IngestConfig) -> IngestResult:
    """Validate and shard the photos into cfg.out; `skipped` when cfg.out already holds this build."""
    progress = StageProgress("ingest-progress", f"ingest: {cfg.src}")
    result = ingest(cfg, on_progress=lambda done, total: progress.update(
        done / total, f"ingest: {done} of {total} files decoded"))
    progress.update(1.0, "ingest: up to date, reused" if result.skipped else "ingest: done", force=True)
    print(result.summary())
    return result


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def train_stage(cfg: TrainConfig) -> TrainResult:
    """One Ray Train run; a retry resumes it from its latest checkpoint (same run name).
    Its epoch lines go to the run's logs and move the 'training-progress' artifact."""
    progress = StageProgress("training-progress", f"training {cfg.run.name}: epoch 0 of {cfg.optim.epochs}")
    return fit(cfg, on_progress=progress.line)


@task(name="tune", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def tune_stage(cfg: SweepConfig, tracking: Tracking) -> tuple[SweepResult, LoggedSweep]:
    """The lambda/alpha sweep; a retry resumes it, keeping finished trials (same sweep name).
    Trial epochs go to the run's logs; trials done and the best val top-1 move 'sweep-progress'."""
    progress = StageProgress("sweep-progress", f"sweep {cfg.name}: 0 of {trial_count(cfg)} trials done")
    return tune_and_log(cfg, tracking, on_progress=progress.line)


@task(name="evaluate", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def evaluate_stage(cfg: EvaluateConfig) -> EvaluationReport:
    return evaluate_checkpoint(cfg)


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def register_stage(cfg: RegisterConfig, report: EvaluationReport) -> RegistrationResult:
    """Register the evaluated model; a retry reuses the version an earlier try created (same report,
    same idempotency key) and only finishes the champion decision, so it never adds a second version."""
    return register_model(cfg, report)


@task(name="roll-forward-serving", cache_policy=NO_CACHE)
def serving_stage(cfg: ServingConfig, model_name: str, registration: RegistrationResult) -> float:
    """Wait until `train-food serve` at cfg.url answers with the version this run made champion."""
    seconds = wait_for_version(cfg, model_name, registration.version)
    print(f"serving: {cfg.url} answers with {model_name} version {registration.version} "
          f"(after {seconds:.1f} s of waiting)")
    return seconds
