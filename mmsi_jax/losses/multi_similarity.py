"""Multi-similarity loss with its pair miner (Wang et al., CVPR 2019, eqs. 4 and 5)."""

from typing import Optional

import jax
import jax.numpy as jnp

from mmsi_jax.losses.masked import masked_log1p_sum_exp
from mmsi_jax.search_space import Float, tunable


def multi_similarity_mining(sim: jax.Array, pos: jax.Array, neg: jax.Array, *,
                            epsilon: float) -> tuple[jax.Array, jax.Array]:
  """MS pair mining (eq. 4): the informative pairs of each anchor, as masks [B, M].

  A negative is kept when S_an + epsilon > min_p S_ap, a positive when S_ap - epsilon < max_n S_an.
  An anchor without positives (or negatives) keeps no pairs.
  """
  sim = jax.lax.stop_gradient(sim)
  hardest_pos = jnp.min(jnp.where(pos, sim, jnp.inf), axis=-1, keepdims=True)
  hardest_neg = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=-1, keepdims=True)
  return pos & (sim - epsilon < hardest_neg), neg & (sim + epsilon > hardest_pos)


@tunable(alpha=Float(0.5, 8.0, log=True), beta=Float(10.0, 100.0, log=True),
          base=Float(0.2, 0.8), epsilon=Float(0.01, 0.3, log=True))
def multi_similarity(sim: jax.Array, pos: jax.Array, neg: jax.Array,
                     multipliers: Optional[jax.Array] = None, *, alpha: float = 2.0,
                     beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1, mine: bool = True,
                     prefactor: float = 1.0) -> jax.Array:
  """Multi-similarity loss (eq. 5), averaged over the B anchors.

    L = 1/B sum_i [ c/alpha log(1 + sum_{p in P_i} exp(-alpha (m_ip S_ip - base)))
                  + c/beta  log(1 + sum_{n in N_i} exp( beta (m_in S_in - base))) ]

  where P_i, N_i are the mined positives and negatives of anchor i (all of them with `mine=False`),
  c = `prefactor` (1 in the paper, 2 in the MMSI authors' code) and m the per-pair multipliers (1 unless
  given). As in the authors' code, an anchor with no mined positive or no mined negative contributes
  zero.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    multipliers: [B, M] per-pair multipliers placed inside the exponents, on S, as the MMSI authors
      weight MS (docs/METHODS.md, MMSI); mining reads the unweighted S. None: m = 1.
    alpha: positive scale. beta: negative scale. base: the similarity margin lambda.
    epsilon: the miner's margin. prefactor: c.
  """
  if mine:
    pos, neg = multi_similarity_mining(sim, pos, neg, epsilon=epsilon)
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  weighted = sim if multipliers is None else multipliers * sim
  pos_term = masked_log1p_sum_exp(-alpha * (weighted - base), pos) / alpha
  neg_term = masked_log1p_sum_exp(beta * (weighted - base), neg) / beta
  return prefactor * jnp.sum(jnp.where(active, pos_term + neg_term, 0.0)) / sim.shape[0]
