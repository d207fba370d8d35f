"""Miners: per-pair multipliers m [B, M] that re-weight any pair loss's gradient.

docs/ARCHITECTURE.md shows where they act in the step.

A miner, found by name in `MINERS` (config `miner.name`, settings under `miner.<name>`), is an object
with pure, jittable methods:

  extra_batches                               the data it needs besides the PK batch, as
                                              data.sampler.ExtraBatch requests (MMSI: a validation
                                              batch); the input pipeline serves them every step, whole
                                              on every device, in StepInputs.extras
  init(rng, embed_dim, feature_dim) -> (params, state)
                                              parameter groups it adds to TrainState.params (trained
                                              by the model optimizer) and its own state, kept in
                                              TrainState.miner; D and F of the embeddings and the
                                              backbone features
  multipliers(state, inputs) -> (m, state, metrics)
                                              m [B, M] >= 0 for the step's pairs (StepInputs); with
                                              the metric base.UPDATE it may keep the step from
                                              updating the parameters (see base.py)
  auxiliary_loss(params, features, labels) -> (loss, metrics)
                                              optional (absent or None: none):
                                              a loss of the parameters and of the batch's backbone
                                              features [B, F] that the step adds to the objective,
                                              its gradient reaching the backbone through the
                                              features (OSM + CAA: its classifier's cross-entropy)

The step trains on L_m = sum_ij m_ij stop_gradient(W_ij) S_ij (+ the auxiliary loss), or, for a miner
whose attribute `multipliers_in_loss` is true, on the loss with m passed inside it, L(S; m) (MMSI's
authors' MS: m S in the exponents; losses.takes_multipliers). StepInputs.cotangent_of is that choice's
dL_m/dS. "none" is no miner (m = 1: the loss's own gradient). Built with `build(config, model,
pair_loss, hparams, num_classes)`.
"""

from typing import Callable, Optional

import ml_collections

from mmsi_jax.mining import memory
from mmsi_jax.mining.base import StepInputs
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


__all__ = ["MINERS", "MMSI", "NONE", "OSMCAA", "StepInputs", "build", "memory", "names"]
