"""N-pair loss (Sohn, NeurIPS 2016) with a temperature: NT-Xent (Chen et al., ICML 2020) and its
supervised form for several positives per anchor (Khosla et al., NeurIPS 2020, eq. 2, L_out)."""

import jax

from mmsi_jax.losses.masked import softmax_cross_entropy
from mmsi_jax.search_space import Float, tunable


@tunable(temperature=Float(0.01, 0.5, log=True))
def ntxent(sim: jax.Array, pos: jax.Array, neg: jax.Array, *,
           temperature: float = 0.1) -> jax.Array:
  """Supervised NT-Xent, averaged over the anchors that have a positive.

    L = mean_i 1/|P_i| sum_{p in P_i} -log( exp(S_ip / t) / sum_{j in P_i u N_i} exp(S_ij / t) )

  With one positive per anchor this is the N-pair loss log(1 + sum_n exp((S_in - S_ip) / t)).

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    temperature: t, the softmax temperature (0.1 in Khosla et al.).
  """
  return softmax_cross_entropy(sim / temperature, pos, pos | neg)
