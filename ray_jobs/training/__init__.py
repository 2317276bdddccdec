"""Training: losses (center loss, L-GM), the plain-torch engine, optimizer and schedule, the Ray Train
worker loop, checkpointing and resume, and the driver (`trainer.fit`).

May import: `ray_jobs.data`, `ray_jobs.model`, the top-level contracts and `cluster`.
"""
