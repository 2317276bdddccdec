"""How `train-food predict` prints a prediction: the path, then one line per class, the verdict on the first."""

from __future__ import annotations

from ray_jobs.inference.predict import Prediction


def open_set_verdict(prediction: Prediction) -> str:
    """`unknown (vim score 3.120 < 4.870)` or `known (vim score 9.410 >= 4.870)`; "" uncalibrated."""
    if prediction.score is None:
        return ""
    word, sign = ("unknown", "<") if prediction.unknown else ("known", ">=")
    return f"{word} ({prediction.detector} score {prediction.score:.3f} {sign} {prediction.threshold:.3f})"


def format_prediction(prediction: Prediction) -> str:
    """`path` then one indented `rank. class  probability` line per class; the open-set verdict ends the first one."""
    lines = [prediction.path]
    lines += [f"  {rank}. {name:<24} {prob:.4f}" for rank, (name, prob) in enumerate(prediction.top, start=1)]
    verdict = open_set_verdict(prediction)
    if verdict and len(lines) > 1:
        lines[1] += f"   {verdict}"
    return "\n".join(lines)
