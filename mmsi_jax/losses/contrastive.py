"""Contrastive loss on similarities (Hadsell, Chopra and LeCun, CVPR 2006), with separate
positive and negative margins, summed over pairs per anchor as in XBM (Wang et al., CVPR 2020)."""

import jax
import jax.numpy as jnp

from mmsi_jax.search_space import Float, tunable


@tunable(pos_margin=Float(0.5, 1.0), neg_margin=Float(0.0, 0.9))
def contrastive(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, pos_margin: float = 1.0,
                neg_margin: float = 0.8) -> jax.Array:
  """Contrastive loss, summed over each anchor's pairs and averaged over the B anchors.

    L = 1/B sum_i [ sum_{p in P_i} [pos_margin - S_ip]_+ + sum_{n in N_i} [S_in - neg_margin]_+ ]

  With pos_margin = 1 a positive pulls as 1 - S_ip. Pairs are independent: an anchor without
  positives still pushes its negatives.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    pos_margin: positives more similar than this are satisfied.
    neg_margin: negatives less similar than this are satisfied (0.8 in the MMSI authors' runs).
  """
  per_pair = (jnp.where(pos, jax.nn.relu(pos_margin - sim), 0.0)
              + jnp.where(neg, jax.nn.relu(sim - neg_margin), 0.0))
  return jnp.sum(per_pair) / sim.shape[0]
