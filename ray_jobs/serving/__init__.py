"""Ray Serve: the HTTP app, its config, and the live model that follows the champion alias.

May import: `ray_jobs.inference`, `ray_jobs.data`, the contracts.
"""
