"""Metric-learning losses, found by name.

`get_pair_loss(name)` gives the loss in the unified form, `loss(S, pos, neg, **hparams)`;
`get(name)` gives the embedding-level call
`loss(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_valid=None, **hparams) -> scalar`
that builds the pairs of the batch against itself and the optional extra references.
"""

import functools
from typing import Optional

import jax

from mmsi_jax.losses.multi_similarity import multi_similarity, multi_similarity_mining
from mmsi_jax.losses.pairs import Pairs, build_pairs, pair_weights, weighted_pair_loss

_PAIR_LOSSES = {
    "multi_similarity": multi_similarity,
}


def names() -> list[str]:
  return sorted(_PAIR_LOSSES)


def get_pair_loss(name: str):
  """The loss `name` as a function of (S [B, M], pos [B, M], neg [B, M], **hparams)."""
  if name not in _PAIR_LOSSES:
    raise KeyError(f"Unknown loss {name!r}; known losses: {', '.join(names())}.")
  return _PAIR_LOSSES[name]


def _embedding_loss(pair_loss, embeddings: jax.Array, labels: jax.Array, *,
                    ref_embeddings: Optional[jax.Array] = None,
                    ref_labels: Optional[jax.Array] = None,
                    ref_valid: Optional[jax.Array] = None, **hparams) -> jax.Array:
  pairs = build_pairs(embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                      ref_valid=ref_valid)
  return pair_loss(pairs.sim, pairs.pos, pairs.neg, **hparams)


def get(name: str):
  """The loss `name` as a function of embeddings [B, D] and labels [B] (see the module docstring)."""
  return functools.partial(_embedding_loss, get_pair_loss(name))


__all__ = [
    "Pairs", "build_pairs", "get", "get_pair_loss", "multi_similarity", "multi_similarity_mining",
    "names", "pair_weights", "weighted_pair_loss",
]
