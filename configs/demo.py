"""Demo: multi-similarity on the built-in Glyphs dataset, a few minutes on 2 CPU cores."""

from configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  if variant:
    raise ValueError(f"configs/demo.py has no variant {variant!r}.")
  config.model.widths = (16, 32, 64)
  config.train.num_steps = 800
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50
  return config
