"""Datasets (TFDS builders), their input pipeline (grain), transforms and the PK sampler.

`load_split(name, split, data_dir=DIR)` reads a prepared split; `python -m mmsi_jax.data.prepare` builds one.
"""

from mmsi_jax.data.pipeline import load_split
