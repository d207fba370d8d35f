"""Demo on the built-in Glyphs dataset, a few minutes on 2 CPU cores.

Variants (`--config=configs/demo.py:VARIANT`):
  (none)            multi-similarity
  mmsi_ms           multi-similarity + MMSI meta-mining (weighting net, virtual step over all parameters)
  mmsi_contrastive  contrastive + MMSI
  mmsi_triplet      batch-all triplet + MMSI
"""

from configs import default

VARIANTS = ("", "mmsi_ms", "mmsi_contrastive", "mmsi_triplet")


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

  loss_name = variant.removeprefix("mmsi_") or "ms"
  if loss_name == "contrastive":
    config.loss.name = "contrastive"
    config.loss.hparams = {"pos_margin": 1.0, "neg_margin": 0.5}
  elif loss_name == "triplet":
    config.loss.name = "triplet"
    config.loss.hparams = {"margin": 0.1, "mining": "all"}
  if variant.startswith("mmsi_"):
    config.miner.name = "mmsi"
    config.miner.mmsi.memory_size = 5  # The last 5 embeddings of each of the 100 training classes.
  return config
