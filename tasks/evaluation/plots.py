"""The two evaluation figures: a labelled confusion matrix and a 2-D projection of the features.

Built on `matplotlib.figure.Figure` directly (rendered by Agg when saved), never `pyplot`: no
global figure state and no GUI backend, so it is safe in worker threads, Prefect tasks and tests.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

_ANNOTATE_UP_TO = 30  # classes; beyond that the counts are unreadable, the colours still tell


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Counts (rows = true class, columns = predicted), each cell annotated when there are few classes."""
    n = len(classes)
    side = min(max(6.0, 0.4 * n + 3.0), 40.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.7, label="images")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    if n <= _ANNOTATE_UP_TO:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                colour = "white" if matrix[i, j] > threshold else "black"
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour, fontsize=7)
    fig.savefig(path, dpi=100)


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"
    cmap = matplotlib.colormaps[name]
    return [cmap(i) for i in range(n)] if n <= 20 else [cmap(i / max(n - 1, 1)) for i in range(n)]


def plot_projection(
    points: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, title: str, axis_names: tuple[str, str]
) -> None:
    """Scatter of 2-D points coloured by true class, with a legend outside the axes."""
    fig = Figure(figsize=(9.0, 6.5), layout="constrained")
    ax = fig.add_subplot()
    for index, (name, colour) in enumerate(zip(classes, _colours(len(classes)), strict=True)):
        mask = labels == index
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=14, color=colour, label=name, alpha=0.8, linewidths=0)
    ax.set(title=title, xlabel=axis_names[0], ylabel=axis_names[1])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, markerscale=1.5,
              ncols=1 + len(classes) // 40, frameon=False)
    fig.savefig(path, dpi=100)
