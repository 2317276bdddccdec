"""The summary cells every bench report prints: `mean ± sd` over runs, and a paired mean difference with
a 95% bootstrap interval over models (one definition, so every table reads the same way)."""
from __future__ import annotations

import random
import statistics


def mean_sd(values: list[float]) -> str:
    """`mean ± sample sd` to 3 places (the value alone for one run)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired_interval(diffs: list[float], rng: random.Random, draws: int = 2000) -> str:
    """`+mean (low, high)`: the mean of paired differences and its 95% bootstrap interval, resampling the
    pairs (models) with `rng`, so a report that passes one seeded generator prints the same figures each run."""
    boots = sorted(statistics.mean(rng.choice(diffs) for _ in diffs) for _ in range(draws))
    return f"{statistics.mean(diffs):+.3f} ({boots[int(0.025 * draws)]:+.3f}, {boots[int(0.975 * draws) - 1]:+.3f})"
