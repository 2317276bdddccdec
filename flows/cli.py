"""The `train-food` console script: thin argparse front-ends over the installed packages.

Each subcommand imports what it needs lazily so `train-food --help` stays fast. Handlers return
an exit code; bad input raised as `UserInputError` is printed as one line (no traceback), exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ray_jobs.errors import UserInputError


Handler = Callable[[argparse.Namespace], int]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train-food", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserInputError as err:
        print(f"train-food {args.command}: error: {err}", file=sys.stderr)
        return 2


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train one model with Ray Train (CPU or GPU workers)")
    from flows.config_args import add_config_arguments

    add_config_arguments(parser)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from flows.config_args import config_from_args
    from ray_jobs.train import fit

    result = fit(config_from_args(args))
    metrics = result.metrics
    print(
        f"run {result.name}: val_acc1 {metrics.get('val_acc1', float('nan')):.3f}, "
        f"val_acc5 {metrics.get('val_acc5', float('nan')):.3f}, "
        f"compactness {metrics.get('val_compactness', float('nan')):.3f}\n"
        f"best checkpoint: {result.best_checkpoint}"
    )
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
    p.add_argument("--shard-rows", type=int, metavar="N", help="at most N rows per Parquet file")
    p.add_argument("--workers", type=int, metavar="N", help="decode processes (default: CPU count)")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
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
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from tasks.evaluate import evaluate_checkpoint, parse_config

    report = evaluate_checkpoint(parse_config(_options(args)))
    m, s = report.metrics, report.split
    print(
        f"{s}: {report.counts['images']} images, acc1 {m[f'{s}_acc1']:.4f}, acc5 {m[f'{s}_acc5']:.4f}, "
        f"macro F1 {m[f'{s}_macro_f1']:.4f}, compactness {m[f'{s}_compactness']:.4f}\nreport: {report.path}"
    )
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
    predictions, failures = predict_files(model, args.images, top_k=args.top_k)
    for prediction in predictions:
        print(format_prediction(prediction))
    for failure in failures:
        print(f"train-food predict: error: {failure.error}", file=sys.stderr)
    return 1 if failures else 0


# Subcommand registrars: each adds one subparser and sets `handler`.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_ingest, _add_evaluate, _add_register, _add_predict
]


if __name__ == "__main__":
    raise SystemExit(main())
