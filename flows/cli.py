"""The `train-food` console script: thin argparse front-ends over the installed packages.

Each subcommand imports what it needs lazily so `train-food --help` stays fast. Handlers return
an exit code; bad input raised as `UserInputError` is printed as one line (no traceback), exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray_jobs.errors import UserInputError, invalid_options


Handler = Callable[[argparse.Namespace], int]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train-food", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Offline, the temporary Prefect server's telemetry heartbeat fails with a "database is locked"
    # traceback; nothing is lost without it. On a busy 2-core machine that server can take longer
    # than Prefect's default 20 s to start. A user's own settings win.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = _build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserInputError as err:
        print(f"train-food {args.command}: error: {err}", file=sys.stderr)
        return 2


class _NoBadInputTraceback(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for bad input the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserInputError):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_bad_input_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoBadInputTraceback())


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train one model with Ray Train (CPU or GPU workers)")
    from flows.config_args import add_config_arguments

    add_config_arguments(parser)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from flows.config_args import config_from_args
    from ray_jobs.train import fit

    result = fit(config_from_args(args))
    best = result.best_metrics
    print(
        f"run {result.name}: {len(result.history)} epochs; best epoch {best.get('epoch')}: "
        f"val_acc1 {best.get('val_acc1', float('nan')):.3f}, val_acc5 {best.get('val_acc5', float('nan')):.3f}, "
        f"compactness {best.get('val_compactness', float('nan')):.3f}\n"
        f"best checkpoint: {result.best_checkpoint}"
    )
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    """`train-food tune --dataset DIR ...`: Ray Tune sweep over lambda and alpha, logged to MLflow."""
    from flows.config_args import add_config_arguments

    parser = sub.add_parser(
        "tune",
        help="sweep lambda and alpha with Ray Tune (ASHA early stopping), one TorchTrainer per trial",
        description="Training flags set the base config of every trial; --name names the sweep "
        "(reusing a name resumes it). Unset sweep options take the SweepConfig defaults.",
    )
    add_config_arguments(parser)
    sweep = parser.add_argument_group("sweep")
    suppress = argparse.SUPPRESS
    sweep.add_argument("--num-samples", type=int, default=suppress, metavar="N",
                       help="random trials (default 6), or runs of the whole grid in grid mode (default 1)")
    sweep.add_argument("--lam-range", type=float, nargs=2, default=suppress, metavar=("LO", "HI"),
                       help="lambda, log-uniform (default 1e-4 1e-1)")
    sweep.add_argument("--alpha-range", type=float, nargs=2, default=suppress, metavar=("LO", "HI"),
                       help="alpha, uniform (default 0.05 1.0)")
    sweep.add_argument("--grid-lams", type=float, nargs="+", default=suppress, metavar="LAM",
                       help="grid mode: these lambdas x --grid-alphas")
    sweep.add_argument("--grid-alphas", type=float, nargs="+", default=suppress, metavar="ALPHA")
    sweep.add_argument("--scheduler", choices=("asha", "none"), default=suppress,
                       help="asha stops weak trials early (default); none runs all to the end")
    sweep.add_argument("--grace-period", type=int, default=suppress, metavar="EPOCHS")
    sweep.add_argument("--reduction-factor", type=float, default=suppress, metavar="F")
    sweep.add_argument("--max-concurrent-trials", type=int, default=suppress, metavar="N",
                       help="default: as many as the cluster holds")
    sweep.add_argument("--resume", action="store_true", default=suppress, help="resume the sweep --name")
    sweep.add_argument("--report-dir", default=suppress, metavar="DIR", help="trial table and plot")
    tracking = parser.add_argument_group("mlflow")
    tracking.add_argument("--tracking-uri", default=None, metavar="URI",
                          help="MLflow server or store (default: MLFLOW_TRACKING_URI, else the workspace SQLite)")
    tracking.add_argument("--workspace", default="workspace", metavar="DIR", help="workspace of the default store")
    tracking.add_argument("--experiment", default="train-food", metavar="NAME", help="MLflow experiment")
    parser.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.config_args import config_from_args
    from ray_jobs.config import SweepConfig
    from tasks.tune import Tracking, tune_and_log

    train = config_from_args(args)
    sweep_fields = set(SweepConfig.model_fields) - {"train", "name"}
    options = {key: value for key, value in vars(args).items() if key in sweep_fields}
    try:
        cfg = SweepConfig(train=train.model_copy(update={"run": train.run.model_copy(update={"name": None})}),
                          name=train.run.name, **options)
    except ValidationError as err:
        raise invalid_options(err) from None
    result, logged = tune_and_log(cfg, Tracking(args.tracking_uri, args.workspace, args.experiment))
    with_columns = ["trial_id", "lam", "alpha", "status", "epochs", "best_val_acc1", "val_compactness"]
    print(result.table[with_columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        f"sweep {result.name}: best val_acc1 {result.best_val_acc1:.3f} at lam {result.best_config['lam']:.4g}, "
        f"alpha {result.best_config['alpha']:.3f}\nbest checkpoint: {result.best_checkpoint}\n"
        f"table: {result.outputs['csv']}  plot: {result.outputs['plot']}  MLflow run: {logged.parent_run_id}"
    )
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    """`train-food run ...`: the whole `train-food` Prefect flow, in this process."""
    from flows.config_args import add_flat_arguments
    from flows.pipeline_config import PipelineConfig

    parser = sub.add_parser(
        "run",
        help="run the train-food flow (ingest -> tune or train -> evaluate -> register) in this process",
        description="Same flow as `prefect deployment run train-food/train-food`; flags are its parameters.",
    )
    add_flat_arguments(parser, PipelineConfig)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.pipeline_config import PipelineConfig
    from flows.train_food import train_food

    options = {key: value for key, value in vars(args).items() if key in PipelineConfig.model_fields}
    try:
        PipelineConfig(**options)
    except ValidationError as err:
        raise invalid_options(err) from None
    _hide_bad_input_tracebacks()
    train_food(**options)
    return 0


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "deploy",
        help="serve the deployment train-food/train-food (needs PREFECT_API_URL of a running server)",
        description="Runs until interrupted; start runs with `prefect deployment run train-food/train-food`.",
    )
    parser.set_defaults(handler=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserInputError("PREFECT_API_URL is not set: start `prefect server start --host 127.0.0.1` and "
                             "export PREFECT_API_URL=http://127.0.0.1:4200/api (`make demo` does both)")
    from flows.train_food import serve

    _hide_bad_input_tracebacks()
    serve()
    return 0


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    """`train-food ingest SRC --out DIR`: validate an ImageFolder tree into Parquet shards."""
    p = sub.add_parser(
        "ingest",
        help="validate an ImageFolder tree and write it as Parquet shards + manifest.json",
        description="Decode every image once, quarantine bad files, drop exact duplicates, split "
        "train/val/test (stratified, seeded) and write Parquet shards to DIR atomically. "
        "Unset options take the IngestConfig defaults (tasks/ingest.py).",
        argument_default=argparse.SUPPRESS,  # so IngestConfig holds the only copy of each default
    )
    p.add_argument("src", metavar="SRC", help="SRC/<class>/<image>, or SRC/<split>/<class>/<image> "
                   "with split folders train, val (or valid, validation) and test")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder or pyarrow.fs URI (s3://bucket/prefix)")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="share of each class carved into val if SRC has no val split")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help="share of each class carved into test if SRC has no test split")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the split and of the row shuffle")
    p.add_argument("--max-side", type=int, metavar="N",
                   help="re-encode (JPEG q90) images whose longest side exceeds N")
    p.add_argument("--max-file-bytes", type=int, metavar="N",
                   help="quarantine larger files without reading them (default 64 MiB)")
    p.add_argument("--shard-rows", type=int, metavar="N", help="at most N rows per Parquet file")
    p.add_argument("--workers", type=int, metavar="N", help="decode processes (default: CPU count)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if DIR already holds this build (never replaces another build)")
    p.set_defaults(handler=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    from tasks.ingest import ingest, parse_config

    options = {key: value for key, value in vars(args).items() if key not in ("command", "handler")}
    cfg = parse_config(options)
    print(ingest(cfg).summary())
    return 0


def _options(args: argparse.Namespace) -> dict:
    """The flags the user gave (parsers use SUPPRESS, so the configs hold the only defaults)."""
    return {key: value for key, value in vars(args).items() if key not in ("command", "handler")}


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    """`train-food evaluate CHECKPOINT --dataset DIR --reports DIR`: test metrics, confusion matrix, PCA."""
    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on the test split: report.json, confusion matrix, feature projection",
        description="Unset options take the EvaluateConfig defaults (tasks/evaluate.py).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("checkpoint", help="checkpoint directory (checkpoint_epoch_NNNN) or checkpoint.pt file")
    p.add_argument("--dataset", required=True, metavar="DIR", help="dataset written by `train-food ingest`")
    p.add_argument("--reports", required=True, metavar="DIR", help="folder for report.json and the figures")
    p.add_argument("--split", choices=("train", "val", "test"), help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per inference batch")
    p.add_argument("--loader-workers", type=int, metavar="N", help="DataLoader decode processes")
    p.add_argument("--limit", type=int, metavar="N", help="smoke test: only the first N images")
    p.add_argument("--cross-dataset", action="store_true",
                   help="evaluate on a dataset other than the one the checkpoint trained on (the report says so)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--accept-share", type=float, metavar="S",
                   help="open set: share of known val images the distance thresholds accept (default: 0.95)")
    p.add_argument("--distance", choices=["relative", "cosine", "euclidean"],
                   help="open set: distance from the features to the class centers (default: relative)")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from tasks.evaluate import evaluate_checkpoint, parse_config

    report = evaluate_checkpoint(parse_config(_options(args)))
    m, s = report.metrics, report.split
    print(
        f"{s}: {report.counts['images']} images, acc1 {m[f'{s}_acc1']:.4f}, acc5 {m[f'{s}_acc5']:.4f}, "
        f"macro F1 {m[f'{s}_macro_f1']:.4f}, compactness {m[f'{s}_compactness']:.4f}\nreport: {report.path}"
    )
    if report.open_set is None:
        print("open set: the checkpoint has no calibration (no val split of its own dataset); nothing flagged unknown")
    else:
        o = report.open_set
        print(f"open set: {o.accepted} of {report.counts['images']} images ({o.accepted_share:.1%}) within their "
              f"nearest class's {o.distance} distance threshold (set to accept {o.accept_share:.0%} of val images)")
    if report.cross_dataset:
        print(f"note: cross-dataset evaluation (trained on dataset {report.train_dataset_fingerprint[:12] or 'unknown'}, "
              f"scored on {report.dataset_fingerprint[:12]})")
    return 0


def _add_register(sub: argparse._SubParsersAction) -> None:
    """`train-food register CHECKPOINT --report report.json`: MLflow version + champion alias if better."""
    p = sub.add_parser(
        "register",
        help="log an evaluated checkpoint to MLflow as a new model version; move @champion only if better",
        description="Unset options take the RegisterConfig defaults (tasks/register.py). Without "
        "--tracking-uri or MLFLOW_TRACKING_URI, MLflow data goes to WORKSPACE/mlflow (SQLite + artifacts).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("checkpoint", help="the checkpoint the report was made from")
    p.add_argument("--report", required=True, metavar="FILE", help="report.json written by `train-food evaluate`")
    p.add_argument("--model-name", metavar="NAME", help="registered model name (default: food-classifier)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow server or store (default: workspace SQLite)")
    p.add_argument("--workspace", metavar="DIR",
                   help="holds mlflow/mlflow.db and mlflow/artifacts (default: ./workspace)")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: train-food)")
    p.add_argument("--metric", metavar="NAME", help="report metric that decides the champion (default: test_acc1)")
    p.add_argument("--lower-is-better", dest="greater_is_better", action="store_false",
                   help="the metric is a loss: lower values win")
    p.add_argument("--alias", metavar="NAME", help="alias of the best version (default: champion)")
    p.add_argument("--run-name", metavar="NAME", help="MLflow run name (default: register-<training run>)")
    p.add_argument("--sweep", metavar="NAME", help="lineage tag: the sweep this checkpoint won")
    p.add_argument("--tag", dest="tags", action="append", metavar="KEY=VALUE", help="extra tag (repeatable)")
    p.set_defaults(handler=_run_register)


def _run_register(args: argparse.Namespace) -> int:
    from tasks.register import parse_config, register_model

    options = _options(args)
    checkpoint, report = options.pop("checkpoint"), options.pop("report")
    if "tags" in options:
        pairs = [tag.partition("=") for tag in options["tags"]]
        if any(not key or not sep for key, sep, _ in pairs):
            raise UserInputError(f"--tag expects KEY=VALUE, got {options['tags']}")
        options["tags"] = {key: value for key, _, value in pairs}
    result = register_model(parse_config(options), report, checkpoint)
    print(f"registered {result.model_uri} (run {result.run_id})\n{result.reason}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    """`train-food predict IMAGE...`: top-k classes per image from the champion (or any model)."""
    p = sub.add_parser(
        "predict",
        help="print the top-k classes of image files (exit 1 if any file could not be read)",
        description="Loads models:/food-classifier@champion unless --model names another MLflow model "
        "URI or a checkpoint directory/file.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", metavar="URI_OR_CHECKPOINT", default=None,
                   help="MLflow model URI or checkpoint path (default: models:/food-classifier@champion)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to print per image (default: 5)")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow server or store (default: MLFLOW_TRACKING_URI, else the workspace SQLite)")
    p.add_argument("--workspace", metavar="DIR", default="workspace", help="workspace of the default store")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ray_jobs.predict import format_prediction, load_model, predict_files

    tracking_uri = None
    if args.model is None or (":" in args.model and not Path(args.model).exists()):  # a URI
        from tasks.register import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.tracking_uri, args.workspace, create=False)
    model = load_model(args.model, tracking_uri)
    if model.calibration is None:
        print(f"train-food predict: note: model {model.source} has no open-set calibration (evaluate the checkpoint "
              "to add one): no photo is flagged unknown", file=sys.stderr)
    predictions, failures = predict_files(model, args.images, top_k=args.top_k)
    for prediction in predictions:
        print(format_prediction(prediction))
    for failure in failures:
        print(f"train-food predict: error: {failure.error}", file=sys.stderr)
    return 1 if failures else 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """`train-food serve`: the champion (or any model) behind HTTP with Ray Serve, until interrupted."""
    from flows.config_args import add_flat_arguments
    from ray_jobs.serve_config import ServeConfig

    parser = sub.add_parser(
        "serve",
        help="serve a model over HTTP with Ray Serve: POST /predict (raw image bytes), GET /health",
        description="Loads models:/food-classifier@champion unless --model names another; follows the "
        "alias to new versions every --alias-poll-s seconds. Example: curl --data-binary @photo.jpg "
        "http://127.0.0.1:8000/predict. Unset options take the ServeConfig defaults (ray_jobs/serve_config.py).",
    )
    add_flat_arguments(parser, ServeConfig)
    parser.add_argument("--workspace", default="workspace", metavar="DIR", help="workspace of the default store")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from ray_jobs.model_ref import check_model_source, parse_model_ref

    cfg = _serve_config(args)
    serving = check_model_source(parse_model_ref(cfg.model), cfg.tracking_uri)

    from ray import serve

    from ray_jobs.serve_app import start
    from ray_jobs.train import ensure_ray

    ensure_ray(args.ray_address)
    start(cfg)
    print(f"serving {serving} at http://{cfg.host}:{cfg.port}/predict (health: /health); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.delete(cfg.app_name)
    return 0


def _serve_config(args: argparse.Namespace) -> Any:
    """The validated ServeConfig with what replicas need absolute (they run in another cwd):
    a checkpoint path, or the resolved MLflow store of a model URI."""
    from pathlib import Path

    from pydantic import ValidationError

    from ray_jobs.serve_config import ServeConfig

    options = {key: value for key, value in vars(args).items() if key in ServeConfig.model_fields}
    try:
        cfg = ServeConfig(**options)
    except ValidationError as err:
        raise invalid_options(err) from None
    if Path(cfg.model).exists():
        return cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})
    if ":" not in cfg.model:  # neither a path nor a URI: check_model_source says so
        return cfg
    from tasks.register import resolve_tracking_uri

    return cfg.model_copy(update={"tracking_uri": resolve_tracking_uri(cfg.tracking_uri, args.workspace, create=False)})


# Subcommand registrars: each adds one subparser and sets `handler`.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_run, _add_deploy, _add_ingest, _add_train, _add_tune, _add_evaluate, _add_register, _add_predict,
    _add_serve,
]


if __name__ == "__main__":
    raise SystemExit(main())
