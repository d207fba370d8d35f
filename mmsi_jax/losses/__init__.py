"""Metric-learning losses, found by name.

Every loss is a function `loss(S, pos, neg, **hparams) -> scalar` of a similarity matrix and two masks
(the unified form, `pairs`), with its hyperparameters keyword-only. Two registries differ in what the
columns of S are:

- pair losses (`PAIR_LOSSES`, `names()`): the references are the batch itself and optional extra rows
  such as a memory (`build_pairs`).
- proxy losses (`PROXY_LOSSES`, `proxy_names()`): the columns are C learnable class proxies and the rows
  the samples (`build_proxy_pairs`).

The trainer runs either kind; which columns S has is the choice of the references component
(mmsi_jax/references, docs/ARCHITECTURE.md).

`get(name)` serves both tables with one embedding-level call,

    loss(embeddings [B, D], labels [B], *, ref_embeddings=None [R, D], ref_labels=None [R],
         ref_valid=None [R], proxies=None [C, D], **hparams) -> scalar,

where `proxies` is required by the proxy losses and refused by the pair losses; extra rows are extra
references for a pair loss and extra samples for a proxy loss. A proxy loss also takes `class_block=b`:
b classes at a time, S [N, C] never whole (class_blocks.py).
"""

import functools
from typing import Optional

import jax

from mmsi_jax.losses.binomial_deviance import binomial_deviance
from mmsi_jax.losses.class_blocks import ClassBlocks, ClassGroups, blocked_loss, class_spec
from mmsi_jax.losses.contrastive import contrastive
from mmsi_jax.losses.distance_contrastive import distance_contrastive
from mmsi_jax.losses.lifted_structure import lifted_structure
from mmsi_jax.losses.multi_similarity import multi_similarity, multi_similarity_mining
from mmsi_jax.losses.ntxent import ntxent
from mmsi_jax.losses.pairs import (Pairs, append_extra_rows, build_pairs, build_proxy_pairs,
                                   loss_and_pair_weights,
                                   pair_loss_on, pair_weights, takes_multipliers,
                                   weighted_pair_loss)
from mmsi_jax.losses.proxies import arcface, cosface, norm_softmax, proxy_anchor, proxy_nca
from mmsi_jax.losses.smart_mining import global_loss, ratio_triplet, ratio_triplet_global
from mmsi_jax.losses.triplet import triplet
from mmsi_jax.registry import Registry

PAIR_LOSSES = Registry("pair loss")
for _name, _loss in {
    "binomial_deviance": binomial_deviance,
    "contrastive": contrastive,
    "distance_contrastive": distance_contrastive,
    "lifted_structure": lifted_structure,
    "multi_similarity": multi_similarity,
    "ntxent": ntxent,
    "triplet": triplet,
    "ratio_triplet": ratio_triplet,
    "global_loss": global_loss,
    "ratio_triplet_global": ratio_triplet_global,
}.items():
  PAIR_LOSSES.register(_name)(_loss)

PROXY_LOSSES = Registry("proxy loss")
for _name, _loss in {
    "arcface": arcface,
    "cosface": cosface,
    "norm_softmax": norm_softmax,
    "proxy_anchor": proxy_anchor,
    "proxy_nca": proxy_nca,
}.items():
  PROXY_LOSSES.register(_name)(_loss)


def names() -> list[str]:
  """The pair losses: the batch (and memory) as references."""
  return PAIR_LOSSES.names()


def proxy_names() -> list[str]:
  """The proxy losses: class proxies as references."""
  return PROXY_LOSSES.names()


def is_proxy_loss(name: str) -> bool:
  return name in PROXY_LOSSES


def get_pair_loss(name: str):
  """The pair loss `name` as a function of (S [B, M], pos [B, M], neg [B, M], **hparams)."""
  return PAIR_LOSSES.get(name)


def get_proxy_loss(name: str):
  """The proxy loss `name` as a function of (S [N, C], pos [N, C], neg [N, C], **hparams)."""
  return PROXY_LOSSES.get(name)


def registry_of(name: str) -> Registry:
  """The registry (pair or proxy losses) that holds loss `name`."""
  if name in PROXY_LOSSES:
    return PROXY_LOSSES
  if name in PAIR_LOSSES:
    return PAIR_LOSSES
  raise KeyError(f"Unknown loss {name!r}; known losses: {', '.join(names() + proxy_names())}.")


def _embedding_loss(loss_fn, uses_proxies: bool, embeddings: jax.Array, labels: jax.Array, *,
                    ref_embeddings: Optional[jax.Array] = None,
                    ref_labels: Optional[jax.Array] = None,
                    ref_valid: Optional[jax.Array] = None,
                    proxies: Optional[jax.Array] = None, class_block: int = 0,
                    **hparams) -> jax.Array:
  extra_rows = dict(ref_embeddings=ref_embeddings, ref_labels=ref_labels, ref_valid=ref_valid)
  if uses_proxies:
    if proxies is None:
      raise ValueError("This proxy loss needs proxies=[C, D].")
    if class_block:
      rows, row_labels, row_valid = append_extra_rows(embeddings, labels, **extra_rows)
      return blocked_loss(loss_fn, ClassBlocks((rows, proxies), row_labels, row_valid,
                                               block=class_block), hparams)[0]
    pairs = build_proxy_pairs(embeddings, labels, proxies, **extra_rows)
  else:
    if proxies is not None or class_block:
      raise ValueError("A pair loss takes no proxies and no class_block.")
    pairs = build_pairs(embeddings, labels, **extra_rows)
  return loss_fn(pairs.sim, pairs.pos, pairs.neg, **hparams)


def get(name: str):
  """The loss `name` (pair or proxy) as a function of embeddings [B, D] and labels [B] (see above)."""
  return functools.partial(_embedding_loss, registry_of(name).get(name), is_proxy_loss(name))


__all__ = [
    "ClassBlocks", "ClassGroups", "Pairs", "arcface", "blocked_loss", "binomial_deviance", "build_pairs",
    "build_proxy_pairs", "class_spec", "contrastive", "cosface", "distance_contrastive", "get", "get_pair_loss", "get_proxy_loss", "is_proxy_loss",
    "lifted_structure", "loss_and_pair_weights", "multi_similarity", "multi_similarity_mining", "names",
    "norm_softmax", "ntxent", "pair_loss_on", "pair_weights", "proxy_anchor", "proxy_names",
    "proxy_nca", "registry_of", "takes_multipliers", "triplet", "weighted_pair_loss", "PAIR_LOSSES",
    "PROXY_LOSSES", "global_loss", "ratio_triplet", "ratio_triplet_global",
]
