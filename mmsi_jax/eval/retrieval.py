"""Retrieval metrics: Recall@K, Precision@1, R-Precision and MAP@R (Musgrave et al., ECCV 2020).

Queries are compared with references by inner product (cosine similarity for L2-normalised embeddings)
in chunks of queries on the device with an exact top-k, so memory is O(chunk x N), never N x N.
For each query, R is the number of references of its class; relevance of the top max(K, R) neighbours
gives every metric:

  recall@K     = 1 if any of the K nearest references shares the query's label
  precision@1  = relevance of the nearest reference
  r_precision  = (relevant among the R nearest) / R
  map@r        = 1/R sum_{i<=R} rel_i * (relevant among the i nearest) / i

With no separate references, every embedding is a query against all the others (self-match excluded).
Queries whose class has no reference are left out and counted in `num_excluded_queries`.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _top_k_relevance(queries, query_labels, query_offset, refs, ref_labels, *, k, exclude_self):
  """Relevance [C, k] of the k nearest references of each query in a chunk, nearest first."""
  sim = queries @ refs.T
  if exclude_self:
    query_index = query_offset + jnp.arange(queries.shape[0])
    sim = jnp.where(jnp.arange(refs.shape[0])[None, :] == query_index[:, None], -jnp.inf, sim)
  _, index = jax.lax.top_k(sim, k)
  return ref_labels[index] == query_labels[:, None]


def _relevance(queries, query_labels, refs, ref_labels, k, exclude_self, chunk_size):
  """Relevance [N, k] for all queries, one fixed-shape chunk at a time (the last one padded)."""
  num = queries.shape[0]
  chunk_size = min(chunk_size, num)
  pad = -num % chunk_size
  queries = np.pad(queries, ((0, pad), (0, 0)))
  query_labels = np.pad(query_labels, (0, pad), constant_values=-1)
  refs, ref_labels = jnp.asarray(refs), jnp.asarray(ref_labels)
  chunks = []
  for start in range(0, num + pad, chunk_size):
    chunks.append(_top_k_relevance(
        jnp.asarray(queries[start:start + chunk_size]),
        jnp.asarray(query_labels[start:start + chunk_size]), start, refs, ref_labels,
        k=k, exclude_self=exclude_self))
  return np.concatenate([np.asarray(c) for c in chunks])[:num]


def retrieval_metrics(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                      ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024) -> dict:
  """Retrieval metrics of queries `embeddings` [N, D] with `labels` [N] (see the module docstring).

  Args:
    embeddings: [N, D] query embeddings.
    labels: [N] int labels.
    ref_embeddings, ref_labels: [M, D], [M] the gallery; None queries the set against itself.
    ks: the K of Recall@K.
    chunk_size: queries per device call.

  Returns:
    A dict of floats: `recall@K` for each K, `precision@1`, `r_precision`, `map@r`, and
    `num_queries` (queries scored) and `num_excluded_queries` (queries without any reference).
  """
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels).astype(np.int64)
  exclude_self = ref_embeddings is None
  if exclude_self:
    ref_embeddings, ref_labels = embeddings, labels
  ref_embeddings = np.asarray(ref_embeddings, np.float32)
  ref_labels = np.asarray(ref_labels).astype(np.int64)

  classes, ref_counts = np.unique(ref_labels, return_counts=True)
  position = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
  r = np.where(classes[position] == labels, ref_counts[position], 0) - int(exclude_self)
  keep = r > 0
  num_refs = ref_embeddings.shape[0] - int(exclude_self)
  metrics = {"num_queries": int(keep.sum()), "num_excluded_queries": int((~keep).sum())}
  if not keep.any():
    raise ValueError("No query has a reference of its own class: retrieval metrics are undefined.")

  k = min(max(max(ks), int(r[keep].max())), num_refs)
  rel = _relevance(embeddings, labels, ref_embeddings, ref_labels, k, exclude_self, chunk_size)
  rel, r = rel[keep], r[keep]
  for kk in ks:
    metrics[f"recall@{kk}"] = float(np.mean(np.any(rel[:, :kk], axis=1)))
  metrics["precision@1"] = float(np.mean(rel[:, 0]))
  within_r = np.arange(k)[None, :] < r[:, None]
  rel_r = rel & within_r
  metrics["r_precision"] = float(np.mean(rel_r.sum(axis=1) / r))
  precision_at_i = np.cumsum(rel_r, axis=1) / np.arange(1, k + 1)[None, :]
  metrics["map@r"] = float(np.mean(np.sum(precision_at_i * rel_r, axis=1) / r))
  return metrics
