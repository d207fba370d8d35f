"""Datasets (TFDS builders), their input pipeline (grain), transforms and the PK sampler.

`pipeline.load_split(name, split, data_dir=DIR)` reads a prepared split; `python -m mmsi_jax.data.prepare`
builds one. Nothing is imported here: the sampler and the transforms load without TFDS or grain.
"""

# The public modules (each imported when named: `from mmsi_jax.data import pipeline`).
__all__ = ["pipeline", "sampler", "transforms"]
