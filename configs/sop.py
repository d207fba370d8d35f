"""Stanford Online Products in the authors' setup (configs/official_setup.py), with max + average pooling
(summed: still 1024 features) and MS epsilon 0.03; variants "ms", "contrastive", "mmsi_ms" and
"mmsi_contrastive".

  python -m mmsi_jax.main --config=configs/sop.py:ms --workdir=runs/sop_ms
"""

from configs.official_setup import official_setup


def get_config(variant: str = "ms"):
  return official_setup("sop", variant, num_steps=30_000, eval_every=5_000, ks=(1, 10, 100, 1000),
                        pooling="max_plus_avg", ms_epsilon=0.03)
