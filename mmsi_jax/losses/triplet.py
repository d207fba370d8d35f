"""Triplet loss with a margin on similarities (Schroff et al., FaceNet, CVPR 2015), with batch-all,
batch-hard (Hermans, Beyer and Leibe, "In defense of the triplet loss", 2017) and semi-hard (FaceNet,
section 3.2) selection of the triplets.

A triplet (i, p, n) is an anchor i with one of its positives p and one of its negatives n, all taken from
the anchor's row of S, and costs [S_in - S_ip + margin]_+. Batch-all over M references has B M^2 triplets
(8.6e9 at B = 128, M = 8192, 34 GB as float32); it is computed without them: after one sort of each
row, the number of active triplets each pair belongs to is a prefix count, and the loss is linear in S
with those counts, so memory is O(B M) and time O(B M log M). Semi-hard uses the same sort.
"""

import jax
import jax.numpy as jnp


def _sort_rows(sim: jax.Array, pos: jax.Array, neg: jax.Array, *, neg_shift: float,
               neg_first_on_ties: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per row, the columns in ascending order of their key: S_ij for positives, S_ij + neg_shift for
  negatives, other columns last. Ties between a positive and a negative put the negative first when
  `neg_first_on_ties`, else last.

  Returns:
    order [B, M] (the column at each sorted slot), and pos, neg [B, M] in that order.
  """
  keys = jax.lax.stop_gradient(jnp.where(neg, sim + neg_shift, jnp.where(pos, sim, jnp.inf)))
  tie_rank = jnp.where(neg, 0, 1) if neg_first_on_ties else jnp.where(neg, 1, 0)
  columns = jnp.broadcast_to(jnp.arange(sim.shape[-1]), sim.shape)
  order = jax.lax.sort((keys, tie_rank, columns), dimension=sim.ndim - 1, num_keys=2)[2]
  return (order, jnp.take_along_axis(pos, order, axis=-1), jnp.take_along_axis(neg, order, axis=-1))


def _linear_in_sim(sim, counts, constant, normaliser):
  """(sum_ij counts_ij S_ij + constant) / max(normaliser, 1), with counts [B, M] held constant.

  A triplet sum sum_(i,p,n) (S_in - S_ip + margin) over active triplets is linear in S: each pair enters
  with the number of active triplets it is the negative of, minus those it is the positive of. Written
  so, the loss's value and gradient need no [B, M, M] array and no differentiation through the sort.
  """
  counts = jax.lax.stop_gradient(counts).astype(sim.dtype)
  return (jnp.sum(counts * sim) + constant) / jnp.maximum(normaliser, 1)


def _batch_all(sim, pos, neg, margin):
  """Mean of [S_in - S_ip + margin]_+ over the triplets where it is non-zero.

  In a row sorted by key (S_ip for positives, S_in + margin for negatives), the triplet (i, p, n) is
  active exactly when p comes before n: a negative is in as many active triplets as there are positives
  before it, a positive in as many as there are negatives after it.
  """
  order, pos_sorted, neg_sorted = _sort_rows(sim, pos, neg, neg_shift=margin,
                                             neg_first_on_ties=True)
  pos_before = jnp.cumsum(pos_sorted, axis=-1, dtype=jnp.int32)
  neg_after = (jnp.sum(neg_sorted, axis=-1, keepdims=True, dtype=jnp.int32)
               - jnp.cumsum(neg_sorted, axis=-1, dtype=jnp.int32))
  neg_counts = jnp.where(neg_sorted, pos_before, 0)
  counts_sorted = neg_counts - jnp.where(pos_sorted, neg_after, 0)
  rows = jnp.arange(sim.shape[0])[:, None]
  counts = jnp.zeros(sim.shape, jnp.int32).at[rows, order].set(counts_sorted)
  active = jnp.sum(neg_counts, dtype=sim.dtype)  # Up to B M^2: past the int32 range at scale.
  return _linear_in_sim(sim, counts, margin * active, active)


def _batch_hard(sim, pos, neg, margin):
  """Mean over the B anchors of [max_n S_in - min_p S_ip + margin]_+ (0 without a positive or a
  negative)."""
  active = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  hardest_pos = jnp.min(jnp.where(pos, sim, jnp.inf), axis=-1)
  hardest_neg = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=-1)
  per_anchor = jax.nn.relu(jnp.where(active, hardest_neg - hardest_pos + margin, 0.0))
  return jnp.sum(per_anchor) / sim.shape[0]


def _semihard(sim, pos, neg, margin):
  """Mean over positive pairs (i, p) of [S_in* - S_ip + margin]_+, n* the most similar negative with
  S_in < S_ip (0 when there is none): in a row sorted by S, the last negative before p."""
  order, pos_sorted, neg_sorted = _sort_rows(sim, pos, neg, neg_shift=0.0, neg_first_on_ties=False)
  sim_sorted = jnp.take_along_axis(jax.lax.stop_gradient(sim), order, axis=-1)
  slots = jnp.broadcast_to(jnp.arange(sim.shape[-1]), sim.shape)
  last_neg_slot = jax.lax.cummax(jnp.where(neg_sorted, slots, -1), axis=sim.ndim - 1)
  chosen_slot = jnp.maximum(last_neg_slot, 0)
  chosen_sim = jnp.take_along_axis(sim_sorted, chosen_slot, axis=-1)
  active = pos_sorted & (last_neg_slot >= 0) & (chosen_sim - sim_sorted + margin > 0)
  rows = jnp.arange(sim.shape[0])[:, None]
  counts = (jnp.zeros(sim.shape, jnp.int32).at[rows, order].add(-active.astype(jnp.int32))
            .at[rows, jnp.take_along_axis(order, chosen_slot, axis=-1)].add(active.astype(jnp.int32)))
  return _linear_in_sim(sim, counts, margin * jnp.sum(active), jnp.sum(pos))


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
