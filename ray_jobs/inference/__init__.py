"""Using a trained model: load it by path or MLflow URI, batched predict, open-set detectors, calibration and scoring.

May import: `ray_jobs.data`, `ray_jobs.model`, `ray_jobs.training.engine` (its `predict` pass), the contracts.
"""
