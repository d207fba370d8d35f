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
from mmsi_jax.losses.triplet import add_at, fold_positive_chunks
from mmsi_jax.search_space import Float, tunable

# Squared distances are floored here before the square root, so that its gradient stays finite where
# two embeddings coincide (S = 1).
_MIN_SQUARED_DISTANCE = 1e-12


def _distance(sim: jax.Array) -> jax.Array:
  """|x - y| of unit vectors from their similarity: sqrt(2 - 2 S)."""
  return jnp.sqrt(jnp.maximum(2.0 - 2.0 * sim, _MIN_SQUARED_DISTANCE))


def _distance_and_slope(sim: jax.Array) -> tuple[jax.Array, jax.Array]:
  """|x - y| and its derivative in S, elementwise: -1 / |x - y| (0 where the floor holds)."""
  return jax.jvp(_distance, (sim,), (jnp.ones_like(sim),))


@tunable(margin=Float(0.05, 0.5, log=True))
def ratio_triplet(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, margin: float = 0.2) -> jax.Array:
  """Mean over all triplets (i, p, n) of J_ipn = max(0, 1 - d_in / (d_ip + margin)), d = |x - y|.

  Harwood et al. (ICCV 2017), eq. 1; 0 without a triplet. As triplet batch-all (losses/triplet.py), the
  up to B M^2 triplets are never stored: each anchor's positives are taken a chunk at a time, sorted,
  against its whole row (`triplet.fold_positive_chunks`, S held constant). The chunk's positives that a
  negative n is active with (d_in < d_ip + margin) are then a prefix of them, of length c_n, so sums
  over them are prefix sums read at c_n and sums over a positive's negatives are suffix sums of
  histograms of c_n. This gives sum J and its derivatives,

    dJ/dS_in = -(dd_in/dS_in) / (d_ip + margin),   dJ/dS_ip = (dd_ip/dS_ip) d_in / (d_ip + margin)^2,

  summed over the active triplets into G [B, M]; the loss is

    L = (sum J + sum_ij G_ij (S_ij - stop_gradient(S_ij))) / (number of triplets),

  whose value and gradient are those of the mean of J (its second derivatives are not; the step uses
  the first only, and MMSI's meta-gradient differentiates m * W in m, not W). O(B M) memory,
  O(B M x positives per anchor) time.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    margin: m, added to the anchor-positive distance (0.2 in the paper).
  """
  stopped = jax.lax.stop_gradient(sim)
  distance, distance_slope = _distance_and_slope(stopped)

  def chunk_fn(carry, columns, valid, s_pos):
    total, grad = carry
    pos_distance, pos_slope = _distance_and_slope(s_pos)  # Non-increasing along the sorted chunk.
    scale = jnp.where(valid, 1.0 / (pos_distance + margin), 0.0)  # [B, P]
    reach = jnp.where(valid, pos_distance + margin, -jnp.inf)
    active_pos = jnp.where(neg, jnp.sum(distance[:, None, :] < reach[:, :, None], axis=1,
                                        dtype=jnp.int32), 0)  # c_n [B, M]; 0 off negatives.
    prefix_scale = jnp.cumsum(jnp.pad(scale, ((0, 0), (1, 0))), axis=1)  # [B, P + 1]
    grad = grad - distance_slope * jnp.take_along_axis(prefix_scale, active_pos, axis=1)
    histogram = jnp.zeros((sim.shape[0], scale.shape[1] + 1, 2), sim.dtype)
    histogram = add_at(histogram, active_pos, jnp.stack([jnp.ones_like(distance), distance], -1))
    at_least = jnp.cumsum(histogram[:, ::-1], axis=1)[:, -2::-1]  # [k]: negatives with c_n > k.
    pos_counts, neg_distances = at_least[..., 0], at_least[..., 1]  # [B, P]: sums of 1 and d_in.
    total = total + jnp.sum(pos_counts) - jnp.sum(scale * neg_distances)
    return total, add_at(grad, columns, pos_slope * scale * scale * neg_distances)

  zero = jnp.zeros((), sim.dtype)
  total, grad = fold_positive_chunks(sim, pos, chunk_fn, (zero, jnp.zeros_like(stopped)))
  num_triplets = jnp.sum(jnp.sum(pos, axis=1, dtype=sim.dtype) * jnp.sum(neg, axis=1, dtype=sim.dtype))
  return (total + jnp.sum(jax.lax.stop_gradient(grad) * (sim - stopped))) / jnp.maximum(num_triplets, 1)


@tunable(mean_weight=Float(0.1, 10.0, log=True), margin=Float(0.0, 0.1))
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


@tunable(margin=Float(0.05, 0.5, log=True), global_weight=Float(0.1, 10.0, log=True),
          global_margin=Float(0.0, 0.1))
def ratio_triplet_global(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, margin: float = 0.2,
                         global_weight: float = 1.0, mean_weight: float = 1.0,
                         global_margin: float = 0.01) -> jax.Array:
  """ratio_triplet(margin) + global_weight * global_loss(mean_weight, global_margin): Harwood et al.'s
  objective (the ratio triplet "plus" the global loss: global_weight 1)."""
  return (ratio_triplet(sim, pos, neg, margin=margin) + global_weight * global_loss(
      sim, pos, neg, mean_weight=mean_weight, margin=global_margin))
