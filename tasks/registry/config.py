"""How a registration is judged and where it goes (`RegisterConfig`), and what it decided (`RegistrationResult`)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class RegisterConfig(BaseModel):
    """Where to register and how to judge the new version. Defaults live here only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(default="food-classifier", min_length=1, description="Registered model name.")
    tracking_uri: str | None = Field(
        default=None, description="MLflow server or store; None: MLFLOW_TRACKING_URI, else SQLite in the workspace."
    )
    workspace: str = Field(default="workspace", description="Holds mlflow/mlflow.db and mlflow/artifacts by default.")
    experiment: str = Field(default="train-food", min_length=1, description="MLflow experiment of the runs.")
    metric: str = Field(default="test_acc1", description="Report metric that decides the champion.")
    greater_is_better: bool = Field(default=True, description="False for losses or compactness.")
    alias: str = Field(default="champion", min_length=1, description="Alias that marks the best version.")
    run_name: str | None = Field(default=None, description="MLflow run name; None: register-<training run>.")
    sweep: str | None = Field(default=None, description="Lineage: the sweep this checkpoint won, if any.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the run and the version (KEY=VALUE).")
    compare_across_datasets: bool = Field(
        default=False,
        description="Compare with the champion even when it was scored on another test split (recorded on the version).",
    )


@dataclass(frozen=True)
class RegistrationResult:
    """The new version, whether it became champion and why (one line, fit for printing)."""

    version: str
    champion: bool
    reason: str
    run_id: str
    model_uri: str  # models:/<name>/<version>
    metric: float
    previous_champion: str | None
