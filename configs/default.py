"""Every knob of the trainer, with its meaning. Other configs start from this one and change a few lines.

Select a variant with `--config=configs/default.py:VARIANT` (none here) and override any key with
`--config.a.b=value`, e.g. `--config.train.num_steps=2000`.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"configs/default.py has no variants, got {variant!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, PK sampling and augmentation.

  config.data = ml_collections.ConfigDict()
  config.data.name = "glyphs"  # Dataset registered in mmsi_jax.data.pipeline.
  config.data.data_dir = "data"  # Where prepared datasets live (built there on first use).
  config.data.manual_dir = ""  # Where the official archives are, for datasets that need them.
  config.data.train_split = "train"  # Training classes.
  config.data.test_split = "test"  # Unseen test classes: query set and gallery at once.
  config.data.classes_per_batch = 16  # P of a PK batch.
  config.data.samples_per_class = 4  # K of a PK batch; batch size is P * K.
  config.data.crop_padding = 2  # Random translation by up to this many pixels (0: none).
  config.data.flip = False  # Random horizontal flips.
  config.data.num_threads = 4  # Reader threads preparing batches.
  config.data.prefetch = 8  # Batches prepared ahead.
  config.data.eval_batch_size = 256  # Images per embedding call at evaluation.

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"  # Model registered in mmsi_jax.models.
  config.model.embed_dim = 64  # D, the embedding dimension.
  config.model.widths = (32, 64, 128)  # small_cnn: channels of its conv stages.

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "multi_similarity"  # Pair loss registered in mmsi_jax.losses.
  config.loss.hparams = ml_collections.ConfigDict()  # Keyword arguments of the loss.
  config.loss.hparams.alpha = 2.0  # MS positive scale.
  config.loss.hparams.beta = 50.0  # MS negative scale.
  config.loss.hparams.base = 0.5  # MS similarity margin lambda.
  config.loss.hparams.epsilon = 0.1  # MS miner margin.

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # "adam": L2 weight decay added to the gradient; "adamw": decoupled.
  config.optim.learning_rate = 1e-3  # Peak learning rate.
  config.optim.weight_decay = 5e-4  # Weight decay coefficient.
  config.optim.schedule = "cosine"  # "constant" or "cosine" (decay to 0 at the last step).
  config.optim.warmup_steps = 0  # Linear warm-up from 0 over this many steps.

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 10_000  # Training steps (one PK batch each).
  config.train.log_every = 50  # Steps between progress lines and train/loss entries.
  config.train.eval_every = 1_000  # Steps between evaluations (and one at the end).
  config.train.checkpoint_every = 1_000  # Steps between checkpoints; a multiple of log_every.
  config.train.keep_checkpoints = 3  # Most recent checkpoints kept.

  config.eval = ml_collections.ConfigDict()
  config.eval.ks = (1, 2, 4, 8)  # The K of Recall@K.
  config.eval.chunk_size = 1024  # Queries per device call of the exact top-k.
  config.eval.nmi = True  # Also NMI of k-means (K = test classes); minutes on CPU at SOP's size.
  config.eval.grid_queries = 8  # Rows (queries) of the retrieval grid PNG written per evaluation.
  config.eval.grid_results = 6  # Nearest results shown per query in that grid.
  return config
