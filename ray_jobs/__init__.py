"""Everything that runs on Ray workers, in a Serve replica or in a plain process: no Prefect here.

Top level: the contracts every folder shares (`config` for the train and sweep configs,
`dataset_format`, `metrics`, `storage`, `errors`) and `cluster` (join or start Ray).
Folders by job: `data` (reading, sampling, decoding, transforms), `model` (backbones, FoodNet,
checkpoint files), `training` (losses, engine, worker loop, optimizer, driver), `tuning` (Ray Tune
sweeps), `inference` (load a model, batched predict, open set), `serving` (Ray Serve app).
Imports run one way: flows -> tasks -> ray_jobs, and never back.
"""
