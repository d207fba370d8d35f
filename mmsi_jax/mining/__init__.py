"""Miners: per-pair multipliers m [B, M] that re-weight any pair loss's gradient.

docs/ARCHITECTURE.md shows where they act in the step.

A miner, found by name in `MINERS` (config `miner.name`, settings under `miner.<name>`), is a
`base.Miner`: pure, jittable `init(rng, embed_dim, feature_dim) -> (params, state)` and
`multipliers(state, inputs) -> MinerStep` (m [B, M] >= 0 for the step's pairs, its new state, metrics,
and whether the step applies its update), and the capabilities `Miner` names with their defaults:
`extra_batches`, `multipliers_in_loss`, `auxiliary_loss`.

The step trains on L_m = sum_ij m_ij stop_gradient(W_ij) S_ij (+ the auxiliary loss), or, for a miner
whose `multipliers_in_loss` is true, on the loss with m passed inside it, L(S; m) (MMSI's authors' MS:
m S in the exponents; losses.takes_multipliers). StepInputs.cotangent_of is that choice's dL_m/dS.
"none" is no miner (m = 1: the loss's own gradient). Built with `build(config, model, pair_loss,
hparams, num_classes)`.
"""

from typing import Callable, Optional

import ml_collections

from mmsi_jax.mining import memory
from mmsi_jax.mining.base import Miner, MinerStep, StepInputs
from mmsi_jax.mining.mmsi import MMSI
from mmsi_jax.mining.osm_caa import OSMCAA
from mmsi_jax.registry import Registry

MINERS = Registry("miner")
MINERS.register("mmsi")(MMSI)
MINERS.register("osm_caa")(OSMCAA)

NONE = "none"


def names() -> list[str]:
  return [NONE, *MINERS.names()]


def build(config: ml_collections.ConfigDict, model, pair_loss: Callable, hparams: dict,
          num_classes: int) -> Optional[object]:
  """The miner `config.name` with its settings `config[config.name]`, or None for "none"."""
  if config.name == NONE:
    return None
  return MINERS.build(config.name, config.get(config.name, {}), where=f"miner.{config.name}",
                      model=model, pair_loss=pair_loss, hparams=hparams, num_classes=num_classes)


__all__ = ["MINERS", "MMSI", "Miner", "MinerStep", "NONE", "OSMCAA", "StepInputs", "build", "memory",
           "names"]
