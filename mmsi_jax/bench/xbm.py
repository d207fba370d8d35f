"""XBM step time and memory against a plain step, measured in the same run.

  python -m mmsi_jax.bench xbm --json xbm.json

ResNet-18 (512-d) at 64 px, batches of 64 = 16 classes x 4, contrastive loss (XBM's margin 0.5), Adam;
the plain step against the XBM step with a full memory of 55,000 x 512 (XBM's SOP setting; random unit
rows and labels), both built by step.build as the trainer does. Each XBM figure is a ratio to the plain
step, the two timed in turn round after round so that they share the machine's load; memory is XLA's
analysis of the compiled step (arguments + outputs + temporaries).
"""

import argparse

import jax
import ml_collections

from configs import default
from mmsi_jax import models
from mmsi_jax.bench import _steps
from mmsi_jax.mining import memory as memory_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--memory_size", type=int, default=55_000, help="XBM slots K")
  parser.add_argument("--model", default="resnet18", choices=models.names())
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--classes", type=int, default=16, help="P of the P x 4 batch")
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")


def _config(args: argparse.Namespace, references: str) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = ml_collections.ConfigDict({"name": args.model, "embed_dim": 512})
  config.loss = ml_collections.ConfigDict(
      {"name": "contrastive", "hparams": {"pos_margin": 1.0, "neg_margin": 0.5}})
  config.references.name = references
  config.references.xbm.update(size=args.memory_size, start_step=0)
  config.train.num_steps = 1000
  return config


def _fill_memory(state):
  """A full memory of random unit rows over 11,318 labels (as SOP's training classes)."""
  if state.references is None:
    return state
  size, dim = state.references.embeddings.shape
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  rows = models.l2_normalize(jax.random.normal(keys[0], (size, dim)))
  labels = jax.random.randint(keys[1], (size,), 0, 11_318)
  return state.replace(references=memory_lib.enqueue(state.references, rows, labels))


def run(args: argparse.Namespace) -> dict:
  configs = {"plain": _config(args, "batch"), "xbm": _config(args, "xbm")}
  figures = {"memory_size": args.memory_size, "batch": 4 * args.classes,
             "memory_bytes_mb": args.memory_size * 512 * 4 / 2**20}
  figures.update(_steps.compare_steps(configs, image_size=args.image_size, classes=args.classes,
                                      samples=4, repeats=args.repeats, prefix=args.model,
                                      prepare=_fill_memory))
  return figures
