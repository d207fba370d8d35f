"""Demo on the built-in Glyphs dataset, a few minutes per run on 2 CPU cores.

Every method has a variant (`--config=configs/demo.py:VARIANT`), all under one protocol: the small CNN
(64-d), 800 steps of 16 classes x 4 images, Adam 2e-3 with 50 warm-up steps and cosine decay.

  ms                multi-similarity (alpha 2, beta 50, lambda 0.5, epsilon 0.1); also the config
                    without a variant (`--config=configs/demo.py`)
  contrastive       contrastive, positives to 1, negatives below 0.5
  triplet           batch-all triplet, margin 0.1
  mmsi_ms, mmsi_contrastive, mmsi_triplet
                    the same with MMSI meta-mining (weighting net, virtual step over all parameters,
                    a per-class dictionary of 5 embeddings)
  xbm_ms, xbm_contrastive
                    the same with XBM's cross-batch memory: 2,048 slots (85% of the 2,400 training
                    images, as XBM's 55,000 of SOP's 59,551), from step 400 (from step 100, while
                    the embedding still moves fast, the memory's stale rows hurt: docs/BENCHMARKS.md)
  norm_softmax, cosface, arcface, proxy_nca, proxy_anchor
                    the proxy losses with 100 learnable class proxies, trained at 100x the learning
                    rate (as Proxy-Anchor and MemVir), and each paper's scale and margin
                    (docs/METHODS.md)

`python -m mmsi_jax.compare --config=configs/demo.py` trains every named variant over seeds and writes
the table (docs/RESULTS.md).
"""

from configs import default

PAIR_LOSSES = {
    "ms": ("multi_similarity", None),  # The defaults of configs/default.py.
    "contrastive": ("contrastive", {"pos_margin": 1.0, "neg_margin": 0.5}),
    "triplet": ("triplet", {"margin": 0.1, "mining": "all"}),
}
PROXY_LOSSES = {
    "norm_softmax": {"temperature": 0.05},
    "cosface": {"scale": 64.0, "margin": 0.35},
    "arcface": {"scale": 64.0, "margin": 0.5},
    "proxy_nca": {"scale": 12.0},
    "proxy_anchor": {"alpha": 32.0, "margin": 0.1},
}
VARIANTS = ("", *PAIR_LOSSES, *(f"mmsi_{name}" for name in PAIR_LOSSES), "xbm_ms", "xbm_contrastive",
            *PROXY_LOSSES)


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/demo.py has variants {VARIANTS[1:]} (or none), got {variant!r}.")
  config = default.get_config()
  config.model.widths = (16, 32, 64)
  config.train.num_steps = 800
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50

  method, loss_name = "", variant or "ms"
  if variant.startswith(("mmsi_", "xbm_")):
    method, loss_name = variant.split("_", 1)
  if loss_name in PROXY_LOSSES:
    config.loss.name = loss_name
    config.loss.hparams = PROXY_LOSSES[loss_name]
    config.references.name = "proxies"
    config.optim.lr_mults.proxies = 100.0
    return config
  config.loss.name, hparams = PAIR_LOSSES[loss_name]
  if hparams is not None:
    config.loss.hparams = hparams
  if method == "mmsi":
    config.miner.name = "mmsi"
    config.miner.mmsi.memory_size = 5  # The last 5 embeddings of each of the 100 training classes.
  elif method == "xbm":
    config.references.name = "xbm"
    config.references.xbm.size = 2048
    config.references.xbm.start_step = 400
  return config
