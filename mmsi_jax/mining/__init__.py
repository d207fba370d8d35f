"""Miners: per-pair multipliers m [B, M] that re-weight any pair loss's gradient (DESIGN.md section 3).

A miner has `init(rng, embed_dim) -> state` and `multipliers(state, inputs) -> (m, state, metrics)`,
pure and jittable; its state lives in the TrainState (`miner_state`). `get(config.miner, ...)` builds
the miner named by `config.miner.name`, or returns None for "none" (the loss's own weights, m = 1).
"""

import ml_collections

from mmsi_jax.mining import memory
from mmsi_jax.mining.mmsi import MMSI, StepInputs

_MINERS = {
    "mmsi": MMSI,
}


def names() -> list[str]:
  return ["none", *sorted(_MINERS)]


def get(config: ml_collections.ConfigDict, model, pair_loss, hparams: dict, num_classes: int):
  """The miner `config.name` configured by `config[config.name]`, or None for "none"."""
  if config.name == "none":
    return None
  if config.name not in _MINERS:
    raise KeyError(f"Unknown miner {config.name!r}; known miners: {', '.join(names())}.")
  return _MINERS[config.name](config[config.name], model, pair_loss, hparams, num_classes)


__all__ = ["MMSI", "StepInputs", "get", "memory", "names"]
