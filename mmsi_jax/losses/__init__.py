"""Metric-learning losses, found by name.

Every loss is a function `loss(S, pos, neg, **hparams) -> scalar` of a similarity matrix and two masks
(the unified form, `pairs`), with its hyperparameters keyword-only. Two tables differ in what the columns
of S are:

- pair losses (`names()`, `get_pair_loss`): the references are the batch itself and optional extra rows
  such as a memory (`build_pairs`). These are the losses a miner re-weights and the train loop runs.
- proxy losses (`proxy_names()`, `get_proxy_loss`): the columns are C learnable class proxies and the
  rows the samples (`build_proxy_pairs`).

`get(name)` serves both tables with one embedding-level call,

    loss(embeddings [B, D], labels [B], *, ref_embeddings=None [R, D], ref_labels=None [R],
         ref_valid=None [R], proxies=None [C, D], **hparams) -> scalar,

where `proxies` is required by the proxy losses and refused by the pair losses; extra rows are extra
references for a pair loss and extra samples for a proxy loss.
"""

import functools
from typing import Optional

import jax

from mmsi_jax.losses.binomial_deviance import binomial_deviance
from mmsi_jax.losses.contrastive import contrastive
from mmsi_jax.losses.lifted_structure import lifted_structure
from mmsi_jax.losses.multi_similarity import multi_similarity, multi_similarity_mining
from mmsi_jax.losses.ntxent import ntxent
from mmsi_jax.losses.pairs import (Pairs, build_pairs, build_proxy_pairs, loss_and_pair_weights,
                                   pair_weights, weighted_pair_loss)
from mmsi_jax.losses.proxies import arcface, cosface, norm_softmax, proxy_anchor, proxy_nca
from mmsi_jax.losses.triplet import triplet

_PAIR_LOSSES = {
    "binomial_deviance": binomial_deviance,
    "contrastive": contrastive,
    "lifted_structure": lifted_structure,
    "multi_similarity": multi_similarity,
    "ntxent": ntxent,
    "triplet": triplet,
}

_PROXY_LOSSES = {
    "arcface": arcface,
    "cosface": cosface,
    "norm_softmax": norm_softmax,
    "proxy_anchor": proxy_anchor,
    "proxy_nca": proxy_nca,
}


def names() -> list[str]:
  """The pair losses: the batch (and memory) as references."""
  return sorted(_PAIR_LOSSES)


def proxy_names() -> list[str]:
  """The proxy losses: class proxies as references."""
  return sorted(_PROXY_LOSSES)


def _lookup(table: dict, name: str, kind: str):
  if name not in table:
    raise KeyError(f"Unknown {kind} loss {name!r}; known {kind} losses: {', '.join(sorted(table))}.")
  return table[name]


def get_pair_loss(name: str):
  """The pair loss `name` as a function of (S [B, M], pos [B, M], neg [B, M], **hparams)."""
  return _lookup(_PAIR_LOSSES, name, "pair")


def get_proxy_loss(name: str):
  """The proxy loss `name` as a function of (S [N, C], pos [N, C], neg [N, C], **hparams)."""
  return _lookup(_PROXY_LOSSES, name, "proxy")


def _embedding_loss(loss_fn, uses_proxies: bool, embeddings: jax.Array, labels: jax.Array, *,
                    ref_embeddings: Optional[jax.Array] = None,
                    ref_labels: Optional[jax.Array] = None,
                    ref_valid: Optional[jax.Array] = None,
                    proxies: Optional[jax.Array] = None, **hparams) -> jax.Array:
  extra_rows = dict(ref_embeddings=ref_embeddings, ref_labels=ref_labels, ref_valid=ref_valid)
  if uses_proxies:
    if proxies is None:
      raise ValueError("This proxy loss needs proxies=[C, D].")
    pairs = build_proxy_pairs(embeddings, labels, proxies, **extra_rows)
  else:
    if proxies is not None:
      raise ValueError("A pair loss takes no proxies.")
    pairs = build_pairs(embeddings, labels, **extra_rows)
  return loss_fn(pairs.sim, pairs.pos, pairs.neg, **hparams)


def get(name: str):
  """The loss `name` (pair or proxy) as a function of embeddings [B, D] and labels [B] (see above)."""
  if name in _PROXY_LOSSES:
    return functools.partial(_embedding_loss, _PROXY_LOSSES[name], True)
  if name in _PAIR_LOSSES:
    return functools.partial(_embedding_loss, _PAIR_LOSSES[name], False)
  raise KeyError(f"Unknown loss {name!r}; known losses: {', '.join(names() + proxy_names())}.")


__all__ = [
    "Pairs", "arcface", "binomial_deviance", "build_pairs", "build_proxy_pairs", "contrastive",
    "cosface", "get", "get_pair_loss", "get_proxy_loss", "lifted_structure", "loss_and_pair_weights",
    "multi_similarity",
    "multi_similarity_mining", "names", "norm_softmax", "ntxent", "pair_weights", "proxy_anchor",
    "proxy_names", "proxy_nca", "triplet", "weighted_pair_loss",
]
