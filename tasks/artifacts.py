"""What a flow run shows in the Prefect UI: a markdown summary with its plots inline, the sweep's trial table.

The plots are embedded as `data:image/png;base64` URIs: the Prefect UI renders those in a markdown
artifact, while a `file://` link to the worker's disk opens nowhere from a browser.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ray_jobs.storage import is_uri

INLINE_LIMIT_BYTES = 4 * 1024 * 1024  # larger plots are linked, not embedded


@dataclass(frozen=True)
class PipelineSummary:
    """One flow run's outcome, in the words of the summary artifact."""

    dataset: str
    counts: dict[str, int]
    ingest_cached: bool
    run_name: str
    checkpoint: str
    objective: str  # LossConfig.kind; softmax has no lambda or alpha
    best_lam: float
    best_alpha: float
    test_acc1: float
    test_acc5: float
    test_compactness: float
    model_uri: str
    champion: bool
    registration: str
    report: str
    plots: dict[str, str] = field(default_factory=dict)
    sweep_trials: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        counts = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        source = "sweep" if self.sweep_trials else "training run"
        lines = [
            "# train-food",
            "",
            "| | |",
            "|---|---|",
            f"| data | {counts} images ({'ingest cache hit' if self.ingest_cached else 'ingested'}) |",
            f"| {source} | `{self.run_name}`" + (f" ({self.sweep_trials} trials)" if self.sweep_trials else "") + " |",
            f"| objective | {self.objective_text()} |",
            f"| test top-1 / top-5 | {self.test_acc1:.4f} / {self.test_acc5:.4f} |",
            f"| test compactness (intra/inter) | {self.test_compactness:.4f} |",
            f"| registered | `{self.model_uri}`: {'**champion**' if self.champion else 'not promoted'} |",
            "",
            self.registration,
            "",
            f"Report: `{self.report}`",
        ]
        for role, path in self.plots.items():
            lines += ["", f"## {role.replace('_', ' ')}", "", image_markdown(role, path)]
        return "\n".join(lines)

    def objective_text(self) -> str:
        """'softmax', or e.g. 'center, lambda 0.1, alpha 0.100' (the best of a sweep)."""
        if self.objective == "softmax":
            return "softmax"
        return f"{self.objective}, lambda {self.best_lam:.4g}, alpha {self.best_alpha:.3f}"

    def text(self) -> str:
        counts = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        return (
            f"data: {counts} ({'cache hit' if self.ingest_cached else 'ingested'})\n"
            f"{'sweep' if self.sweep_trials else 'run'} {self.run_name}: {self.objective_text()}\n"
            f"test top-1 {self.test_acc1:.4f}, top-5 {self.test_acc5:.4f}, compactness {self.test_compactness:.4f}\n"
            f"registered {self.model_uri}: {self.registration}\nreport: {self.report}"
        )


def image_markdown(role: str, path: str) -> str:
    """The PNG inline as a data URI; a link when it is remote, missing or too big to embed."""
    file = Path(path)
    if is_uri(path) or not file.is_file() or file.stat().st_size > INLINE_LIMIT_BYTES:
        return f"[{role}]({path}) (not embedded)"
    encoded = base64.b64encode(file.read_bytes()).decode("ascii")
    return f"![{role}](data:image/png;base64,{encoded})"


def publish(summary: PipelineSummary, trials: pd.DataFrame | None) -> None:
    """Attach the summary (plots inline) and the trial table (sweeps only) to the flow run."""
    create_markdown_artifact(key="train-food-summary", markdown=summary.markdown(),
                             description="Data, best lambda/alpha, test metrics, registry outcome")
    if trials is not None:
        records = [
            {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in row.items()}
            for row in trials.to_dict("records")
        ]
        create_table_artifact(key="sweep-trials", table=records, description="Every trial of the sweep")
