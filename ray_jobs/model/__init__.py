"""The network: backbones by arch (weights, the input each expects), FoodNet with its heads, checkpoint files.

May import: `ray_jobs.config`, `ray_jobs.data.transforms`, `errors`, `storage`.
"""
