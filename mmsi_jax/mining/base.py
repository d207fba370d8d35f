"""What the train step hands a miner, and what a miner may tell it back (the miner interface:
mmsi_jax/mining/__init__.py)."""

from typing import Any, Callable, NamedTuple

import jax

from mmsi_jax import losses

# A miner's metric that gates the step's update: when a miner's metrics hold it, the step applies its
# update only where it is > 0 and otherwise keeps the parameters, the optimizer state and the BatchNorm
# statistics as they were (the step is counted, and the references' and miner's states move on). A
# miner that never skips an update leaves it out.
UPDATE = "miner/update"


class StepInputs(NamedTuple):
  """One step's values that a miner may read.

  Attributes:
    step: number of completed steps before this one.
    params: every parameter group before the update ({"model": ..., and e.g. "proxies"}).
    batch_stats: BatchNorm statistics before the update.
    labels: [B] labels of the training batch.
    features: [B, F] backbone features of the batch; embeddings: [B, D].
    pairs: the step's Pairs [B, M] (the columns the references component supplies).
    weights: W = dL/dS [B, M] of the step's objective.
    cotangent_of: multipliers m [B, M] -> dL_m/dS [B, M], the cotangent the update sends back through
      S: m * W, or grad_S L(S; m) for a miner that places m inside the loss (mining/__init__.py);
      differentiable in m.
    sim_vjp: the VJP of S(params): cotangent [B, M] -> (gradient with respect to params,); a second,
      optional argument [B, F] is a cotangent of the features (the step's auxiliary loss).
    pairs_of: (params, embeddings [B, D], labels [B]) -> Pairs, how this step builds S from the
      batch's embeddings (e.g. to differentiate S through the embedding head alone); a
      jax.tree_util.Partial, so StepInputs can cross a jit boundary.
    extras: the extra batches the miner asked for (its `extra_batches`), by name:
      {"images": [V, H, W, 3] normalised, "labels": [V]}.
    learning_rate: the model's learning rate at this step.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  labels: jax.Array
  features: jax.Array
  embeddings: jax.Array
  pairs: losses.Pairs
  weights: jax.Array
  cotangent_of: Callable
  sim_vjp: Callable
  pairs_of: Callable
  extras: dict
  learning_rate: jax.Array
