"""`train-food run` (the Prefect flow in this process) and `train-food deploy` (serve its deployment)."""

from __future__ import annotations

import argparse
import logging

from flows.cli.command import Verb
from flows.cli.flags import Fields
from ray_jobs.errors import UserInputError


class _NoBadInputTraceback(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for bad input the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserInputError):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_bad_input_tracebacks() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoBadInputTraceback())


def _pipeline_fields() -> Fields:
    from flows.pipeline_config import PipelineConfig

    return Fields(PipelineConfig)


def _run(args: argparse.Namespace) -> int:
    from flows.train_food import train_food

    fields = _pipeline_fields()
    fields.validated(args)  # bad flags fail here, in one line, before Prefect starts
    _hide_bad_input_tracebacks()
    train_food(**fields.given(args))
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserInputError("PREFECT_API_URL is not set: start `prefect server start --host 127.0.0.1` and "
                             "export PREFECT_API_URL=http://127.0.0.1:4200/api (`make demo` does both)")
    from flows.train_food import serve

    _hide_bad_input_tracebacks()
    serve()
    return 0


VERBS = (
    Verb(
        "run",
        help="run the train-food flow (ingest -> tune or train -> evaluate -> register) in this process",
        description="Same flow as `prefect deployment run train-food/train-food`; flags are its parameters.",
        add_flags=lambda parser: _pipeline_fields().add(parser),
        handler=_run,
    ),
    Verb(
        "deploy",
        help="serve the deployment train-food/train-food (needs PREFECT_API_URL of a running server)",
        description="Runs until interrupted; start runs with `prefect deployment run train-food/train-food`.",
        add_flags=lambda parser: None,
        handler=_deploy,
    ),
)
