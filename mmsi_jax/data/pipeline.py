"""Datasets by name, prepared once with TFDS (array_record) and read with `tfds.data_source` and grain.

  prepare(name, data_dir)                -> builds the dataset into data_dir unless already there
  load_split(name, split, data_dir)      -> random-access source of {"image", "label", ...}
  train_batches(source, sampler, ...)    -> iterator of augmented PK batches, resumable at any step
  eval_batches(source, batch_size)       -> iterator of padded, ordered batches of a whole split

TFDS writes a split into a temporary directory and renames it only when it is complete, so a build that
was killed half-way is never read as a finished one: the next `prepare` starts it again.
"""

import functools
import io
from typing import Iterator, Optional

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmsi_jax.data import glyphs
from mmsi_jax.data.sampler import PKSampler

_BUILDERS = {
    "glyphs": glyphs.Glyphs,
}


def names() -> list[str]:
  return sorted(_BUILDERS)


def _builder(name: str, data_dir: str):
  if name not in _BUILDERS:
    raise KeyError(f"Unknown dataset {name!r}; known datasets: {', '.join(names())}.")
  return _BUILDERS[name](data_dir=data_dir, file_format="array_record")


def prepare(name: str, data_dir: str, manual_dir: Optional[str] = None) -> None:
  """Builds dataset `name` into `data_dir` (a no-op when it is already there)."""
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return
  print(f"Preparing dataset {name} in {data_dir} (once; later runs reuse it).", flush=True)
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def load_split(name: str, split: str, data_dir: str, *, decode_images: bool = True):
  """Random-access source of split `split`: examples with "image" (HWC uint8, or the encoded bytes when
  decode_images is False) and "label" (int, 0-based within the split)."""
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared in {data_dir!r}: run mmsi_jax.data.pipeline.prepare "
        f"(the trainer does it on its first run).")
  decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
  return tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders, download=False)


def split_labels(source) -> np.ndarray:
  """Labels [N] of every example of a source read with decode_images=False (no image is decoded)."""
  return np.array([record["label"] for record in source], np.int64)


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> [H, W, 3] uint8 RGB."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def augment(image: np.ndarray, rng: np.random.Generator, *, crop_padding: int,
            flip: bool) -> np.ndarray:
  """Random translation (reflect-pad by crop_padding, crop back) and optional horizontal flip."""
  if crop_padding:
    height, width = image.shape[:2]
    padded = np.pad(image, ((crop_padding,) * 2, (crop_padding,) * 2, (0, 0)), mode="reflect")
    top, left = rng.integers(0, 2 * crop_padding + 1, 2)
    image = padded[top:top + height, left:left + width]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def _load(source, indices: np.ndarray, rng: np.random.Generator, **augment_kwargs):
  records = source.__getitems__(indices.tolist())
  images = np.stack([augment(decode_image(r["image"]), rng, **augment_kwargs) for r in records])
  return images, np.array([r["label"] for r in records], np.int32)


def _pk_batch(step: int, *, source, sampler: PKSampler, seed: int, validation_classes: int,
              **augment_kwargs) -> dict:
  rng = np.random.default_rng([seed, step, 1])
  images, labels = _load(source, sampler.batch_indices(step), rng, **augment_kwargs)
  batch = {"images": images, "labels": labels}
  if validation_classes:
    batch["val_images"], batch["val_labels"] = _load(
        source, sampler.validation_indices(step, validation_classes), rng, **augment_kwargs)
  return batch


def train_batches(source, sampler: PKSampler, *, start_step: int, num_steps: int, seed: int,
                  crop_padding: int = 0, flip: bool = False, validation_classes: int = 0,
                  num_threads: int = 4, prefetch: int = 8) -> Iterator[dict]:
  """Batches for steps start_step .. num_steps - 1: {"images": [B, H, W, 3] uint8, "labels": [B]},
  and with validation_classes = V > 0 also a validation batch {"val_images": [V, ...], "val_labels"}.

  Every batch (indices and augmentation) is a pure function of (seed, step), prepared by a pool of
  `num_threads` reader threads.
  """
  load = functools.partial(_pk_batch, source=source, sampler=sampler, seed=seed,
                           validation_classes=validation_classes, crop_padding=crop_padding,
                           flip=flip)
  dataset = grain.MapDataset.range(start_step, num_steps).map(load)
  return iter(dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def _padded_batch(records: list, batch_size: int) -> dict:
  images = np.stack([decode_image(r["image"]) for r in records])
  labels = np.array([r["label"] for r in records], np.int32)
  pad = batch_size - len(records)
  return {
      "images": np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
      "labels": np.pad(labels, (0, pad)),
      "mask": np.arange(batch_size) < len(records),
  }


def eval_batches(source, batch_size: int, num_threads: int = 2) -> Iterator[dict]:
  """The whole split in order, in batches of fixed shape; "mask" [B] marks the real rows."""
  dataset = grain.MapDataset.source(source).batch(
      batch_size, batch_fn=functools.partial(_padded_batch, batch_size=batch_size))
  return iter(dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)))
