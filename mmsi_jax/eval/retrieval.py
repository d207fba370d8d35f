"""Exact retrieval by inner product: nearest neighbours and the metrics DML papers report.

Queries are compared with references by inner product (cosine similarity for L2-normalised embeddings),
computed in full float32 precision, one chunk of queries at a time: a call holds a [chunk, M] block of
similarities, never N x M. With several devices, each chunk is split across them along the queries and
the references are replicated, so every query's ranking is computed whole on one device.

Ranking and ties: references are ordered by decreasing similarity, and references of equal similarity by
increasing index in the reference set. Every metric follows this one order, on any number of devices.

For a query whose class has R references (R excludes the query itself), with rel_i = 1 when the i-th
nearest reference shares its label (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):

  recall@K     = 1 if any of the K nearest references is relevant
  precision@1  = rel_1
  r_precision  = (1/R) sum_{i<=R} rel_i
  map@r        = (1/R) sum_{i<=R} rel_i * (1/i) sum_{j<=i} rel_j

R-precision and MAP@R come from the list of the max(R) nearest references of each query. Recall@K comes
from the rank of the first relevant reference (how many references come before it): read from that list,
made max(K) long when K is at most 64, or else counted over all references, so that a large K (1000 on
SOP) costs one pass over the similarities rather than a top-1000. With no separate references, every
embedding is a query against all the others (the self-match excluded). Queries whose class has no
reference are left out and counted in `num_excluded_queries`.
"""

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

QUERY_AXIS = "queries"
# Recall@K for K up to this is read from the list of nearest refs; a larger K counts ranks instead.
_MAX_LISTED_K = 64
# The top-k first keeps the k best groups of this many consecutive refs (by their best similarity).
_GROUP_SIZE = 32
# The query id of a query that is not in the references: beyond every index.
_NOT_A_REF = np.iinfo(np.int32).max


def query_mesh() -> Mesh:
  """A 1-D mesh over this process's devices; chunks of queries are split along its axis `QUERY_AXIS`.
  (In a multi-host run every process evaluates on its own devices.)"""
  return Mesh(np.array(jax.local_devices()), (QUERY_AXIS,))


def _similarities(queries, query_ids, refs, num_refs):
  """Inner products [C, M'] of queries [C, D] with refs [M', D] (rows from `num_refs` on are padding);
  -inf for padding and at each query's own index `query_ids` [C] (out of range: none)."""
  sim = jnp.matmul(queries, refs.T, precision=jax.lax.Precision.HIGHEST)
  sim = sim.at[:, num_refs:].set(-jnp.inf)
  return sim.at[jnp.arange(sim.shape[0]), query_ids].set(-jnp.inf, mode="drop")


def _top_k(sim, k):
  """`jax.lax.top_k(sim, k)` of sim [C, M'] (M' a multiple of _GROUP_SIZE), same ties, fewer comparisons.

  The k best refs lie in the k best groups of consecutive refs, ranked by their maxima (equal maxima:
  lower group first): each better group's maximum ranks before any ref of a worse group. The candidates
  are those groups in index order, so that ties still go to the lower index.
  """
  num_groups = sim.shape[1] // _GROUP_SIZE
  if 4 * k > num_groups:  # The candidates would be much of the row: no gain.
    return jax.lax.top_k(sim, k)
  group_max = jnp.max(sim.reshape(sim.shape[0], num_groups, _GROUP_SIZE), axis=2)
  groups = jnp.sort(jax.lax.top_k(group_max, k)[1], axis=1)
  candidates = (groups[:, :, None] * _GROUP_SIZE + jnp.arange(_GROUP_SIZE)).reshape(sim.shape[0], -1)
  values, positions = jax.lax.top_k(jnp.take_along_axis(sim, candidates, axis=1), k)
  return values, jnp.take_along_axis(candidates, positions, axis=1)


@functools.partial(jax.jit, static_argnames=("num_refs", "k"))
def _nearest_chunk(queries, query_ids, refs, *, num_refs, k):
  """Similarities [C, k] and indices [C, k] of the k nearest refs of each query, nearest first."""
  return _top_k(_similarities(queries, query_ids, refs, num_refs), k)


def _count_ahead(sim, ref_index, first_hit_sim, first_hit):
  """How many refs of sim [C, B] (indices ref_index [B]) rank before each query's first relevant ref,
  whose similarity and index are first_hit_sim [C] and first_hit [C]: [C] int32."""
  ahead = ((sim > first_hit_sim[:, None])
           | ((sim == first_hit_sim[:, None]) & (ref_index[None, :] < first_hit[:, None])))
  return jnp.sum(ahead, axis=1, dtype=jnp.int32)


def _first_relevant(sim, ref_index, relevant):
  """Similarity [C] and index [C] of each query's nearest relevant ref in sim [C, B] (ties: lowest
  index; -inf when there is none), relevant [C, B] bool, ref_index [B]."""
  relevant_sim = jnp.where(relevant, sim, -jnp.inf)
  position = jnp.argmax(relevant_sim, axis=1)
  return jnp.take_along_axis(relevant_sim, position[:, None], axis=1)[:, 0], ref_index[position]


def _list_statistics(listed_hits, num_relevant, first_hit_rank=None):
  """First-hit rank [C] (read from the list when not given), R-precision [C] and AP@R [C] of queries
  whose nearest refs, in order, are relevant or not as listed_hits [C, depth] (depth >= R) says."""
  depth = listed_hits.shape[1]
  if first_hit_rank is None:
    first_hit_rank = jnp.where(listed_hits.any(axis=1), jnp.argmax(listed_hits, axis=1), depth)
  hits = listed_hits & (jnp.arange(depth)[None, :] < num_relevant[:, None])
  r = jnp.maximum(num_relevant, 1).astype(jnp.float32)
  precision_at_i = jnp.cumsum(hits, axis=1) / jnp.arange(1, depth + 1)
  r_precision = jnp.sum(hits, axis=1) / r
  ap_at_r = jnp.sum(jnp.where(hits, precision_at_i, 0.0), axis=1) / r
  return first_hit_rank.astype(jnp.int32), r_precision, ap_at_r


@functools.partial(jax.jit, static_argnames=("num_refs", "depth", "count_ranks"))
def _ranking_chunk(queries, query_ids, query_classes, num_relevant, refs, ref_classes, *, num_refs,
                   depth, count_ranks):
  """Per query of a chunk: the rank of its first relevant ref, its R-precision and its AP@R.

  Args:
    queries: [C, D]; query_ids: [C] the query's own index in refs (_NOT_A_REF: none);
    query_classes: [C] int32; num_relevant: [C] R, at most `depth`;
    refs: [M', D] and ref_classes: [M'] int32, padded from `num_refs` on.
    depth: how many nearest refs are listed per query, at least max(R).
    count_ranks: count the refs ranked before the first relevant one over all refs (one more pass over
      the [C, M'] similarities); otherwise the rank is read from the list and is `depth` when the list
      holds no relevant ref, enough for every K <= depth.

  Returns:
    first_hit_rank [C] int32 (refs ranked before the first relevant one), r_precision [C], ap_at_r [C].
  """
  sim = _similarities(queries, query_ids, refs, num_refs)
  _, nearest = _top_k(sim, depth)
  listed_hits = (ref_classes[nearest] == query_classes[:, None]) & (nearest != query_ids[:, None])
  first_hit_rank = None
  if count_ranks:
    ref_index = jnp.arange(refs.shape[0])
    relevant = (ref_classes[None, :] == query_classes[:, None]) & (ref_index != query_ids[:, None])
    first_hit_rank = _count_ahead(sim, ref_index, *_first_relevant(sim, ref_index, relevant))
  return _list_statistics(listed_hits, num_relevant, first_hit_rank)


def _map_query_chunks(chunk_fn: Callable, query_arrays: Sequence[np.ndarray],
                      chunk_size: int) -> list[np.ndarray]:
  """Applies `chunk_fn(*chunks) -> tuple of [C, ...]` to fixed-size chunks of the [N, ...] query arrays,
  each chunk split across the devices, and concatenates the outputs ([N, ...] each)."""
  mesh = query_mesh()
  sharding = NamedSharding(mesh, PartitionSpec(QUERY_AXIS))
  num = len(query_arrays[0])
  chunk = -(-min(chunk_size, num) // mesh.size) * mesh.size
  outputs = []
  for start in range(0, num, chunk):
    parts = [a[start:start + chunk] for a in query_arrays]
    parts = [np.pad(p, [(0, chunk - len(p))] + [(0, 0)] * (p.ndim - 1)) for p in parts]
    outputs.append(chunk_fn(*jax.device_put(parts, sharding)))
  return [np.concatenate(o)[:num] for o in zip(*jax.device_get(outputs))]


def _replicated_padded(x: np.ndarray) -> jax.Array:
  """x [M, ...] padded with zeros to a multiple of _GROUP_SIZE rows, on every device."""
  x = np.pad(x, [(0, -len(x) % _GROUP_SIZE)] + [(0, 0)] * (x.ndim - 1))
  return jax.device_put(x, NamedSharding(query_mesh(), PartitionSpec()))


def nearest_neighbors(queries, refs, k: int, *, query_ids=None,
                      chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest refs of each query by inner product, nearest first (ties: lower ref index first).

  Args:
    queries: [Q, D]; refs: [M, D].
    k: neighbours per query, at most M (M - 1 with query_ids).
    query_ids: [Q] index in refs of each query itself, never returned as its neighbour; None: no query
      is in refs.
    chunk_size: queries per device call (rounded up to a multiple of the device count).

  Returns:
    similarities [Q, k] float32 and indices [Q, k] int32.
  """
  queries = np.asarray(queries, np.float32)
  refs = np.asarray(refs, np.float32)
  ids = np.full(len(queries), _NOT_A_REF) if query_ids is None else np.asarray(query_ids)
  if not 0 < k <= len(refs) - int(query_ids is not None):
    raise ValueError(f"k={k} must be in [1, number of candidate references].")
  chunk_fn = functools.partial(_nearest_chunk, refs=_replicated_padded(refs), num_refs=len(refs), k=k)
  similarities, indices = _map_query_chunks(chunk_fn, (queries, ids.astype(np.int32)), chunk_size)
  return similarities, indices


def retrieval_metrics(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                      ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024) -> dict:
  """Recall@K, Precision@1, R-Precision and MAP@R (Musgrave et al. 2020) of the queries `embeddings`.

  Exact, by inner product, with the tie rule of the module docstring. Device memory is O(chunk_size x M).

  Args:
    embeddings: [N, D] query embeddings; labels: [N] int labels.
    ref_embeddings, ref_labels: [M, D], [M] the gallery; None: the queries against themselves
      (M = N, the self-match excluded).
    ks: the K of Recall@K, positive.
    chunk_size: queries per device call (rounded up to a multiple of the device count).

  Returns:
    A dict of floats `recall@K` for each K, `precision@1`, `r_precision`, `map@r`, and ints
    `num_queries` (queries scored) and `num_excluded_queries` (queries whose class has no reference).

  Raises:
    ValueError: when no query has a reference of its class, or on malformed inputs.
  """
  queries = np.asarray(embeddings, np.float32)
  query_labels = np.asarray(labels)
  self_query = ref_embeddings is None
  if self_query != (ref_labels is None):
    raise ValueError("Pass both ref_embeddings and ref_labels, or neither.")
  refs = queries if self_query else np.asarray(ref_embeddings, np.float32)
  ref_labels = query_labels if self_query else np.asarray(ref_labels)
  if queries.ndim != 2 or refs.ndim != 2 or queries.shape[1] != refs.shape[1]:
    raise ValueError(f"Embeddings must be [N, D] and [M, D], got {queries.shape} and {refs.shape}.")
  if query_labels.shape != queries.shape[:1] or ref_labels.shape != refs.shape[:1]:
    raise ValueError("There must be one label per embedding.")
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive, got {tuple(ks)}.")

  classes, ref_classes, class_sizes = np.unique(ref_labels, return_inverse=True, return_counts=True)
  position = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
  has_class = classes[position] == query_labels
  query_classes = np.where(has_class, position, -1).astype(np.int32)
  num_relevant = (np.where(has_class, class_sizes[position], 0) - int(self_query)).astype(np.int32)
  scored = num_relevant > 0
  if not scored.any():
    raise ValueError("No query has a reference of its own class: retrieval metrics are undefined.")

  depth = int(num_relevant.max())
  count_ranks = max(ks) > max(depth, _MAX_LISTED_K)
  depth = depth if count_ranks else min(max(depth, max(ks)), len(refs) - int(self_query))
  query_ids = np.arange(len(queries)) if self_query else np.full(len(queries), _NOT_A_REF)
  chunk_fn = functools.partial(
      _ranking_chunk, refs=_replicated_padded(refs),
      ref_classes=_replicated_padded(ref_classes.astype(np.int32)), num_refs=len(refs), depth=depth,
      count_ranks=count_ranks)
  first_hit_rank, r_precision, ap_at_r = _map_query_chunks(
      chunk_fn, (queries, query_ids.astype(np.int32), query_classes, num_relevant), chunk_size)
  first_hit_rank, r_precision, ap_at_r = first_hit_rank[scored], r_precision[scored], ap_at_r[scored]

  metrics = {f"recall@{k}": float(np.mean(first_hit_rank < k)) for k in ks}
  metrics["precision@1"] = float(np.mean(first_hit_rank == 0))
  metrics["r_precision"] = float(np.mean(r_precision, dtype=np.float64))
  metrics["map@r"] = float(np.mean(ap_at_r, dtype=np.float64))
  metrics["num_queries"] = int(scored.sum())
  metrics["num_excluded_queries"] = int((~scored).sum())
  return metrics
