"""Multi-similarity in the unified form: against a direct NumPy implementation, gradients against finite
differences in float64 inside jit, and W = dL/dS."""

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from mmsi_jax import losses
from mmsi_jax.models import l2_normalize

HPARAMS = dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1)


def ms_reference(x, labels, alpha, beta, base, epsilon):
  """MS loss of the batch against itself, one anchor at a time, as written in the paper (eqs. 4, 5)."""
  x = np.asarray(x, np.float64)
  sim = x @ x.T
  total = 0.0
  for i in range(len(x)):
    others = np.arange(len(x)) != i
    pos = sim[i][others & (labels == labels[i])]
    neg = sim[i][labels != labels[i]]
    if len(pos) == 0 or len(neg) == 0:
      continue
    mined_neg = neg[neg + epsilon > pos.min()]
    mined_pos = pos[pos - epsilon < neg.max()]
    if len(mined_neg) == 0 or len(mined_pos) == 0:
      continue
    total += np.log1p(np.sum(np.exp(-alpha * (mined_pos - base)))) / alpha
    total += np.log1p(np.sum(np.exp(beta * (mined_neg - base)))) / beta
  return total / len(x)


def random_batch(seed, batch=24, dim=8, num_classes=6):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, batch)
  labels[-1] = num_classes + 5  # A singleton class: an anchor with no positive.
  x = rng.normal(size=(batch, dim))
  return x / np.linalg.norm(x, axis=1, keepdims=True), labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hparams", [HPARAMS, dict(alpha=2.0, beta=40.0, base=0.5, epsilon=0.05)])
def test_multi_similarity_matches_numpy(seed, hparams):
  x, labels = random_batch(seed)
  expected = ms_reference(x, labels, **hparams)
  with jax.enable_x64(True):
    got = jax.jit(lambda e, l: losses.get("multi_similarity")(e, l, **hparams))(
        jnp.asarray(x), jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
  assert expected > 0


def test_multi_similarity_without_mining_uses_all_pairs():
  x, labels = random_batch(0)
  # With an epsilon larger than any similarity gap, mining keeps every pair.
  expected = ms_reference(x, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=10.0)
  got = losses.get("multi_similarity")(jnp.asarray(x, jnp.float32), jnp.asarray(labels),
                                       mine=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_multi_similarity_gradient_matches_finite_differences():
  x, labels = random_batch(3, batch=16, dim=6)
  loss_fn = losses.get("multi_similarity")
  with jax.enable_x64(True):
    raw = jnp.asarray(x * 1.3)
    f = jax.jit(lambda r: loss_fn(l2_normalize(r), jnp.asarray(labels), **HPARAMS))
    check_grads(f, (raw,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)
    # The mined set must not change under the perturbation for the check to be meaningful.
    assert float(f(raw)) > 0


def test_pair_weights_are_dloss_dsim_and_reproduce_the_gradient():
  x, labels = random_batch(4)
  loss_fn = losses.get_pair_loss("multi_similarity")
  with jax.enable_x64(True):
    e = jnp.asarray(x)
    pairs = losses.build_pairs(e, jnp.asarray(labels))
    weights = jax.jit(lambda p: losses.pair_weights(loss_fn, p, **HPARAMS))(pairs)
    value, same_weights = losses.loss_and_pair_weights(loss_fn, pairs, **HPARAMS)
    np.testing.assert_allclose(value, loss_fn(pairs.sim, pairs.pos, pairs.neg, **HPARAMS), rtol=1e-12)
    np.testing.assert_allclose(same_weights, weights, rtol=1e-12)
    # W against central finite differences of L in each entry of S.
    eps = 1e-6
    rng = np.random.default_rng(0)
    for i, j in zip(rng.integers(0, len(x), 40), rng.integers(0, len(x), 40)):
      bump = jnp.zeros_like(pairs.sim).at[i, j].set(eps)
      fd = (loss_fn(pairs.sim + bump, pairs.pos, pairs.neg, **HPARAMS)
            - loss_fn(pairs.sim - bump, pairs.pos, pairs.neg, **HPARAMS)) / (2 * eps)
      np.testing.assert_allclose(weights[i, j], fd, atol=1e-8)
    # Negatives push (W >= 0), positives pull (W <= 0), and no pair is both.
    assert np.all(np.asarray(weights)[np.asarray(pairs.pos)] <= 0)
    assert np.all(np.asarray(weights)[np.asarray(pairs.neg)] >= 0)

    # The weighted pair sum has the loss's gradient with respect to the embeddings.
    def weighted(emb):
      p = losses.build_pairs(emb, jnp.asarray(labels))
      return losses.weighted_pair_loss(p.sim, losses.pair_weights(loss_fn, p, **HPARAMS))

    direct = jax.grad(lambda emb: losses.get("multi_similarity")(emb, jnp.asarray(labels),
                                                                 **HPARAMS))(e)
    np.testing.assert_allclose(jax.jit(jax.grad(weighted))(e), direct, rtol=1e-9, atol=1e-12)


def test_degenerate_batches_give_finite_zero_loss_and_gradient():
  loss_fn = losses.get("multi_similarity")
  x, _ = random_batch(0, batch=8)
  e = jnp.asarray(x, jnp.float32)
  for labels in (np.arange(8), np.zeros(8, int)):  # No positives at all / no negatives at all.
    value, grad = jax.value_and_grad(lambda v: loss_fn(v, jnp.asarray(labels)))(e)
    assert value == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)
  # Every pair already far on the right side of the margin: nothing is mined.
  e = jnp.asarray(np.repeat(np.eye(4), 2, axis=0), jnp.float32)
  value, grad = jax.value_and_grad(lambda v: loss_fn(v, jnp.asarray(np.repeat(np.arange(4), 2))))(e)
  assert value == 0.0 and np.all(grad == 0)


def test_extra_references_and_validity_mask():
  x, labels = random_batch(1, batch=12)
  rng = np.random.default_rng(1)
  mem = rng.normal(size=(10, x.shape[1]))
  mem /= np.linalg.norm(mem, axis=1, keepdims=True)
  mem_labels = rng.integers(0, 6, 10)
  valid = np.arange(10) < 6
  loss_fn = losses.get("multi_similarity")
  with_invalid = loss_fn(jnp.asarray(x), jnp.asarray(labels), ref_embeddings=jnp.asarray(mem),
                         ref_labels=jnp.asarray(mem_labels), ref_valid=jnp.asarray(valid))
  garbage = mem.copy()
  garbage[~valid] = 0.5  # Contents of invalid rows must not matter.
  with_garbage = loss_fn(jnp.asarray(x), jnp.asarray(labels), ref_embeddings=jnp.asarray(garbage),
                         ref_labels=jnp.asarray(mem_labels), ref_valid=jnp.asarray(valid))
  only_valid = loss_fn(jnp.asarray(x), jnp.asarray(labels), ref_embeddings=jnp.asarray(mem[valid]),
                       ref_labels=jnp.asarray(mem_labels[valid]))
  np.testing.assert_allclose(with_invalid, only_valid, rtol=1e-6)
  np.testing.assert_allclose(with_garbage, only_valid, rtol=1e-6)
