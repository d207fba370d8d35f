"""Contrastive loss on Euclidean distances (Hadsell, Chopra and LeCun, CVPR 2006), averaged over the pairs
as Caffe's ContrastiveLoss layer does; the loss that OSM + CAA weights (docs/METHODS.md, OSM + CAA)."""

import jax
import jax.numpy as jnp

from mmsi_jax.search_space import Float, tunable

# The smallest squared distance: keeps the gradient of a negative pair at distance 0 finite (Caffe's
# layer adds 1e-4 to the distance in its backward pass for the same reason).
MIN_SQUARED_DISTANCE = 1e-12


def unit_distance(sim: jax.Array) -> jax.Array:
  """d = |x_i - x_j| of unit vectors from their cosine similarity: d^2 = 2 - 2 S, at least 1e-12."""
  return jnp.sqrt(jnp.maximum(2.0 - 2.0 * sim, MIN_SQUARED_DISTANCE))


@tunable(margin=Float(0.5, 2.0))
def distance_contrastive(sim: jax.Array, pos: jax.Array, neg: jax.Array, *,
                         margin: float = 1.2) -> jax.Array:
  """Contrastive loss on the distances d_ij = sqrt(2 - 2 S_ij) of unit embeddings, mean over the pairs.

    L = 1/N sum_{(i, j) in pos or neg} 1/2 l_ij,   l_ij = d_ij^2 (positive), [margin - d_ij]_+^2 (negative)

  with N the number of valid entries of pos | neg. On a batch against itself every unordered pair {i, j}
  is two entries of S, so L = 1/P sum_{i<j} 1/2 l_ij with P = B (B - 1) / 2: Caffe's ContrastiveLoss,
  which OSM (Wang et al., AAAI 2019) uses with margin 1.2. No pairs: L = 0.

  Args:
    sim: [B, M] cosine similarities of unit embeddings; pos, neg: [B, M] bool masks.
    margin: alpha, negatives farther apart than this are satisfied.
  """
  dist = unit_distance(sim)
  per_pair = jnp.where(pos, 2.0 - 2.0 * sim, 0.0) + jnp.where(neg, jax.nn.relu(margin - dist) ** 2, 0.0)
  return 0.5 * jnp.sum(per_pair) / jnp.maximum(jnp.sum(pos | neg), 1)
