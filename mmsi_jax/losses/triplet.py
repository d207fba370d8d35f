"""Triplet loss with a margin on similarities (Schroff et al., FaceNet, CVPR 2015), with batch-all,
batch-hard (Hermans, Beyer and Leibe, "In defense of the triplet loss", 2017) and semi-hard (FaceNet,
section 3.2) selection of the triplets.

A triplet (i, p, n) is an anchor i with one of its positives p and one of its negatives n, all taken from
the anchor's row of S, and costs [S_in - S_ip + margin]_+. Batch-all over M references has up to B M^2
triplets (8.6e9 at B = 128, M = 8192, 34 GB as float32); they are never stored. Each anchor's positives
are taken P at a time, sorted by similarity, and compared with the anchor's whole row. Because the
positives of a chunk are sorted, the ones a negative n forms an active triplet with are a prefix of
them, so one count per negative c_n = #{p : S_in - S_ip + margin > 0} says everything: positive number k
is active with the negatives whose c_n >= k, a suffix sum of the histogram of c_n. Semi-hard sorts the
negatives into the same P + 1 intervals between the chunk's positives and keeps the most similar one of
each interval. Both cost O(B M) memory and O(B M x positives per anchor) time, small in DML, where an
anchor has a few positives among many references. They give how many selected triplets each pair is in;
the loss is linear in S with those counts, so its gradient needs no differentiation through the
selection.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from mmsi_jax.search_space import Float, tunable

# Positives of each anchor compared with its whole row at once: [B, _POSITIVE_CHUNK, M] per loop step.
_POSITIVE_CHUNK = 32


def fold_positive_chunks(sim, pos, chunk_fn: Callable, init):
  """Folds chunk_fn(carry, columns, valid, s_pos) -> carry over each anchor's positives,
  _POSITIVE_CHUNK at a time, with S held constant.

  For each anchor, columns [B, P] are the columns of its next P positives in increasing order of their
  similarities s_pos [B, P]; valid [B, P] marks the real ones (they come first; a row with fewer
  positives left is padded with column 0 and s_pos = inf).
  """
  sim = jax.lax.stop_gradient(sim)
  num_pos = jnp.sum(pos, axis=-1, dtype=jnp.int32)
  pos_rank = jnp.cumsum(pos, axis=-1, dtype=jnp.int32)  # The k-th positive is where it first reaches k.
  first_at = jax.vmap(lambda row, k: jnp.searchsorted(row, k, side="left"))

  def body(state):
    chunk, carry = state
    slots = chunk * _POSITIVE_CHUNK + jnp.arange(_POSITIVE_CHUNK, dtype=jnp.int32)
    valid = jnp.broadcast_to(slots < num_pos[:, None], (sim.shape[0], _POSITIVE_CHUNK))
    columns = jnp.where(valid, first_at(pos_rank, jnp.broadcast_to(slots + 1, valid.shape)), 0)
    s_pos = jnp.where(valid, jnp.take_along_axis(sim, columns, axis=1), jnp.inf)
    s_pos, columns, valid = jax.lax.sort((s_pos, columns, valid), dimension=1, num_keys=1)
    return chunk + 1, chunk_fn(carry, columns, valid, s_pos)

  # Counted in chunks, one at a time: XLA's trip-count analysis (jaxlib 0.10) takes a loop
  # `i = 0; while i < bound: i += step` with a compile-time bound that step does not divide to run
  # floor(bound / step) times, so with positives known at compile time (one per anchor: bound 1, step
  # 32) a jitted loss ran no chunk and returned 0 (openxla/xla#48454).
  num_chunks = (jnp.max(num_pos) + _POSITIVE_CHUNK - 1) // _POSITIVE_CHUNK
  return jax.lax.while_loop(lambda state: state[0] < num_chunks, body,
                            (jnp.zeros((), jnp.int32), init))[1]


def _linear_in_sim(sim, counts, constant, normaliser):
  """(sum_ij counts_ij S_ij + constant) / max(normaliser, 1), with counts [B, M] held constant.

  A triplet sum sum_(i,p,n) (S_in - S_ip + margin) over selected triplets is linear in S: each pair
  enters with the number of selected triplets it is the negative of, minus those it is the positive of.
  Written so, the loss's value and gradient need no [B, M, M] array and no differentiation through the
  selection.
  """
  counts = jax.lax.stop_gradient(counts).astype(sim.dtype)
  return (jnp.sum(counts * sim) + constant) / jnp.maximum(normaliser, 1)


def add_at(counts, columns, values):
  """counts [B, M] with values [B, P] added at columns [B, P] of each row."""
  return counts.at[jnp.arange(counts.shape[0])[:, None], columns].add(values)


def _histogram(bins, include, num_bins):
  """[B, num_bins] int32: per row, how many of the included columns fall in each bin (bins [B, M])."""
  return add_at(jnp.zeros((bins.shape[0], num_bins), jnp.int32), bins, include.astype(jnp.int32))


def _batch_all(sim, pos, neg, margin):
  """Mean of [S_in - S_ip + margin]_+ over the triplets where it is non-zero."""
  sim_row = jax.lax.stop_gradient(sim)[:, None, :]

  def chunk_fn(counts, columns, valid, s_pos):
    active = valid[:, :, None] & (sim_row - s_pos[:, :, None] + margin > 0)  # [B, P, M]
    active_pos = jnp.where(neg, jnp.sum(active, axis=1, dtype=jnp.int32), 0)  # c_n; 0 off negatives.
    histogram = _histogram(active_pos, neg, _POSITIVE_CHUNK + 1)
    at_least = jnp.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # [k]: negatives with c_n >= k.
    return add_at(counts + active_pos, columns, -jnp.where(valid, at_least[:, 1:], 0))

  counts = fold_positive_chunks(sim, pos, chunk_fn, jnp.zeros(sim.shape, jnp.int32))
  # Up to B M^2 triplets: past the int32 range at scale, so summed as floats.
  active = jnp.sum(jnp.where(neg, counts, 0), dtype=sim.dtype)
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
  S_in < S_ip (0 when there is none; among equally similar ones, the lowest column)."""
  sim_stopped = jax.lax.stop_gradient(sim)
  rows = jnp.arange(sim.shape[0])[:, None]
  num_bins = _POSITIVE_CHUNK + 1
  # Negative n is less similar than the chunk's k-th positive exactly when fewer than k of the chunk's
  # positives have S_ip <= S_in (they are sorted): its interval.
  before = jnp.arange(num_bins)[None, :] < jnp.arange(1, num_bins)[:, None]  # [k - 1, interval]

  def chunk_fn(carry, columns, valid, s_pos):
    counts, num_active = carry
    interval = jnp.sum(valid[:, :, None] & (s_pos[:, :, None] <= sim_stopped[:, None, :]), axis=1,
                       dtype=jnp.int32)
    interval = jnp.where(neg, interval, num_bins)  # Non-negatives fall outside every interval.
    best = jnp.full((sim.shape[0], num_bins), -jnp.inf, sim.dtype).at[rows, interval].max(
        sim_stopped, mode="drop")
    is_best = neg & (sim_stopped == jnp.take_along_axis(best, jnp.minimum(interval, num_bins - 1), 1))
    best_column = jnp.full(best.shape, sim.shape[1], jnp.int32).at[rows, interval].min(
        jnp.where(is_best, jnp.arange(sim.shape[1], dtype=jnp.int32), sim.shape[1]), mode="drop")
    # For the k-th positive, the best over the intervals before it (the lowest interval among equals).
    candidates = jnp.where(before, best[:, None, :], -jnp.inf)  # [B, P, P + 1]
    chosen = jnp.argmax(candidates, axis=2)
    s_chosen = jnp.take_along_axis(best, chosen, axis=1)
    active = valid & (s_chosen - s_pos + margin > 0)  # False when there is no such negative (-inf).
    chosen_column = jnp.where(active, jnp.take_along_axis(best_column, chosen, axis=1), 0)
    counts = add_at(add_at(counts, columns, -active.astype(jnp.int32)), chosen_column,
                     active.astype(jnp.int32))
    return counts, num_active + jnp.sum(active, dtype=jnp.int32)

  counts, num_active = fold_positive_chunks(
      sim, pos, chunk_fn, (jnp.zeros(sim.shape, jnp.int32), jnp.zeros((), jnp.int32)))
  return _linear_in_sim(sim, counts, margin * num_active, jnp.sum(pos))


_MINING = {"all": _batch_all, "hard": _batch_hard, "semihard": _semihard}


@tunable(margin=Float(0.01, 0.5, log=True))
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
