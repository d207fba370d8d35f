"""The miner protocol: what the train step hands a miner (`StepInputs`), what a miner hands back
(`MinerStep`), and every way a miner can act on a step (`Miner`'s capabilities, with their defaults)."""

from typing import Any, Callable, NamedTuple, Optional

import jax

from mmsi_jax import losses


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


class MinerStep(NamedTuple):
  """What a miner's `multipliers` returns for one step.

  Attributes:
    multipliers: m [B, M] >= 0, the weights of the step's pairs.
    state: the miner's new state.
    metrics: scalars to log.
    apply_update: a bool scalar, whether the step applies its update; where it is False the step keeps
      the parameters, the optimizer state and the BatchNorm statistics as they were (the step is
      counted, and the references' and the miner's states move on). None: always (the default).
  """
  multipliers: jax.Array
  state: Any
  metrics: dict
  apply_update: Optional[jax.Array] = None


class Miner:
  """A miner: per-pair multipliers m [B, M] that re-weight a loss's pair gradients (mining/__init__.py).

  A miner implements `init` and `multipliers`; the capabilities below are the other ways it may act on
  a step, and their defaults are those of a miner that only weighs pairs. A miner with a capability
  overrides its attribute (a class attribute, a property, or an attribute set in __init__).

  Capabilities:
    extra_batches: the data it needs besides the batch, as data.sampler.ExtraBatch requests (MMSI: a
      validation batch); the input pipeline serves them every step in StepInputs.extras.
    multipliers_in_loss: False: the update's cotangent is m * W (the unified form); True: m goes inside
      the loss, grad_S L(S; m) (MMSI's authors' MS, losses.takes_multipliers).
    auxiliary_loss: None, or (params, features [B, F], labels [B]) -> (loss, metrics), a loss that the
      step adds to the objective, its gradient reaching the backbone through the features (OSM + CAA:
      its classifiers' cross-entropy).
  A miner may also keep the step from updating the parameters: `MinerStep.apply_update`.
  """
  extra_batches: tuple = ()
  multipliers_in_loss: bool = False
  auxiliary_loss: Optional[Callable] = None

  def init(self, rng: jax.Array, embed_dim: int, feature_dim: int) -> tuple[dict, Any]:
    """(parameter groups added to TrainState.params, trained by the model optimizer; the miner's state,
    kept in TrainState.miner), given D of the embeddings and F of the backbone features."""
    raise NotImplementedError

  def multipliers(self, state: Any, inputs: StepInputs) -> MinerStep:
    """The step's multipliers and the rest of `MinerStep`, from the miner's state and `inputs`."""
    raise NotImplementedError
