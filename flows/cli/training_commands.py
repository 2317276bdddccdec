"""`train-food train` (one Ray Train run) and `train-food tune` (a Ray Tune sweep logged to MLflow)."""

from __future__ import annotations

import argparse

from flows.cli.command import Verb
from flows.cli.flags import Fields, add_config_arguments, config_from_args


def _train(args: argparse.Namespace) -> int:
    from ray_jobs.training.trainer import fit

    cfg = config_from_args(args)
    result = fit(cfg)
    kept = result.checkpoint_metrics
    which = "last epoch" if cfg.run.checkpoint_choice == "last" else "best val epoch"
    print(
        f"run {result.name}: {len(result.history)} epochs; {which} {kept.get('epoch')}: "
        f"val_acc1 {kept.get('val_acc1', float('nan')):.3f}, val_acc5 {kept.get('val_acc5', float('nan')):.3f}, "
        f"compactness {kept.get('val_compactness', float('nan')):.3f}\n"
        f"checkpoint ({which}): {result.checkpoint}"
    )
    return 0


def _sweep_fields() -> tuple[Fields, Fields]:
    """The sweep's own options (the base training config comes from the training flags) and MLflow's."""
    from ray_jobs.config import SweepConfig
    from tasks.tune import Tracking

    sweep = Fields(SweepConfig, skip=frozenset({"train", "name"}), title="sweep",
                   metavars={"lam_range": ("LO", "HI"), "alpha_range": ("LO", "HI"),
                             "grid_lams": "LAM", "grid_alphas": "ALPHA"})
    return sweep, Fields(Tracking, title="mlflow")


def _add_tune_flags(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    for fields in _sweep_fields():
        fields.add(parser)


def _tune(args: argparse.Namespace) -> int:
    from tasks.tune import tune_and_log

    train = config_from_args(args)
    if "loss.kind" not in vars(args):  # a sweep tunes center loss's knobs unless --loss names another objective
        train = train.model_copy(update={"loss": train.loss.model_copy(update={"kind": "center"})})
    sweep_fields, tracking_fields = _sweep_fields()
    cfg = sweep_fields.validated(
        args, train=train.model_copy(update={"run": train.run.model_copy(update={"name": None})}),
        name=train.run.name,
    )
    result, logged = tune_and_log(cfg, tracking_fields.validated(args))
    with_columns = ["trial_id", "lam", "alpha", "status", "epochs", "best_val_acc1", "val_compactness"]
    print(result.table[with_columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        f"sweep {result.name}: best val_acc1 {result.best_val_acc1:.3f} at lam {result.best_config['lam']:.4g}, "
        f"alpha {result.best_config['alpha']:.3f}\ncheckpoint of that trial ({cfg.train.run.checkpoint_choice.replace('_', ' ')}): "
        f"{result.checkpoint}\n"
        f"table: {result.outputs['csv']}  plot: {result.outputs['plot']}  MLflow run: {logged.parent_run_id}"
    )
    return 0


VERBS = (
    Verb(
        "train",
        help="train one model with Ray Train (CPU or GPU workers)",
        description="Unset options take the TrainConfig defaults (ray_jobs/config.py); --name reuses a run "
        "(resumes it).",
        add_flags=add_config_arguments,
        handler=_train,
    ),
    Verb(
        "tune",
        help="sweep lambda and alpha with Ray Tune (ASHA early stopping), one TorchTrainer per trial",
        description="Training flags set the base config of every trial; --name names the sweep "
        "(reusing a name resumes it). Unset sweep options take the SweepConfig defaults.",
        add_flags=_add_tune_flags,
        handler=_tune,
    ),
)
