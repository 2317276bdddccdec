"""Ray Tune sweeps over lambda and alpha (one TorchTrainer per trial), and the sweep's table and plot.

May import: `ray_jobs.training` (the trainer each trial builds), `ray_jobs.model.checkpoint`, the contracts.
"""
