"""Binomial deviance loss (Yi et al., "Deep metric learning for person re-identification", ICPR 2014),
in the per-anchor form restated by the multi-similarity paper (Wang et al., CVPR 2019)."""

import jax
import jax.numpy as jnp

from mmsi_jax.losses.masked import masked_row_mean
from mmsi_jax.search_space import Float, tunable


@tunable(alpha=Float(0.5, 8.0, log=True), beta=Float(10.0, 100.0, log=True), base=Float(0.2, 0.8))
def binomial_deviance(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, alpha: float = 2.0,
                      beta: float = 50.0, base: float = 0.5) -> jax.Array:
  """Binomial deviance, averaged over each anchor's positives and negatives, then over the B anchors.

    L = 1/B sum_i [ 1/|P_i| sum_{p in P_i} log(1 + exp(-alpha (S_ip - base)))
                  + 1/|N_i| sum_{n in N_i} log(1 + exp( beta (S_in - base))) ]

  Yi et al. write one scale alpha and a negative cost C = 25: beta = alpha * C. An empty set adds 0.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    alpha: positive scale. beta: negative scale. base: the similarity threshold.
  """
  pos_term = masked_row_mean(jax.nn.softplus(-alpha * (sim - base)), pos)
  neg_term = masked_row_mean(jax.nn.softplus(beta * (sim - base)), neg)
  return jnp.sum(pos_term + neg_term) / sim.shape[0]
