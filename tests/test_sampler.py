"""PK and random samplers: determinism, resumability, class coverage and small classes."""

import numpy as np
import pytest

from mmsi_jax.data import sampler as sampler_lib
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


def test_random_batches_draw_images_uniformly_and_resume():
  labels = make_labels(num_classes=30)
  sampler = sampler_lib.build("random", labels, 8, 4, seed=2, held_out_fraction=0.2)
  assert isinstance(sampler, sampler_lib.RandomSampler) and sampler.batch_size == 32
  again = sampler_lib.build("random", labels, 8, 4, seed=2, held_out_fraction=0.2)
  batches = [sampler.batch_indices(step) for step in range(400)]
  for step in (0, 7, 399):
    np.testing.assert_array_equal(again.batch_indices(step), batches[step])
  assert all(len(np.unique(b)) == 32 for b in batches)  # Without replacement within a batch.
  # Not P x K: the number of images of a class in a batch varies, one included.
  per_class = [np.bincount(labels[b]) for b in batches]
  assert any(1 in counts for counts in per_class) and any(counts.max() > 4 for counts in per_class)
  # Every image outside the held-out share is drawn, about equally often; held-out images never.
  drawn = np.bincount(np.concatenate(batches), minlength=len(labels))
  held_out = np.setdiff1d(np.arange(len(labels)), sampler._images)
  assert len(held_out) > 0 and drawn[held_out].sum() == 0
  expected = 400 * 32 / len(sampler._images)
  assert np.all(np.abs(drawn[sampler._images] - expected) < 5 * np.sqrt(expected))
  with pytest.raises(ValueError, match="data.sampler='randon' is not one of"):
    sampler_lib.build("randon", labels, 8, 4, seed=0)
