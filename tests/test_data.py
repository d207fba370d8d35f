"""The built-in Glyphs dataset: TFDS/array_record round trip, splits, determinism, PK batches."""

import numpy as np
import pytest

from mmsi_jax.data import glyphs, pipeline, transforms
from mmsi_jax.data.sampler import PKSampler


def test_round_trip_gives_back_the_generated_images(glyphs_dir):
  train = pipeline.load_split("glyphs", "train", glyphs_dir)
  test = pipeline.load_split("glyphs", "test", glyphs_dir)
  half = glyphs.NUM_CLASSES // 2
  assert len(train) == len(test) == half * glyphs.IMAGES_PER_CLASS
  expected = list(glyphs.generate([0, half + 7], images_per_class=3))
  by_name = {}
  for source, class_ids in ((train, range(0, half)), (test, range(half, 2 * half))):
    for i in range(len(source)):
      record = source[i]
      by_name[record["file_name"]] = record
  for class_id, image_index, image in expected:
    record = by_name[f"glyph{class_id:03d}_{image_index:02d}.png".encode()]
    np.testing.assert_array_equal(record["image"], image)
    assert record["class_id"] == class_id
    assert record["label"] == class_id - (0 if class_id < half else half)


def test_splits_hold_disjoint_halves_of_the_classes(glyphs_dir):
  train = pipeline.load_split("glyphs", "train", glyphs_dir, decode_images=False)
  test = pipeline.load_split("glyphs", "test", glyphs_dir, decode_images=False)
  train_ids = {r["class_id"] for r in train}
  test_ids = {r["class_id"] for r in test}
  assert train_ids == set(range(100)) and test_ids == set(range(100, 200))
  for source in (train, test):
    labels = pipeline.split_labels(source)
    assert set(labels.tolist()) == set(range(100))
    assert np.all(np.bincount(labels) == glyphs.IMAGES_PER_CLASS)
  image = pipeline.decode_image(train[0]["image"])
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_generation_is_deterministic():
  first = [im for _, _, im in glyphs.generate([5, 6], images_per_class=4)]
  again = [im for _, _, im in glyphs.generate([5, 6], images_per_class=4)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], first[1])  # Images of one class differ.


def test_the_built_in_dataset_is_said_to_be_generated_not_downloaded(glyphs_build):
  data_dir, printed = glyphs_build
  assert printed.splitlines() == [
      f"Preparing dataset glyphs in {data_dir}, generated here, nothing downloaded (once; later runs "
      "reuse it).",
      f"Dataset glyphs ready in {data_dir}/glyphs/1.0.0 (train 2,400, test 2,400 images)."], printed


def test_prepare_is_idempotent_and_missing_data_is_a_clear_error(glyphs_dir, tmp_path):
  pipeline.prepare("glyphs", glyphs_dir)  # Already built: nothing to do.
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline.load_split("glyphs", "train", str(tmp_path))
  with pytest.raises(KeyError, match="known datasets"):
    pipeline.load_split("nope", "train", str(tmp_path))


def test_an_unfinished_build_is_not_read_as_finished(tmp_path):
  # TFDS builds into an "incomplete.*" directory and renames it only at the end.
  (tmp_path / "glyphs" / "incomplete.ABC_1.0.0").mkdir(parents=True)
  (tmp_path / "glyphs" / "incomplete.ABC_1.0.0" / "glyphs-train.array_record-00000-of-00001"
   ).write_bytes(b"partial")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline.load_split("glyphs", "train", str(tmp_path))


def test_train_batches_are_resumable_and_augmented_deterministically(glyphs_dir):
  source = pipeline.load_split("glyphs", "train", glyphs_dir, decode_images=False)
  sampler = PKSampler(pipeline.split_labels(source), 4, 3, seed=0)
  kwargs = dict(seed=0, transform=transforms.PadCrop(padding=2, flip=True), num_threads=2)
  full = list(pipeline.train_batches(source, sampler, start_step=0, num_steps=6, **kwargs))
  resumed = list(pipeline.train_batches(source, sampler, start_step=4, num_steps=6, **kwargs))
  assert len(full) == 6 and len(resumed) == 2
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  assert full[0]["images"].shape == (12, 32, 32, 3) and full[0]["images"].dtype == np.uint8
  np.testing.assert_array_equal(full[0]["labels"].reshape(4, 3), full[0]["labels"].reshape(4, 3)[:, :1]
                                .repeat(3, axis=1))


def test_eval_batches_cover_the_split_in_order(glyphs_dir):
  source = pipeline.load_split("glyphs", "test", glyphs_dir, decode_images=False)
  batches = list(pipeline.eval_batches(source, 1000))
  assert [b["mask"].sum() for b in batches] == [1000, 1000, 400]
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, pipeline.split_labels(source))
