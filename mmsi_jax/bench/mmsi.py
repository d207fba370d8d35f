"""MMSI step time and memory against a plain step, measured in the same run.

  python -m mmsi_jax.bench mmsi --json mmsi.json

For each model (the demo CNN at 32 px with batch 64 = 16 x 4, ResNet-18 at 64 px with batch 32 = 8 x 4),
times the jitted train step (multi-similarity, Adam; built by step.build as the trainer does) without a
miner and with MMSI (weighting net, virtual step over `all` parameters and over the `head`; l2rw over
`all`), validation batches of 10 images, meta-weighting from the first step. Reports each MMSI step as a
ratio to the plain step (the variants timed in turn, round after round, so that they share the
machine's load) and the compiled step's memory (arguments + outputs + temporaries, from XLA's memory
analysis).
"""

import argparse

import ml_collections

from configs import default
from mmsi_jax.bench import _steps

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


def variant_config(model_name: str, model_settings: dict, mmsi_settings) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = ml_collections.ConfigDict({"name": model_name, **model_settings})
  config.train.num_steps = 1000
  if mmsi_settings is not None:
    config.miner.name = "mmsi"
    config.miner.mmsi.update(mmsi_settings, wait_for_coverage=False)
  return config


def run(args: argparse.Namespace) -> dict:
  figures = {}
  for model_name in args.models:
    settings, image_size, classes = MODELS[model_name]
    configs = {variant: variant_config(model_name, settings, mmsi)
               for variant, mmsi in VARIANTS.items()}
    figures.update(_steps.compare_steps(configs, image_size=image_size, classes=classes, samples=4,
                                        repeats=args.repeats, prefix=model_name))
  return figures
