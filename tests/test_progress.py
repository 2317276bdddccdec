"""Rank 0's progress relay: losing it costs the relay, never the run."""

from __future__ import annotations

from ray_jobs.training.progress import Progress
from ray_jobs.training.worker_loop import _announce


class _LostQueue:
    """What rank 0 holds after the relay's actor died with its node."""

    def put(self, progress: Progress) -> None:
        raise ConnectionError("the actor died unexpectedly")


def test_a_lost_relay_prints_the_line_where_the_worker_runs_and_training_goes_on(capsys):
    _announce(_LostQueue(), Progress("epoch 3/4  loss 0.5", epoch=3, epochs=4))
    printed = capsys.readouterr().out
    assert "epoch 3/4  loss 0.5" in printed and "progress relay lost: ConnectionError" in printed


def test_no_sink_announces_nothing(capsys):
    _announce(None, Progress("resumed from checkpoint of epoch 2"))
    assert capsys.readouterr().out == ""
