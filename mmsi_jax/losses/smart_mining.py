"""The losses of Smart Mining (Harwood et al., "Smart Mining for Deep Metric Learning", ICCV 2017).

In the unified form (pairs.py), on unit embeddings, where the squared distance is |x - y|^2 = 2 - 2 S:

  ratio_triplet          J = max(0, 1 - |a - n| / (|a - p| + m)) per triplet (a, p, n), m = 0.2
  global_loss            (var+ + var-) + lambda * max(0, mean+ - mean- + t) on d = |x - y|^2 / 4
                         (Kumar BG et al., CVPR 2016; t = 0.01)
  ratio_triplet_global   their sum, the objective Harwood et al. train with

The triplets are every (i, p, n) with pos[i, p] and neg[i, n]; with the `triplets` references component
(references/triplets.py) each anchor row holds exactly its mined triplet.
"""

import jax
import jax.numpy as jnp

from mmsi_jax.losses.masked import masked_mean

# Squared distances are floored here before the square root, so that its gradient stays finite where
# two embeddings coincide (S = 1).
_MIN_SQUARED_DISTANCE = 1e-12


def _distance(sim: jax.Array) -> jax.Array:
  """|x - y| of unit vectors from their similarity: sqrt(2 - 2 S)."""
  return jnp.sqrt(jnp.maximum(2.0 - 2.0 * sim, _MIN_SQUARED_DISTANCE))


def ratio_triplet(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, margin: float = 0.2) -> jax.Array:
  """Mean over all triplets (i, p, n) of max(0, 1 - |x_i - x_n| / (|x_i - x_p| + margin)).

  Harwood et al. (ICCV 2017), eq. 1; 0 without a triplet. Builds the [B, M, M] cube of triplets.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    margin: m, added to the anchor-positive distance (0.2 in the paper).
  """
  distance = _distance(sim)
  cost = jax.nn.relu(1.0 - distance[:, None, :] / (distance[:, :, None] + margin))  # [i, p, n]
  return masked_mean(cost, pos[:, :, None] & neg[:, None, :])


def global_loss(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, mean_weight: float = 1.0,
                margin: float = 0.01) -> jax.Array:
  """(var+ + var-) + lambda * max(0, mean+ - mean- + t), over d = |x - y|^2 / 4 = (1 - S) / 2.

  mean+ and var+ (population variance) are over the positive pairs, mean- and var- over the negative
  pairs (Kumar BG et al., "Learning local image descriptors with deep siamese and triplet
  convolutional networks by minimising global loss functions", CVPR 2016); 0 unless both sets have a
  pair.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks.
    mean_weight: lambda, the weight of the hinge on the means (the paper gives none: 1).
    margin: t, the margin between the means (0.01).
  """
  distance = (1.0 - sim) / 2.0

  def moments(mask):
    mean = masked_mean(distance, mask)
    return mean, masked_mean((distance - mean) ** 2, mask)

  pos_mean, pos_var = moments(pos)
  neg_mean, neg_var = moments(neg)
  loss = pos_var + neg_var + mean_weight * jax.nn.relu(pos_mean - neg_mean + margin)
  return jnp.where(jnp.any(pos) & jnp.any(neg), loss, 0.0)


def ratio_triplet_global(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, margin: float = 0.2,
                         global_weight: float = 1.0, mean_weight: float = 1.0,
                         global_margin: float = 0.01) -> jax.Array:
  """ratio_triplet(margin) + global_weight * global_loss(mean_weight, global_margin): Harwood et al.'s
  objective (the ratio triplet "plus" the global loss: global_weight 1)."""
  return (ratio_triplet(sim, pos, neg, margin=margin) + global_weight * global_loss(
      sim, pos, neg, mean_weight=mean_weight, margin=global_margin))
