"""`train-food evaluate` and `register`: a checkpoint's test report, then an MLflow version judged on it."""

from __future__ import annotations

import argparse

from pydantic import BaseModel, ConfigDict, Field

from flows.cli.command import Verb
from flows.cli.flags import Fields, tag


class RegisterInputs(BaseModel):
    """What `register` records, apart from how it is judged (`RegisterConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str = Field(description="The checkpoint the report was made from.")
    report: str = Field(description="report.json written by `train-food evaluate`.")


def _evaluate_fields() -> Fields:
    from tasks.evaluation.report import EvaluateConfig

    return Fields(EvaluateConfig, positional=frozenset({"checkpoint"}), metavars={"dataset": "DIR", "reports": "DIR"})


def _evaluate(args: argparse.Namespace) -> int:
    from tasks.evaluation.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(_evaluate_fields().validated(args))
    m, s = report.metrics, report.split
    print(
        f"{s}: {report.counts['images']} images, acc1 {m[f'{s}_acc1']:.4f}, acc5 {m[f'{s}_acc5']:.4f}, "
        f"macro F1 {m[f'{s}_macro_f1']:.4f}, compactness {m[f'{s}_compactness']:.4f}\nreport: {report.path}"
    )
    if report.open_set is None:
        print("open set: the checkpoint has no calibration (no val split of its own dataset); nothing flagged unknown")
    else:
        o = report.open_set
        print(f"open set: {o.accepted} of {report.counts['images']} images ({o.accepted_share:.1%}) accepted as known "
              f"by {o.description}")
    if report.cross_dataset:
        print(f"note: cross-dataset evaluation (trained on dataset {report.train_dataset_fingerprint[:12] or 'unknown'}, "
              f"scored on {report.dataset_fingerprint[:12]})")
    return 0


def _register_fields() -> tuple[Fields, Fields]:
    from tasks.registry.config import RegisterConfig

    inputs = Fields(RegisterInputs, positional=frozenset({"checkpoint"}), metavars={"report": "FILE"})
    return inputs, Fields(RegisterConfig, names={"tags": "tag"}, title="registration")


def _add_register_flags(parser: argparse.ArgumentParser) -> None:
    inputs, judged = _register_fields()
    inputs.add(parser)
    group = judged.add(parser)
    # The flag this command had before the generated --no-greater-is-better; both stay.
    lower = group.add_argument("--lower-is-better", dest="greater_is_better", action="store_false",
                                default=argparse.SUPPRESS,
                                help="same as --no-greater-is-better: the metric is a loss, lower values win")
    tag(lower, judged.config, "greater_is_better")


def _register(args: argparse.Namespace) -> int:
    from tasks.registry.register import register_model

    inputs, judged = _register_fields()
    where = inputs.validated(args)
    result = register_model(judged.validated(args), where.report, where.checkpoint)
    print(f"registered {result.model_uri} (run {result.run_id})\n{result.reason}")
    return 0


VERBS = (
    Verb(
        "evaluate",
        help="evaluate a checkpoint on the test split: report.json, confusion matrix, feature projection",
        description="Unset options take the EvaluateConfig defaults (tasks/evaluation/report.py).",
        add_flags=lambda parser: _evaluate_fields().add(parser),
        handler=_evaluate,
    ),
    Verb(
        "register",
        help="log an evaluated checkpoint to MLflow as a new model version; move @champion only if better",
        description="Unset options take the RegisterConfig defaults (tasks/registry/config.py). Without "
        "--tracking-uri or MLFLOW_TRACKING_URI, MLflow data goes to WORKSPACE/mlflow (SQLite + artifacts).",
        add_flags=_add_register_flags,
        handler=_register,
    ),
)
