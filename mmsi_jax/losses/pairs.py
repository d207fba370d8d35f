"""The unified pair/triplet form (docs/ARCHITECTURE.md).

Every pair or triplet loss here is a function `loss(S, pos, neg, **hparams) -> scalar` of the cosine
similarity matrix S [B, M] between B anchors and M references and of two boolean masks [B, M]:
`pos` (same label, not the same sample, reference slot valid) and `neg` (different label, slot valid).
Because parameters reach the loss only through S,

    dL/dtheta = sum_ij W_ij dS_ij/dtheta,    W_ij = dL/dS_ij,

so a miner that re-weights pairs multiplies W by m [B, M] >= 0 and trains on
L_m = sum_ij m_ij * stop_gradient(W_ij) * S_ij (`weighted_pair_loss`).

The reference set is the batch itself (the anchor's own column excluded), optionally followed by extra
reference rows such as a memory of past embeddings, each with a validity flag (`build_pairs`).

Proxy losses use the same form with other rows and columns (`build_proxy_pairs`): the rows are samples
(the batch, then valid extra rows), the columns are C learnable class proxies, `pos` marks each sample's
own class and `neg` the other classes. So `pair_weights` and `weighted_pair_loss` serve them as well.
"""

import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mmsi_jax.models import l2_normalize

PairLossFn = Callable[..., jax.Array]


class Pairs(NamedTuple):
  """Similarities and masks of B anchors against M references (or N samples against C proxies).

  Attributes:
    sim: [B, M] cosine similarities (embeddings are L2-normalised).
    pos: [B, M] bool, same label, different sample, valid reference.
    neg: [B, M] bool, different label, valid reference.
  """
  sim: jax.Array
  pos: jax.Array
  neg: jax.Array

  def replace(self, **changes) -> "Pairs":
    """These pairs with some fields changed (as ClassBlocks.replace)."""
    return self._replace(**changes)


def build_pairs(embeddings: jax.Array, labels: jax.Array, *,
                ref_embeddings: Optional[jax.Array] = None,
                ref_labels: Optional[jax.Array] = None,
                ref_valid: Optional[jax.Array] = None) -> Pairs:
  """Pairs of a batch against itself and, optionally, against extra references.

  Args:
    embeddings: [B, D] anchors (L2-normalised).
    labels: [B] int class labels.
    ref_embeddings: [R, D] optional extra references (e.g. a memory), appended after the batch.
    ref_labels: [R] their labels; required with `ref_embeddings`.
    ref_valid: [R] bool, which extra rows hold data (an unfilled memory slot is invalid).

  Returns:
    Pairs with M = B (+ R): column j < B is batch sample j, column B + r is reference r.
  """
  batch_size = embeddings.shape[0]
  refs, all_labels, valid = append_extra_rows(embeddings, labels, ref_embeddings, ref_labels,
                                               ref_valid)
  num_refs = refs.shape[0]
  sim = embeddings @ refs.T
  not_self = jnp.arange(num_refs)[None, :] != jnp.arange(batch_size)[:, None]
  same = labels[:, None] == all_labels[None, :]
  pos = same & not_self & valid[None, :]
  neg = ~same & valid[None, :]
  return Pairs(sim, pos, neg)


def build_proxy_pairs(embeddings: jax.Array, labels: jax.Array, proxies: jax.Array, *,
                      ref_embeddings: Optional[jax.Array] = None,
                      ref_labels: Optional[jax.Array] = None,
                      ref_valid: Optional[jax.Array] = None) -> Pairs:
  """Samples against class proxies: the batch and, optionally, extra samples such as a memory.

  Args:
    embeddings: [B, D] samples (L2-normalised).
    labels: [B] int class labels in [0, C).
    proxies: [C, D] class proxies, any norm (they are L2-normalised here).
    ref_embeddings, ref_labels, ref_valid: [R, D], [R], [R] optional extra samples, their labels and
      which of them hold data; an invalid row has no pair.

  Returns:
    Pairs [N, C] with N = B (+ R): pos is the sample's own class, neg every other class.
  """
  samples, all_labels, valid = append_extra_rows(embeddings, labels, ref_embeddings, ref_labels,
                                                  ref_valid)
  sim = samples @ l2_normalize(proxies.astype(samples.dtype)).T
  own_class = all_labels[:, None] == jnp.arange(proxies.shape[0])[None, :]
  return Pairs(sim, own_class & valid[:, None], ~own_class & valid[:, None])

def append_extra_rows(embeddings, labels, ref_embeddings=None, ref_labels=None, ref_valid=None):
  """The batch followed by the extra rows: embeddings [B + R, D], labels [B + R], validity [B + R]."""
  valid = jnp.ones(labels.shape, bool)
  if ref_embeddings is None:
    return embeddings, labels, valid
  if ref_labels is None:
    raise ValueError("ref_labels is required when ref_embeddings is given.")
  if ref_valid is None:
    ref_valid = jnp.ones(ref_labels.shape, bool)
  return (jnp.concatenate([embeddings, ref_embeddings.astype(embeddings.dtype)], axis=0),
          jnp.concatenate([labels, ref_labels.astype(labels.dtype)], axis=0),
          jnp.concatenate([valid, ref_valid.astype(bool)], axis=0))


def loss_and_pair_weights(loss_fn: PairLossFn, pairs: Pairs, **hparams) -> tuple[jax.Array, jax.Array]:
  """(L, W = dL/dS [B, M]) of a pair loss, from one evaluation of the loss."""
  return jax.value_and_grad(lambda sim: loss_fn(sim, pairs.pos, pairs.neg, **hparams))(pairs.sim)


def pair_weights(loss_fn: PairLossFn, pairs: Pairs, **hparams) -> jax.Array:
  """W = dL/dS [B, M] of a pair loss: sign says push (+) or pull (-), size says how hard."""
  return loss_and_pair_weights(loss_fn, pairs, **hparams)[1]


def weighted_pair_loss(sim: jax.Array, weights: jax.Array,
                       multipliers: Optional[jax.Array] = None) -> jax.Array:
  """L_m = sum_ij m_ij * stop_gradient(W_ij) * S_ij: its gradient is the loss's, re-weighted by m.

  Args:
    sim: [B, M] similarities, differentiable.
    weights: [B, M] pair weights W = dL/dS (held constant).
    multipliers: [B, M] per-pair multipliers m >= 0 (differentiable: MMSI differentiates through them);
      None means m = 1, which reproduces the loss's own gradient.
  """
  weights = jax.lax.stop_gradient(weights)
  if multipliers is not None:
    weights = multipliers * weights
  return jnp.sum(weights * sim)


MULTIPLIERS = "multipliers"  # The argument of a pair loss that takes per-pair multipliers inside it.


def takes_multipliers(loss_fn: Callable) -> bool:
  """Whether `loss_fn` can place per-pair multipliers inside itself (a `multipliers` argument, as
  multi_similarity's m S in its exponents) rather than only on its pair gradients."""
  return callable(loss_fn) and MULTIPLIERS in inspect.signature(loss_fn).parameters


def pair_loss_on(loss_fn: Callable, pairs: Pairs, hparams: dict,
                 multipliers: Optional[jax.Array] = None) -> jax.Array:
  """loss_fn over `pairs`, with per-pair `multipliers` [B, M] passed inside it when given (the loss
  must take them: `takes_multipliers`)."""
  if multipliers is None:
    return loss_fn(pairs.sim, pairs.pos, pairs.neg, **hparams)
  return loss_fn(pairs.sim, pairs.pos, pairs.neg, **{MULTIPLIERS: multipliers}, **hparams)
