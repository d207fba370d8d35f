"""A tiny config with three variants for the tests of mmsi_jax.compare: two that train in seconds and one
that fails its config check."""

from configs import demo

VARIANTS = ("ms", "contrastive", "broken")


def get_config(variant: str = "ms"):
  if variant not in VARIANTS:
    raise ValueError(f"tests/compare_config.py has variants {VARIANTS}, got {variant!r}.")
  config = demo.get_config("ms" if variant == "broken" else variant)
  # The batch, model, optimizer and evaluation of tests/test_train.py's tiny_config: the runs read what
  # the suite's other tiny runs compiled from the session's compilation cache (tests/conftest.py).
  config.data.classes_per_batch = 8
  config.data.samples_per_class = 4
  config.data.eval_batch_size = 600
  config.model.widths = (8, 16)
  config.model.embed_dim = 16
  config.optim.update(learning_rate=5e-3, warmup_steps=2, schedule="constant")
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.eval_every = 4  # One evaluation, the final one (and step 0's baseline).
  config.train.checkpoint_every = 2
  config.eval.nmi = False
  config.eval.grid_queries = 2
  config.eval.grid_results = 2
  if variant == "broken":
    config.train.checkpoint_every = 3  # Not a multiple of log_every: the run stops before any work.
  return config
