"""Batch policies: which training examples make up each step's batch, found by name.

A batch policy is a method component, like a miner: it decides which examples the data layer
(mmsi_jax/data, which knows no method) serves, and may read the model, the losses and the retrieval
code to decide it. A policy (config `data.batch_policy`, settings under `data.<name>`) may depend on the
model: it is refreshed, when due, with the current parameters, and between refreshes its batches are a
pure function of (seed, step, the last refresh's state). Its state is part of the TrainState
(`TrainState.batches`), so a checkpoint resumes it bit for bit. The train loop asks for the batches one
refresh period at a time, so that prefetching never reads past a refresh.

  layout                                        "pk" (P classes x K images) or "triplets" (rows
                                                (anchor, positive, negative), references/triplets.py)
  batch_size                                    images per batch
  init_state() -> state                         the state before the first refresh (None: none)
  due(completed_steps) -> bool                  whether to refresh before the next step
  refresh(state, completed_steps, embed_split) -> (state, metrics)
                                                the next period's state; embed_split() embeds the
                                                training split with the current parameters
  period_end(completed_steps, num_steps) -> int where the period holding the next step ends
  sampler(state)                                the period's batches for the input pipeline:
                                                batch_size, batch_indices(step), extra_indices(...)

Registered:
  pk            the sampler of `data.sampler` (data/sampler.py: P classes x K images, or P x K images
                drawn at random): never refreshes, one period for the whole run
  smart_mining  T triplets mined from the embedding's nearest neighbours every epoch (Harwood et al.,
                ICCV 2017; batch_policies/smart_mining.py)
"""

from typing import Callable

import ml_collections
import numpy as np

from mmsi_jax.batch_policies.smart_mining import SmartMiningPolicy
from mmsi_jax.data import sampler as sampler_lib
from mmsi_jax.data.sampler import PKSampler
from mmsi_jax.registry import Registry
from mmsi_jax.search_space import tunable


@tunable()  # Nothing to tune.
class PKPolicy:
  """The batches of the sampler `sampler` (config data.sampler: "pk", P classes x K images, or
  "random"), a pure function of (seed, step): the policy that never refreshes. Its arguments are the
  trainer's context; it has no settings of its own."""
  layout = "pk"

  def __init__(self, labels, classes_per_batch: int, samples_per_class: int, seed: int,
               held_out_fraction: float, loss_fn: Callable, hparams: dict, sampler: str):
    del loss_fn, hparams
    self._sampler = sampler_lib.build(sampler, labels, classes_per_batch, samples_per_class, seed,
                                      held_out_fraction=held_out_fraction)
    self.batch_size = self._sampler.batch_size

  def init_state(self) -> None:
    return None

  def due(self, completed_steps: int) -> bool:
    del completed_steps
    return False

  def refresh(self, state, completed_steps: int, embed_split: Callable):
    raise RuntimeError("PK batches are never refreshed.")

  def period_end(self, completed_steps: int, num_steps: int) -> int:
    del completed_steps
    return num_steps

  def sampler(self, state) -> PKSampler:
    del state
    return self._sampler


BATCH_POLICIES = Registry("batch policy")
BATCH_POLICIES.register("pk")(PKPolicy)
BATCH_POLICIES.register("smart_mining")(SmartMiningPolicy)


def build(data: ml_collections.ConfigDict, labels, *, seed: int, held_out_fraction: float,
          loss_fn: Callable, hparams: dict):
  """The policy `data.batch_policy` with its settings `data.<name>` over the training labels [N]."""
  name = data.batch_policy
  return BATCH_POLICIES.build(
      name, data.get(name, {}), where=f"data.{name}", labels=np.asarray(labels),
      classes_per_batch=data.classes_per_batch, samples_per_class=data.samples_per_class, seed=seed,
      held_out_fraction=held_out_fraction, loss_fn=loss_fn, hparams=hparams, sampler=data.sampler)
