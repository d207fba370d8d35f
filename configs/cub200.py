"""CUB-200-2011 in the authors' setup (configs/official_setup.py); variants "ms", "contrastive",
"mmsi_ms" and "mmsi_contrastive".

  python -m mmsi_jax.main --config=configs/cub200.py:ms --workdir=runs/cub200_ms
"""

from configs.official_setup import official_setup


def get_config(variant: str = "ms"):
  return official_setup("cub200", variant, num_steps=3_000, eval_every=500, ks=(1, 2, 4, 8))
