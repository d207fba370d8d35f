"""Stanford Online Products: every method in its authors' setup (configs/real_datasets.py lists the variants and their
sources).

  python -m mmsi_jax.main --config=configs/sop.py:ms --workdir=runs/sop_ms
"""

from configs import real_datasets

VARIANTS = real_datasets.VARIANTS  # Every variant, as `python -m mmsi_jax.compare` runs them.
BASELINES = real_datasets.BASELINES  # Each method's, for compare's verdicts.


def get_config(variant: str = "ms"):
  return real_datasets.get_config("sop", variant)
