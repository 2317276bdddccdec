"""The sweep's table (CSV and Parquet) and its plot of val top-1 over (lambda, alpha)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def plot_sweep(table: pd.DataFrame, path: Path) -> Path:
    """Scatter of trials on log(lambda) x alpha, coloured by best val top-1, sized by epochs run."""
    fig = Figure(figsize=(6.4, 4.8), dpi=120)  # no pyplot: no global figure state, no GUI backend
    ax = fig.add_subplot()
    scored = table.dropna(subset=["best_val_acc1"])
    points = ax.scatter(
        scored["lam"], scored["alpha"], c=scored["best_val_acc1"], s=40 + 40 * scored["epochs"],
        cmap="viridis", edgecolors="black",
    )
    for _, row in scored.iterrows():
        ax.annotate(f"{row['best_val_acc1']:.2f}", (row["lam"], row["alpha"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("lambda (center-loss weight)")
    ax.set_ylabel("alpha (center learning rate)")
    ax.set_title("Sweep: best val top-1 per trial (size = epochs run)")
    fig.colorbar(points, ax=ax, label="val top-1")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_sweep_outputs(directory: Path, table: pd.DataFrame) -> dict[str, Path]:
    """`trials.csv`, `trials.parquet` and `sweep.png` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / "trials.csv", "parquet": directory / "trials.parquet", "plot": directory / "sweep.png"}
    table.to_csv(paths["csv"], index=False)
    table.to_parquet(paths["parquet"], index=False)
    plot_sweep(table, paths["plot"])
    return paths
