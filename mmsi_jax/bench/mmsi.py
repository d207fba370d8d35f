"""MMSI step time and memory against a plain step, measured in the same run.

  python -m mmsi_jax.bench mmsi --json mmsi.json

For each model (the demo CNN at 32 px with batch 64 = 16 x 4, ResNet-18 at 64 px with batch 32 = 8 x 4),
times the jitted train step without a miner and with MMSI (weighting net, virtual step over `all`
parameters and over the `head`; l2rw over `all`), validation batches of 10 images. Reports each MMSI
step as a ratio to the plain step (the variants timed in turn, round after round, so that they share
the machine's load) and the compiled step's memory (arguments + outputs + temporaries,
from XLA's memory analysis).
"""

import argparse
import functools

import jax
import numpy as np

from configs import default
from mmsi_jax import losses, mining, models, train
from mmsi_jax.bench import timing

MODELS = {
    "small_cnn": (dict(embed_dim=64, widths=(16, 32, 64)), 32, 16),
    "resnet18": (dict(embed_dim=512), 64, 8),
}
VARIANTS = {
    "plain": None,
    "mmsi_all": dict(mode="weighting_net", scope="all"),
    "mmsi_head": dict(mode="weighting_net", scope="head"),
    "mmsi_l2rw_all": dict(mode="l2rw", scope="all"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")


def _batch(image_size: int, classes: int, samples: int, val_classes: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "images": rng.integers(0, 256, (classes * samples, image_size, image_size, 3), np.uint8),
      "labels": np.repeat(np.arange(classes), samples).astype(np.int32),
      "val_images": rng.integers(0, 256, (val_classes, image_size, image_size, 3), np.uint8),
      "val_labels": np.arange(val_classes, dtype=np.int32),
  }


def run(args: argparse.Namespace) -> dict:
  config = default.get_config()
  schedule = train.create_schedule(config.optim, 1000)
  tx = train.create_optimizer(config.optim, schedule)
  pair_loss = losses.get_pair_loss(config.loss.name)
  hparams = dict(config.loss.hparams)
  figures = {}
  for model_name in args.models:
    kwargs, image_size, classes = MODELS[model_name]
    model = models.get(model_name, **kwargs)
    batch = _batch(image_size, classes, 4, config.miner.mmsi.validation_classes)
    calls = {}
    for variant, settings in VARIANTS.items():
      miner = None
      if settings is not None:
        miner_config = config.miner.copy_and_resolve_references()
        miner_config.name = "mmsi"
        miner_config.mmsi.update(settings, wait_for_coverage=False)
        miner = mining.get(miner_config, model, pair_loss, hparams, num_classes=classes)
      state = train.create_train_state(jax.random.PRNGKey(0), model, tx,
                                       batch["images"].shape[1:], miner)
      compiled = train.make_train_step(model, tx, schedule, pair_loss, hparams, miner).lower(
          state, batch).compile()
      memory = compiled.memory_analysis()
      if memory is not None:
        figures[f"{model_name}/{variant}/memory_mb"] = (
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes) / 2**20
      calls[variant] = functools.partial(compiled, state, batch)
    times = timing.time_interleaved(calls, repeats=args.repeats)
    for variant, seconds in times.items():
      figures[f"{model_name}/{variant}/step_ms"] = 1e3 * seconds
      figures[f"{model_name}/{variant}/x_plain"] = seconds / times["plain"]
  return figures
