"""Row reductions over masked entries of a [B, M] matrix, stable and NaN-free for empty rows.

Masked-out entries may hold anything (even inf): they never reach an exp, so their gradient is zero.
"""

import jax
import jax.numpy as jnp


def masked_logsumexp(logits: jax.Array, mask: jax.Array, *, plus_one: bool = False) -> jax.Array:
  """log(sum_j mask_ij exp(logits_ij)) per row [B]; with `plus_one`, log(1 + sum_j ...).

  An empty row gives 0: exact with `plus_one`, a placeholder otherwise (callers drop such rows).
  """
  row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1)
  floor = 0.0 if plus_one else -jnp.inf
  shift = jax.lax.stop_gradient(jnp.maximum(row_max, floor))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = jnp.sum(jnp.exp(jnp.where(mask, logits - shift[:, None], -jnp.inf)), axis=-1)
  if plus_one:
    total = total + jnp.exp(-shift)
  return jnp.log(jnp.where(total > 0, total, 1.0)) + jnp.where(total > 0, shift, 0.0)


def masked_log1p_sum_exp(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """log(1 + sum_j mask_ij exp(logits_ij)) per row [B]; 0 for an empty row."""
  return masked_logsumexp(logits, mask, plus_one=True)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over the entries where `mask` holds (any shape); 0 when there are none."""
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def masked_row_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of each row of `values` [B, M] over its masked entries [B]; 0 for an empty row."""
  return jnp.sum(jnp.where(mask, values, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def softmax_cross_entropy(logits: jax.Array, pos: jax.Array, candidates: jax.Array) -> jax.Array:
  """Cross-entropy of each row's positives against a softmax over its candidates, averaged.

    L = mean_{i active} [ log sum_{j in cand_i} exp(z_ij) - 1/|P_i| sum_{p in P_i} z_ip ]

  A row is active when it has a positive and a candidate; with no active row L = 0.

  Args:
    logits: [B, M] z. pos: [B, M] bool, the targets P_i. candidates: [B, M] bool, the softmax's support.
  """
  active = jnp.any(pos, axis=-1) & jnp.any(candidates, axis=-1)
  return masked_mean(masked_logsumexp(logits, candidates) - masked_row_mean(logits, pos), active)
