"""Images from storage to tensors: the Parquet reader, the seeded sampler, decoding and transform presets.

May import: `ray_jobs.dataset_format`, `storage`, `errors`. `image_prep` imports Pillow only
(ingestion's spawned decode workers load it without torch).
"""
