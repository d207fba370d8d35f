"""The input pipeline on a fake CUB-200-2011: PK train batches (threads, worker processes, per-host
slices), test batches, and the PK sampler at SOP scale."""

import numpy as np
import pytest

from mmsi_jax.data import pipeline, transforms
from mmsi_jax.data.sampler import ExtraBatch, PKSampler
from tests import fake_archives


@pytest.fixture(scope="module")
def cub_train(tmp_path_factory):
  manual_dir = str(tmp_path_factory.mktemp("cub_manual"))
  data_dir = str(tmp_path_factory.mktemp("cub_tfds"))
  fake_archives.make_cub200(manual_dir)
  pipeline.prepare("cub200", data_dir, manual_dir)
  source = pipeline.load_split("cub200", "train", data_dir, decode_images=False)
  return source, PKSampler(pipeline.split_labels(source), 2, 2, seed=3)


def batches(source, sampler, **kwargs):
  return list(pipeline.train_batches(source, sampler, transform=transforms.RandomResizedCrop(24),
                                     start_step=0, num_steps=3, seed=7, num_threads=2, **kwargs))


def test_train_batches_are_pk_batches_of_augmented_crops(cub_train):
  source, sampler = cub_train
  result = batches(source, sampler)
  assert len(result) == 3
  for batch in result:
    assert batch["images"].shape == (4, 24, 24, 3) and batch["images"].dtype == np.uint8
    assert sorted(np.unique(batch["labels"], return_counts=True)[1]) == [2, 2]


def test_host_slices_put_together_are_the_single_host_batch(cub_train):
  source, sampler = cub_train
  whole = batches(source, sampler)
  slices = [batches(source, sampler, host_index=h, host_count=2) for h in range(2)]
  for step, batch in enumerate(whole):
    for key in ("images", "labels"):
      np.testing.assert_array_equal(
          np.concatenate([slices[0][step][key], slices[1][step][key]]), batch[key])
  with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
    batches(source, sampler, host_index=0, host_count=3)


def test_extra_batches_are_whole_on_every_host(cub_train):
  """What a component asks for besides the PK batch (MMSI: a validation batch), served by name."""
  source, sampler = cub_train
  requests = (ExtraBatch("validation", 2), ExtraBatch("other", 2))
  whole = batches(source, sampler, extra_batches=requests)
  slices = [batches(source, sampler, extra_batches=requests, host_index=h, host_count=2)
            for h in range(2)]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(batch["images"], batches(source, sampler)[step]["images"])
    assert sorted(batch[pipeline.EXTRA]) == ["other", "validation"]
    for name in ("validation", "other"):
      extra = batch[pipeline.EXTRA][name]
      assert extra["images"].shape == (2, 24, 24, 3) and sorted(extra["labels"]) == [0, 1]
      for host_slice in slices:
        for key in ("images", "labels"):
          np.testing.assert_array_equal(host_slice[step][pipeline.EXTRA][name][key], extra[key])
  # Each request draws its own images: augmented from its own rows of the global batch.
  first = whole[0][pipeline.EXTRA]
  assert not np.array_equal(first["validation"]["images"], first["other"]["images"])


def test_worker_processes_give_the_same_batches(cub_train):
  source, sampler = cub_train
  threaded = batches(source, sampler)
  in_workers = batches(source, sampler, num_workers=2)
  for a, b in zip(threaded, in_workers, strict=True):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_eval_batches_apply_the_test_transform_and_mask_the_padding(cub_train):
  source, _ = cub_train
  result = list(pipeline.eval_batches(source, 4, transforms.ResizeCenterCrop(32, 24)))
  assert [b["mask"].sum() for b in result] == [4, 2]  # The 6 train images.
  assert all(b["images"].shape == (4, 24, 24, 3) for b in result)


def test_pk_sampler_at_sop_scale():
  rng = np.random.default_rng(0)
  counts = rng.integers(2, 13, 11_318)  # 11,318 classes of 2 to 12 images, as SOP's train split.
  labels = rng.permutation(np.repeat(np.arange(11_318), counts))
  sampler = PKSampler(labels, classes_per_batch=16, samples_per_class=5, seed=0)
  for step in range(50):
    indices = sampler.batch_indices(step)
    batch_labels = labels[indices].reshape(16, 5)
    assert (batch_labels == batch_labels[:, :1]).all()  # Class-major: K images of one class each.
    assert len(np.unique(batch_labels[:, 0])) == 16
