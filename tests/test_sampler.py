"""PK sampler: determinism, resumability, class coverage and small classes."""

import numpy as np
import pytest

from mmsi_jax.data.sampler import PKSampler


def make_labels(seed=0, num_classes=30):
  rng = np.random.default_rng(seed)
  return np.repeat(np.arange(num_classes), rng.integers(5, 12, num_classes))


def test_batches_are_pure_functions_of_seed_and_step():
  labels = make_labels()
  a = PKSampler(labels, 8, 4, seed=3)
  b = PKSampler(labels, 8, 4, seed=3)
  # Same batches whatever the order of requests: a resumed run draws what an uninterrupted one did.
  forward = [a.batch_indices(s) for s in range(50)]
  backward = [b.batch_indices(s) for s in reversed(range(50))][::-1]
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(PKSampler(labels, 8, 4, seed=4).batch_indices(0), forward[0])


def test_batch_shape_and_pk_structure():
  labels = make_labels()
  sampler = PKSampler(labels, 8, 4, seed=0)
  for step in range(20):
    indices = sampler.batch_indices(step)
    assert indices.shape == (32,) and sampler.batch_size == 32
    batch_labels = labels[indices].reshape(8, 4)
    assert np.all(batch_labels == batch_labels[:, :1])  # K images of one class, adjacent.
    assert len(np.unique(batch_labels[:, 0])) == 8  # P distinct classes.
    assert len(np.unique(indices)) == 32  # Every class has >= K images: no repeats.


def test_every_class_is_drawn_about_equally():
  labels = make_labels(num_classes=30)
  sampler = PKSampler(labels, 6, 2, seed=1)
  counts = np.bincount(np.concatenate([labels[sampler.batch_indices(s)][::2] for s in range(500)]),
                       minlength=30)
  assert counts.min() > 0
  expected = 500 * 6 / 30
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_small_classes_draw_with_replacement_and_singletons_are_skipped():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 1 + [3] * 8 + [4] * 9)
  sampler = PKSampler(labels, 4, 5, seed=0)
  assert 2 not in sampler.classes
  seen = set()
  for step in range(30):
    batch = labels[sampler.batch_indices(step)]
    assert 2 not in batch
    seen.update(batch.tolist())
  assert seen == {0, 1, 3, 4}


def test_too_few_classes_is_a_clear_error():
  with pytest.raises(ValueError, match="lower data.classes_per_batch"):
    PKSampler(np.array([0, 0, 1, 1, 2]), 3, 2, seed=0)
  with pytest.raises(ValueError, match="K >= 2"):
    PKSampler(np.array([0, 0, 1, 1]), 2, 1, seed=0)
