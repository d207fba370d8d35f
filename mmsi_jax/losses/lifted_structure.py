"""Generalised lifted structure loss (Hermans, Beyer and Leibe, "In defense of the triplet loss",
2017, section 2), the smooth (log-sum-exp) generalisation of Song et al. (CVPR 2016)."""

import jax
import jax.numpy as jnp

from mmsi_jax.losses.masked import masked_logsumexp
from mmsi_jax.search_space import Float, tunable


@tunable(margin=Float(0.1, 2.0))
def lifted_structure(sim: jax.Array, pos: jax.Array, neg: jax.Array, *,
                     margin: float = 1.0) -> jax.Array:
  """Generalised lifted structure loss, averaged over the B anchors.

    L = 1/B sum_i [ log sum_{p in P_i} exp(-S_ip) + log sum_{n in N_i} exp(S_in) + margin ]_+

  This is Hermans et al.'s [log sum_p exp(D_ip) + log sum_n exp(margin - D_in)]_+ with the cosine
  distance D = 1 - S. An anchor without positives or without negatives adds 0.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    margin: the margin between the soft-hardest positive and the soft-hardest negative.
  """
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  per_anchor = masked_logsumexp(-sim, pos) + masked_logsumexp(sim, neg) + margin
  return jnp.sum(jnp.where(active, jax.nn.relu(per_anchor), 0.0)) / sim.shape[0]
