"""Exact retrieval by inner product: nearest neighbours and the metrics DML papers report.

Queries are compared with references by inner product (cosine similarity for L2-normalised embeddings),
computed in full float32 precision, one [B, B] block of the similarity matrix at a time, never N x M.
Every query keeps a running list of its nearest references, into which each block is merged. With no
separate references the matrix is symmetric: only the blocks on and above the diagonal are computed, and
each is read twice, along its rows (row items as queries, column items as references) and along its
columns (the other way round), which halves the products. With several devices, the blocks are dealt
out to them; each device keeps running lists of all queries, merged at the end.

Ranking and ties: references are ordered by decreasing similarity, and references of equal similarity by
increasing index in the reference set. Every metric follows this one order, on any number of devices,
whatever the block size and the order in which blocks are read.

For a query whose class has R references (R excludes the query itself), with rel_i = 1 when the i-th
nearest reference shares its label (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):

  recall@K     = 1 if any of the K nearest references is relevant
  precision@1  = rel_1
  r_precision  = (1/R) sum_{i<=R} rel_i
  map@r        = (1/R) sum_{i<=R} rel_i * (1/i) sum_{j<=i} rel_j

The relevant references come first, from a sweep of the few blocks that hold pairs of one class once the
items are sorted by class. The full sweep then lists only the references of other classes: the max(R)
nearest (max(K) when K is at most 64), and for a larger K (1000 on SOP) it also counts those that rank
before the query's first relevant reference, which is known by then, rather than listing 1000. The
ranking of a query is the merge of its two lists. Each similarity is computed once and used wherever it
is needed. With no separate references, every embedding is a query against all the others (the
self-match excluded). Queries whose class has no reference are left out and counted in
`num_excluded_queries`.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

BLOCK_AXIS = "blocks"
# Recall@K for K up to this is read from the list of nearest refs; a larger K counts ranks instead.
_MAX_LISTED_K = 64
# Refs are taken from a block group by group: groups of this many consecutive refs.
_GROUP_SIZE = 16
# Once at most this many queries of a block still take refs from it, they go on alone.
_FEW_QUERIES = 256
# The side of a block in the sweep for the relevant refs (pairs of one class lie near the diagonal).
_CLASS_BLOCK = 256
# The index of no ref (a query that is not in the refs; a list not full yet): beyond every index.
_NOT_A_REF = np.iinfo(np.int32).max
# The class of a query with no reference of its class, and of padding.
_NO_CLASS = -1


def eval_mesh() -> Mesh:
  """A 1-D mesh over this process's devices; the blocks of the similarity matrix are dealt out along
  BLOCK_AXIS. (In a multi-host run every process evaluates on its own devices.)"""
  return Mesh(np.array(jax.local_devices()), (BLOCK_AXIS,))


def _better(sim_a, index_a, sim_b, index_b):
  """Whether ref a ranks before ref b: higher similarity, or equal similarity and lower index."""
  return (sim_a > sim_b) | ((sim_a == sim_b) & (index_a < index_b))


def _nearest_first(sim, index, depth, *payload):
  """The `depth` first entries of each row of sim [C, L] and index [C, L] (and payload [C, L] arrays
  carried along) in ranking order."""
  negated, index, *payload = jax.lax.sort((-sim, index, *payload), dimension=1, num_keys=2)
  return (-negated[:, :depth], index[:, :depth], *(p[:, :depth] for p in payload))


def _merge_block(listed_sim, listed_index, sim, ref_start, axis):
  """The running lists listed_sim, listed_index [n, depth] (nearest first) of the n queries along the
  other axis of block sim [B, B'] (its rows: axis=1, its columns: axis=0), merged with the block's
  refs, indexed from ref_start on along `axis`.

  Refs are taken from the block best first, as long as the next still ranks before the last of the list
  (at most depth times; a few in most blocks): each from the group of consecutive refs whose best
  remaining ref is best (equal: the lower group, so the lower index), and inserted in its place. A
  group's best remaining ref is its best one that ranks after the last ref taken, so the block itself is
  never written. Once few queries still take refs, they go on alone, on their rows of the block.
  """
  num_queries, depth = listed_sim.shape
  num_groups = sim.shape[axis] // _GROUP_SIZE
  if axis == 1:
    group_max = jnp.max(sim.reshape(num_queries, num_groups, _GROUP_SIZE), axis=2)
  else:
    group_max = jnp.max(sim.reshape(num_groups, _GROUP_SIZE, num_queries), axis=1).T
  offsets = jnp.arange(_GROUP_SIZE)

  def take(state, queries):
    """Each of the queries [n'] takes its best remaining ref if it ranks before the last of its list."""
    step, _, group_max, taken_sim, taken_index, listed_sim, listed_index = state
    group = jnp.argmax(group_max, axis=1)
    positions = group[:, None] * _GROUP_SIZE + offsets
    values = sim[queries[:, None], positions] if axis == 1 else sim[positions, queries[:, None]]
    values = jnp.where(_better(taken_sim[:, None], taken_index[:, None], values, ref_start + positions),
                       values, -jnp.inf)
    best = jnp.argmax(values, axis=1)
    best_sim = jnp.max(values, axis=1)
    best_index = (ref_start + group * _GROUP_SIZE + best).astype(listed_index.dtype)  # int32 under x64.
    takes = (_better(best_sim, best_index, listed_sim[:, -1], listed_index[:, -1])
             & (best_sim > -jnp.inf))
    rest_max = jnp.max(jnp.where(offsets == best[:, None], -jnp.inf, values), axis=1)
    group_max = jnp.where(takes[:, None] & (jnp.arange(group_max.shape[1]) == group[:, None]),
                          rest_max[:, None], group_max)
    place = jnp.sum(_better(listed_sim, listed_index, best_sim[:, None], best_index[:, None]), axis=1)
    slot = jnp.arange(depth) - jnp.where(takes, place, depth)[:, None]

    def insert(listed, entry):
      shifted = jnp.concatenate([listed[:, :1], listed[:, :-1]], axis=1)
      return jnp.where(slot < 0, listed, jnp.where(slot == 0, entry[:, None], shifted))

    return (step + 1, takes, group_max, jnp.where(takes, best_sim, taken_sim),
            jnp.where(takes, best_index, taken_index), insert(listed_sim, best_sim),
            insert(listed_index, best_index))

  def take_while(state, queries, go_on):
    return jax.lax.while_loop(lambda state: (state[0] < depth) & go_on(state[1]),
                              lambda state: take(state, queries), state)

  block_max = jnp.max(group_max, axis=1)
  state = (jnp.int32(0), (block_max >= listed_sim[:, -1]) & (block_max > -jnp.inf), group_max,
           jnp.full_like(listed_sim[:, 0], jnp.inf), jnp.full_like(listed_index[:, 0], -1), listed_sim,
           listed_index)
  few = min(num_queries, _FEW_QUERIES)
  step, takes, *per_query = take_while(state, jnp.arange(num_queries),
                                       lambda takes: jnp.sum(takes) > few)
  queries = jnp.nonzero(takes, size=few, fill_value=num_queries)[0]
  group_max, taken_sim, taken_index, listed_sim, listed_index = (
      jnp.take(x, queries, axis=0, mode="clip") for x in per_query)
  # Filler rows (past the queries that still take) end with +inf: nothing ranks before it.
  listed_sim = jnp.where((queries < num_queries)[:, None], listed_sim, jnp.inf)
  few_state = take_while((step, queries < num_queries, group_max, taken_sim, taken_index, listed_sim,
                          listed_index), jnp.minimum(queries, num_queries - 1), jnp.any)
  return tuple(x.at[queries].set(y, mode="drop") for x, y in zip(per_query[-2:], few_state[-2:]))


def _read_block(lists, sim, query_start, ref_start, axis, first_hit):
  """Merges block sim [B, B'] into the lists of its queries: its rows (axis=1) or columns (axis=0),
  which are the queries from query_start on, against the refs from ref_start on.

  Args:
    lists: (listed_sim [Q', depth], listed_index [Q', depth], ahead [Q'] or None), the running lists of
      all queries and, when counting, how many refs so far rank before each one's first relevant ref.
    first_hit: (similarity [Q'], index [Q']) of each query's first relevant ref; None: no counting.
  """
  listed_sim, listed_index, ahead = lists
  num_queries = sim.shape[1 - axis]

  def rows(x):
    return jax.lax.dynamic_slice_in_dim(x, query_start, num_queries)

  def write(x, value):
    return jax.lax.dynamic_update_slice_in_dim(x, value, query_start, 0)

  merged_sim, merged_index = _merge_block(rows(listed_sim), rows(listed_index), sim, ref_start, axis)
  if first_hit is not None:
    first_sim, first_index = (jnp.expand_dims(rows(x), axis) for x in first_hit)
    ref_index = jnp.expand_dims(ref_start + jnp.arange(sim.shape[axis]), 1 - axis)
    ahead = write(ahead, rows(ahead) + jnp.sum(_better(sim, ref_index, first_sim, first_index),
                                               axis=axis, dtype=jnp.int32))
  return write(listed_sim, merged_sim), write(listed_index, merged_index), ahead


def _read_blocks(pairs, lists, queries, query_classes, refs, ref_classes, first_hit, *, query_block,
                 ref_block, num_refs, symmetric, same_class):
  """Reads the blocks `pairs` [T, 2] (block row, block column; -1: none) into `lists` (see
  `_read_block`), keeping the refs of another class than the query's or, with same_class, of its own.

  Args:
    queries: [Q', D], query_classes: [Q']; refs: [M', D], ref_classes: [M']: padded to multiples of the
      block sizes. Refs are indexed by their position.
    num_refs: refs from this position on are padding.
    symmetric: queries and refs are the same items: the blocks lie on or above the diagonal and are read
      along their columns too, and only the entries above the diagonal are kept.
  """

  def read(t, lists):
    block_row, block_col = pairs[t, 0], pairs[t, 1]
    query_start = jnp.maximum(block_row, 0) * query_block
    ref_start = jnp.maximum(block_col, 0) * ref_block
    sim = jnp.matmul(jax.lax.dynamic_slice_in_dim(queries, query_start, query_block),
                     jax.lax.dynamic_slice_in_dim(refs, ref_start, ref_block).T,
                     precision=jax.lax.Precision.HIGHEST)
    same = (jax.lax.dynamic_slice_in_dim(query_classes, query_start, query_block)[:, None]
            == jax.lax.dynamic_slice_in_dim(ref_classes, ref_start, ref_block)[None, :])
    ref_position = ref_start + jnp.arange(ref_block)
    kept = (same if same_class else ~same) & (ref_position < num_refs) & (block_row >= 0)
    if symmetric:
      kept &= ref_position > (query_start + jnp.arange(query_block))[:, None]
    sim = jnp.where(kept, sim, -jnp.inf)
    lists = _read_block(lists, sim, query_start, ref_start, 1, first_hit)
    if symmetric:
      lists = _read_block(lists, sim, ref_start, query_start, 0, first_hit)
    return lists

  return jax.lax.fori_loop(0, pairs.shape[0], read, lists)


@functools.partial(jax.jit, static_argnames=("query_block", "ref_block", "num_refs", "symmetric",
                                             "same_class"), donate_argnames=("lists",))
def _sweep(pairs, lists, queries, query_classes, refs, ref_classes, first_hit, *, query_block,
           ref_block, num_refs, symmetric, same_class):
  """`_read_blocks` on every device, each with its own pairs [devices, T, 2] and its own lists
  [devices, Q', ...]; the other arrays are replicated. Returns the lists merged over the devices:
  similarities and indices [Q', depth], and the counts [Q'] (or None)."""

  def per_device(pairs, lists, *replicated):
    lists = _read_blocks(pairs[0], jax.tree.map(lambda x: x[0], lists), *replicated,
                         query_block=query_block, ref_block=ref_block, num_refs=num_refs,
                         symmetric=symmetric, same_class=same_class)
    return jax.tree.map(lambda x: x[None], lists)

  dealt, replicated = PartitionSpec(BLOCK_AXIS), PartitionSpec()
  listed_sim, listed_index, ahead = jax.shard_map(
      per_device, mesh=eval_mesh(), in_specs=(dealt, dealt) + (replicated,) * 5, out_specs=dealt)(
          pairs, lists, queries, query_classes, refs, ref_classes, first_hit)
  if len(listed_sim) > 1:
    listed_sim, listed_index = _nearest_first(
        *(jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1) for x in (listed_sim, listed_index)),
        listed_sim.shape[2])
  else:
    listed_sim, listed_index = listed_sim[0], listed_index[0]
  return listed_sim, listed_index, None if ahead is None else jnp.sum(ahead, axis=0)


def _padded(x: np.ndarray, multiple: int, value=0) -> np.ndarray:
  """x [N, ...] padded with `value` to a multiple of `multiple` rows."""
  return np.pad(x, [(0, -len(x) % multiple)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _block_size(chunk_size: int, num: int) -> int:
  """The side of a block: chunk_size, or less for a small set; a multiple of _GROUP_SIZE."""
  return -(-min(chunk_size, num) // _GROUP_SIZE) * _GROUP_SIZE


def _class_ranges(classes: np.ndarray, block: int) -> np.ndarray:
  """[blocks, 2] the lowest and highest class in each block of sorted classes (_NO_CLASS left out; a
  block without a class: an empty range)."""
  blocks = _padded(classes, block, _NO_CLASS).reshape(-1, block)
  present = blocks != _NO_CLASS
  return np.stack([np.where(present, blocks, np.iinfo(np.int32).max).min(axis=1),
                   np.where(present, blocks, -1).max(axis=1)], axis=1)


def _nearest_lists(queries, query_classes, refs, ref_classes, *, depth, block_size, symmetric,
                   same_class=False, first_hit=None):
  """The `depth` nearest refs of each query among those of another class (same_class: of its own class,
  other than itself): similarities [Q', depth] and indices [Q', depth], nearest first (-inf past the
  last), and with first_hit (similarity [Q], index [Q] of each query's first relevant ref), how many
  refs of another class rank before it [Q'] (else None). Q' >= Q rows: padding past Q.

  Args:
    queries: [Q, D], query_classes: [Q] int; refs: [M, D], ref_classes: [M] int (ignored if symmetric).
    block_size: the side of the blocks.
    symmetric: the queries are also the refs; each query's own entry is left out.
    same_class: queries and refs are sorted by class, and only the blocks whose class ranges meet are
      read.
  """
  num_queries, num_refs = len(queries), len(refs)
  query_block = _block_size(block_size, num_queries)
  ref_block = query_block if symmetric else _block_size(block_size, num_refs)
  num_ref_blocks = -(-num_refs // ref_block)
  pairs = [(i, j) for i in range(-(-num_queries // query_block))
           for j in range(i if symmetric else 0, num_ref_blocks)]
  if same_class:
    query_ranges = _class_ranges(query_classes, query_block)
    ref_ranges = _class_ranges(ref_classes, ref_block)
    pairs = [(i, j) for i, j in pairs
             if query_ranges[i, 0] <= ref_ranges[j, 1] and ref_ranges[j, 0] <= query_ranges[i, 1]]
  num_devices = eval_mesh().size
  pairs = np.array(pairs + [(-1, -1)] * (-len(pairs) % num_devices), np.int32).reshape(-1, 2)
  pairs = pairs.reshape(-1, num_devices, 2).transpose(1, 0, 2)  # Dealt out in turn.

  queries, query_classes = _padded(queries, query_block), _padded(query_classes, query_block, _NO_CLASS)
  if symmetric:
    refs, ref_classes = queries, query_classes
  else:
    refs, ref_classes = _padded(refs, ref_block), _padded(ref_classes, ref_block, _NO_CLASS)
  if first_hit is not None:
    first_hit = tuple(_padded(np.asarray(x), query_block) for x in first_hit)
  shape = (num_devices, len(queries))
  lists = (np.full(shape + (depth,), -np.inf, np.float32), np.full(shape + (depth,), _NOT_A_REF, np.int32),
           None if first_hit is None else np.zeros(shape, np.int32))
  dealt = NamedSharding(eval_mesh(), PartitionSpec(BLOCK_AXIS))
  replicated = jax.device_put(
      (queries, query_classes.astype(np.int32), refs, ref_classes.astype(np.int32), first_hit),
      NamedSharding(eval_mesh(), PartitionSpec()))
  return _sweep(jax.device_put(pairs, dealt), jax.device_put(lists, dealt), *replicated,
                query_block=query_block, ref_block=ref_block, num_refs=num_refs, symmetric=symmetric,
                same_class=same_class)


def _relevant_lists(queries, query_classes, refs, ref_classes, *, depth, symmetric):
  """The `depth` nearest relevant refs of each query (of its class, other than itself): similarities
  [Q, depth] (-inf past R) and indices [Q, depth] (_NOT_A_REF past R), nearest first.

  Queries and refs are sorted by class, stably, so that the refs of one class keep their order and ties
  still go to the lower index.
  """
  query_order = np.argsort(query_classes, kind="stable")
  ref_order = query_order if symmetric else np.argsort(ref_classes, kind="stable")
  listed_sim, listed_index, _ = jax.device_get(_nearest_lists(
      queries[query_order], query_classes[query_order], refs[ref_order], ref_classes[ref_order],
      depth=depth, block_size=_CLASS_BLOCK, symmetric=symmetric, same_class=True))
  listed_sim, listed_index = listed_sim[:len(queries)], listed_index[:len(queries)]
  relevant_sim, relevant_index = np.empty_like(listed_sim), np.empty_like(listed_index)
  relevant_sim[query_order] = listed_sim
  relevant_index[query_order] = np.where(
      np.isfinite(listed_sim), ref_order[np.minimum(listed_index, len(refs) - 1)], _NOT_A_REF)
  return relevant_sim, relevant_index


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


@functools.partial(jax.jit, static_argnames=("depth",))
def _ranking_statistics(relevant_sim, relevant_index, listed_sim, listed_index, num_relevant,
                        first_hit_rank, *, depth):
  """First-hit rank, R-precision and AP@R [Q] of queries with relevant refs [Q, R'] and nearest other
  refs [Q, depth] (and the first-hit rank [Q] when counted, else None): the two lists merged."""
  _, _, listed_hits = _nearest_first(
      jnp.concatenate([relevant_sim, listed_sim], axis=1),
      jnp.concatenate([relevant_index, listed_index], axis=1), depth,
      jnp.concatenate([jnp.isfinite(relevant_sim), jnp.zeros(listed_sim.shape, bool)], axis=1))
  return _list_statistics(listed_hits, num_relevant, first_hit_rank)


def nearest_neighbors(queries, refs, k: int, *, query_ids=None,
                      chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest refs of each query by inner product, nearest first (ties: lower ref index first).

  Args:
    queries: [Q, D]; refs: [M, D].
    k: neighbours per query, at most M (M - 1 with query_ids).
    query_ids: [Q] index in refs of each query itself, never returned as its neighbour; None: no query
      is in refs.
    chunk_size: the side of a block of similarities.

  Returns:
    similarities [Q, k] float32 and indices [Q, k] int32.
  """
  queries = np.asarray(queries, np.float32)
  refs = np.asarray(refs, np.float32)
  ids = np.full(len(queries), _NOT_A_REF) if query_ids is None else np.asarray(query_ids)
  if not 0 < k <= len(refs) - int(query_ids is not None):
    raise ValueError(f"k={k} must be in [1, number of candidate references].")
  # Each ref is a class of its own and each query is of the class of its own index: only the
  # self-match is left out.
  similarities, indices, _ = jax.device_get(_nearest_lists(
      queries, ids.astype(np.int32), refs, np.arange(len(refs), dtype=np.int32), depth=k,
      block_size=chunk_size, symmetric=False))
  return similarities[:len(queries)], indices[:len(queries)]


def retrieval_metrics(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                      ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024) -> dict:
  """Recall@K, Precision@1, R-Precision and MAP@R (Musgrave et al. 2020) of the queries `embeddings`.

  Exact, by inner product, with the tie rule of the module docstring. Memory: a few [chunk_size,
  chunk_size] blocks, and per device the running lists, O(N x max(R, K)).

  Args:
    embeddings: [N, D] query embeddings; labels: [N] int labels.
    ref_embeddings, ref_labels: [M, D], [M] the gallery; None: the queries against themselves
      (M = N, the self-match excluded).
    ks: the K of Recall@K, positive.
    chunk_size: the side of a block of similarities.

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
  query_classes = np.where(has_class, position, _NO_CLASS).astype(np.int32)
  num_relevant = (np.where(has_class, class_sizes[position], 0) - int(self_query)).astype(np.int32)
  scored = num_relevant > 0
  if not scored.any():
    raise ValueError("No query has a reference of its own class: retrieval metrics are undefined.")

  max_relevant = int(num_relevant.max())
  count_ranks = max(ks) > max(max_relevant, _MAX_LISTED_K)
  depth = (max_relevant if count_ranks
           else min(max(max_relevant, max(ks)), len(refs) - int(self_query)))
  relevant_sim, relevant_index = _relevant_lists(queries, query_classes, refs, ref_classes,
                                                 depth=max_relevant, symmetric=self_query)
  first_hit = (relevant_sim[:, 0], relevant_index[:, 0]) if count_ranks else None
  listed_sim, listed_index, first_hit_rank = _nearest_lists(
      queries, query_classes, refs, ref_classes, depth=depth, block_size=chunk_size,
      symmetric=self_query, first_hit=first_hit)
  rows = len(listed_sim)
  statistics = _ranking_statistics(
      _padded(relevant_sim, rows, -np.inf), _padded(relevant_index, rows, _NOT_A_REF), listed_sim,
      listed_index, _padded(num_relevant, rows), first_hit_rank, depth=depth)
  first_hit_rank, r_precision, ap_at_r = (np.asarray(x)[:len(queries)][scored] for x in statistics)

  metrics = {f"recall@{k}": float(np.mean(first_hit_rank < k)) for k in ks}
  metrics["precision@1"] = float(np.mean(first_hit_rank == 0))
  metrics["r_precision"] = float(np.mean(r_precision, dtype=np.float64))
  metrics["map@r"] = float(np.mean(ap_at_r, dtype=np.float64))
  metrics["num_queries"] = int(scored.sum())
  metrics["num_excluded_queries"] = int((~scored).sum())
  return metrics


def nearest_by_class(embeddings, labels, k: int, *, same_class: bool,
                     chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Each item's k nearest other items by inner product among those of another class (same_class
  False) or of its own class (True), nearest first (ties: lower index first), exact and blockwise.

  Args:
    embeddings: [N, D]; labels: [N] int.
    k: the length of each list.
    chunk_size: the side of a block of similarities (another class).

  Returns:
    similarities [N, k] float32 (-inf past the last where fewer than k exist) and indices [N, k] int32
    (-1 there).
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels).astype(np.int32)
  if k < 1:
    raise ValueError(f"k={k} must be positive.")
  if same_class:
    similarities, indices = _relevant_lists(embeddings, labels, embeddings, labels, depth=k,
                                            symmetric=True)
  else:
    similarities, indices, _ = jax.device_get(_nearest_lists(
        embeddings, labels, embeddings, labels, depth=k, block_size=chunk_size, symmetric=True))
  similarities, indices = similarities[:len(labels)], indices[:len(labels)]
  return similarities, np.where(np.isfinite(similarities), indices, -1).astype(np.int32)
