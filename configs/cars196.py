"""Cars196 in the authors' setup (configs/official_setup.py); variants "ms", "contrastive",
"mmsi_ms" and "mmsi_contrastive".

  python -m mmsi_jax.main --config=configs/cars196.py:ms --workdir=runs/cars196_ms
"""

from configs.official_setup import official_setup


def get_config(variant: str = "ms"):
  return official_setup("cars196", variant, num_steps=6_000, eval_every=1_000, ks=(1, 2, 4, 8))
