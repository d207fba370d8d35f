"""Triplet loss with a margin on similarities (Schroff et al., FaceNet, CVPR 2015), with batch-all,
batch-hard (Hermans, Beyer and Leibe, "In defense of the triplet loss", 2017) and semi-hard (FaceNet,
section 3.2) selection of the triplets.

A triplet (i, p, n) is an anchor i with one of its positives p and one of its negatives n, all taken from
the anchor's row of S, and costs [S_in - S_ip + margin]_+. Batch-all over M references has B M^2 triplets
(3.4e10 floats at B = 128, M = 8192); it is computed without them: sorting each row once, the sum over
the positives below a negative is a prefix sum, so memory and time are O(B M log M).
"""

import jax
import jax.numpy as jnp

from mmsi_jax.losses.masked import masked_mean


def _merge_rows(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, neg_shift: float,
                neg_first_on_ties: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's positives (key S_ip) and negatives (key S_in + neg_shift) in ascending key order.

  Returns sim, pos, neg [B, M], their columns permuted per row; the other columns come last. Only the
  order is held constant: the permuted similarities carry the gradient back to their columns.
  """
  keys = jax.lax.stop_gradient(jnp.where(neg, sim + neg_shift, jnp.where(pos, sim, jnp.inf)))
  tie_rank = jnp.where(neg, 0, 1) if neg_first_on_ties else jnp.where(neg, 1, 0)
  columns = jnp.broadcast_to(jnp.arange(sim.shape[-1]), sim.shape)
  order = jax.lax.sort((keys, tie_rank, columns), dimension=sim.ndim - 1, num_keys=2)[2]
  return tuple(jnp.take_along_axis(x, order, axis=-1) for x in (sim, pos, neg))


def _batch_all(sim, pos, neg, margin):
  """Mean of [S_in - S_ip + margin]_+ over the triplets where it is non-zero.

  In each row sorted by key, a negative at key x = S_in + margin is violated by exactly the positives
  before it (S_ip < x), so its triplets sum to count_before * x - sum_before(S_ip).
  """
  sim, pos, neg = _merge_rows(sim, pos, neg, neg_shift=margin, neg_first_on_ties=True)
  pos_sim = jnp.where(pos, sim, 0.0)
  # Exclusive prefix sums: at a negative's slot (where pos is False) the inclusive sum is the exclusive.
  pos_before = jnp.cumsum(pos, axis=-1, dtype=sim.dtype)
  pos_sim_before = jnp.cumsum(pos_sim, axis=-1)
  total = jnp.sum(jnp.where(neg, pos_before * (sim + margin) - pos_sim_before, 0.0))
  violated = jnp.sum(jnp.where(neg, pos_before, 0.0))
  return total / jnp.maximum(violated, 1.0)


def _batch_hard(sim, pos, neg, margin):
  """Mean over the B anchors of [max_n S_in - min_p S_ip + margin]_+ (0 without a positive or negative)."""
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  hardest_pos = jnp.min(jnp.where(pos, sim, jnp.inf), axis=-1)
  hardest_neg = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=-1)
  per_anchor = jax.nn.relu(jnp.where(active, hardest_neg - hardest_pos + margin, 0.0))
  return jnp.sum(per_anchor) / sim.shape[0]


def _semihard(sim, pos, neg, margin):
  """Mean over positive pairs (i, p) of [S_in* - S_ip + margin]_+, n* the most similar negative with
  S_in < S_ip (0 when there is none)."""
  sim, pos, neg = _merge_rows(sim, pos, neg, neg_shift=0.0, neg_first_on_ties=False)
  slots = jnp.broadcast_to(jnp.arange(sim.shape[-1]), sim.shape)
  last_neg_slot = jax.lax.cummax(jnp.where(neg, slots, -1), axis=sim.ndim - 1)
  has_semihard = pos & (last_neg_slot >= 0)
  semihard_sim = jnp.take_along_axis(sim, jnp.maximum(last_neg_slot, 0), axis=-1)
  per_pair = jax.nn.relu(jnp.where(has_semihard, semihard_sim - sim + margin, 0.0))
  return masked_mean(per_pair, pos)


_MINING = {"all": _batch_all, "hard": _batch_hard, "semihard": _semihard}


def triplet(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, margin: float = 0.1,
            mining: str = "all") -> jax.Array:
  """Triplet margin loss: the mean of [S_in - S_ip + margin]_+ over the selected triplets.

    all:      every triplet of each anchor; the mean over those with a non-zero loss (Hermans et al.).
    hard:     per anchor, its least similar positive and most similar negative; mean over the B anchors.
    semihard: per positive pair (i, p), the most similar negative still less similar than p
              (S_ip - margin < S_in < S_ip is where it costs); mean over the positive pairs.

  Args:
    sim: [B, M] similarities; pos, neg: [B, M] bool masks (see `pairs.build_pairs`).
    margin: the similarity margin; 0.1 is near the value tuned by Musgrave et al. (ECCV 2020).
    mining: "all", "hard" or "semihard".
  """
  if mining not in _MINING:
    raise ValueError(f"mining={mining!r} is not one of {tuple(_MINING)}.")
  return _MINING[mining](sim, pos, neg, margin)
