"""Datasets by name, prepared once with TFDS (array_record) and read with random access and grain.

  prepare(name, data_dir, manual_dir)    -> builds the dataset into data_dir unless already there
  load_split(name, split, data_dir)      -> random-access source of {"image", "label", ...}
  load_splits(config.data)               -> what a run trains and evaluates on: the training and test
                                            splits, or training and validation classes (Splits)
  train_batches(source, sampler, ...)    -> iterator of augmented PK batches, resumable at any step
  eval_batches(source, batch_size, ...)  -> iterator of padded, ordered batches of a whole split

TFDS writes a split into a temporary directory and renames it only when it is complete, so a build that
was killed half-way is never read as a finished one: the next `prepare` starts it again.

Train batches are prepared by `num_threads` threads of this process, or, with `num_workers` > 0, by that
many worker processes (grain's mp_prefetch), each with its own threads; the order of the batches does
not depend on either. Multi-host runs: host `host_index` of `host_count` prepares rows
[host_index * B / host_count, (host_index + 1) * B / host_count) of every global batch of B; every
example's augmentation depends only on (seed, step, its row in the global batch), so the hosts' slices
put together are exactly the batch that one host would prepare.
"""

import contextlib
import functools
import io
import logging
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from mmsi_jax.data import catalog
from mmsi_jax.data.sampler import EXTRA, ExtraBatch, PKSampler
from mmsi_jax.data.transforms import decode_image
from mmsi_jax.registry import Registry

DATASETS = Registry("dataset")
for _name in catalog.names():
  DATASETS.register(_name)(catalog.builder_class(_name))


def names() -> list[str]:
  return catalog.names()


def _builder(name: str, data_dir: str):
  return DATASETS.get(name)(data_dir=data_dir, file_format="array_record")


def prepare(name: str, data_dir: str, manual_dir: Optional[str] = None) -> dict:
  """Builds dataset `name` into `data_dir` (a no-op when it is already there).

  Returns {split: {"images": N, "corrupt": [file names skipped]}} of the prepared dataset.
  """
  with _tfds_quiet():
    builder = _builder(name, data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    check_archives = getattr(builder, "check_archives", None)
    if check_archives:
      check_archives(manual_dir)
    source = (f"from the archives in {manual_dir}" if check_archives
              else "generated here, nothing downloaded")
    print(f"Preparing dataset {name} in {data_dir}, {source} (once; later runs reuse it).",
          flush=True)
    with _tfds_quiet():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    builder = _builder(name, data_dir)
    sizes = ", ".join(f"{split} {info.num_examples:,}" for split, info in builder.info.splits.items())
    print(f"Dataset {name} ready in {builder.data_dir} ({sizes} images).", flush=True)
  metadata = builder.info.metadata or {}
  return {split: {"images": info.num_examples, "corrupt": list(metadata.get(f"{split}_corrupt", []))}
          for split, info in builder.info.splits.items()}


class _DropUnfinishedVariantWarning(logging.Filter):
  """TFDS warns of a dataset folder without dataset_info.json while it is being written."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _tfds_quiet():
  """TFDS's own progress lines (sized as a download, even for a generated dataset) left out; the
  caller reports what it builds. Errors still raise."""
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger("absl")
  warning_filter = _DropUnfinishedVariantWarning()
  absl_logger.addFilter(warning_filter)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.removeFilter(warning_filter)


class DecodedSource:
  """A random-access source whose "image" is decoded to [H, W, 3] uint8 RGB on access."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def _decoded(self, record: dict) -> dict:
    return {**record, "image": decode_image(record["image"])}

  def __getitem__(self, index: int) -> dict:
    return self._decoded(self._source[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decoded(r) for r in self._source.__getitems__(indices)]


def load_split(name: str, split: str, data_dir: str, *, decode_images: bool = True):
  """Random-access source of split `split`: examples with "image" (HWC uint8 RGB, or the encoded bytes
  when decode_images is False), "label" (int, 0-based within the split), "class_id" and "file_name"."""
  with _tfds_quiet():
    builder = _builder(name, data_dir)
    prepared = builder.is_prepared()
  if not prepared:
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared in {data_dir!r}: run `python -m mmsi_jax.data.prepare "
        f"--dataset={name} --data_dir={data_dir}` (the trainer does it on its first run).")
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return DecodedSource(source) if decode_images else source


class RelabeledSource:
  """The records `indices` of a random-access source (all of them by default), in that order, carrying
  the given labels [len(indices)] instead of their own."""

  def __init__(self, source, labels: np.ndarray, indices: Optional[np.ndarray] = None):
    self._source = source
    self.labels = labels
    self._indices = np.arange(len(source)) if indices is None else np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict:
    return {**self._source[int(self._indices[index])], "label": int(self.labels[index])}

  def __getitems__(self, indices) -> list[dict]:
    records = self._source.__getitems__(self._indices[np.asarray(indices, np.int64)].tolist())
    return [{**record, "label": int(self.labels[i])} for i, record in zip(indices, records)]


def shuffled_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Label noise (config data.label_noise): `labels` [N] with those of round(fraction * N) examples,
  chosen at random, permuted among them (both draws from `seed`, so every run with this seed has the
  same noise); an example may keep its class by chance, as in any shuffle."""
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
  noisy = np.array(labels, copy=True)
  noisy[chosen] = noisy[rng.permutation(chosen)]
  return noisy


def split_labels(source) -> np.ndarray:
  """Labels [N] of every example of a source read with decode_images=False (no image is decoded)."""
  return np.array([record["label"] for record in source], np.int64)


class Splits(NamedTuple):
  """What a run trains and evaluates on (`load_splits`); images encoded (decode_images=False)."""
  train: Any  # The training images, labelled 0 .. C - 1.
  train_labels: np.ndarray  # [N] their labels.
  evaluation: Any  # The images evaluated, each query against all the others.
  prefix: str  # "test" or "validation": the evaluation's metrics are "<prefix>/<metric>".
  name: str  # The images evaluated, in words: "glyphs/test", or the validation classes.


def validation_fold(classes: np.ndarray, folds: int, fold: int) -> np.ndarray:
  """The classes of fold `fold` (0-based) of `folds`: the distinct `classes`, sorted, cut into `folds`
  contiguous runs of near-equal size (np.array_split), as the DML splits cut a dataset's classes (CUB:
  the first 100 train, the rest test). The k class-disjoint folds of the training classes are the
  Reality Check's (Musgrave et al., ECCV 2020: k = 4); 2 folds, one of them used, its half-and-half
  split."""
  return np.array_split(np.unique(classes), folds)[fold]


def load_splits(data) -> Splits:
  """The splits a run with config `data` (config.data) trains and evaluates on.

  data.validation.folds = 0: the training split, and the test split evaluated. Otherwise the training
  split's classes are cut into data.validation.folds folds (`validation_fold`): the classes of fold
  data.validation.fold are evaluated, the other classes trained on (relabelled 0 .. C - 1 in the order
  of their labels), and the test split is never opened.
  """
  train = load_split(data.name, data.train_split, data.data_dir, decode_images=False)
  labels = split_labels(train)
  folds, fold = data.validation.folds, data.validation.fold
  if not folds:
    test = load_split(data.name, data.test_split, data.data_dir, decode_images=False)
    return Splits(train, labels, test, "test", f"{data.name}/{data.test_split}")
  held_out = validation_fold(labels, folds, fold)
  is_held_out = np.isin(labels, held_out)
  kept, evaluated = np.flatnonzero(~is_held_out), np.flatnonzero(is_held_out)
  train_labels = np.searchsorted(np.unique(labels[kept]), labels[kept])
  return Splits(
      RelabeledSource(train, train_labels, kept), train_labels,
      RelabeledSource(train, labels[evaluated], evaluated), "validation",
      f"{data.name}/{data.train_split} fold {fold + 1}/{folds} ({len(held_out)} classes)")


def host_rows(batch_size: int, host_index: int, host_count: int) -> range:
  """The rows of a global batch that host `host_index` of `host_count` prepares."""
  if batch_size % host_count:
    raise ValueError(f"The batch size {batch_size} is not divisible by the {host_count} hosts: "
                     f"change data.classes_per_batch or data.samples_per_class.")
  per_host = batch_size // host_count
  return range(host_index * per_host, (host_index + 1) * per_host)


def _load(source, indices: np.ndarray, rows: range, transform: Callable, seed: int, step: int):
  """Transformed images and labels of `indices`; row r's augmentation is seeded by (seed, step, r)."""
  records = source.__getitems__(indices.tolist())
  images = np.stack([transform(r["image"], np.random.default_rng([seed, step, row]))
                     for row, r in zip(rows, records)])
  return images, np.array([r["label"] for r in records], np.int32)


def _pk_batch(step: int, *, source, sampler: PKSampler, transform: Callable, seed: int,
              rows: range, extra_batches: Sequence[ExtraBatch]) -> dict:
  indices = sampler.batch_indices(step)[rows.start:rows.stop]
  images, labels = _load(source, indices, rows, transform, seed, step)
  batch = {"images": images, "labels": labels}
  first_row = sampler.batch_size  # Extra batches are whole on every host; their rows follow the batch.
  for stream, request in enumerate(extra_batches):
    extra_rows = range(first_row, first_row + request.num_classes)
    extra_images, extra_labels = _load(
        source, sampler.extra_indices(step, request.num_classes, stream), extra_rows, transform,
        seed, step)
    batch.setdefault(EXTRA, {})[request.name] = {"images": extra_images, "labels": extra_labels}
    first_row = extra_rows.stop
  return batch


def train_batches(source, sampler: PKSampler, *, transform: Callable, start_step: int,
                  num_steps: int, seed: int, extra_batches: Sequence[ExtraBatch] = (),
                  num_threads: int = 4, num_workers: int = 0, prefetch: int = 8,
                  host_index: int = 0, host_count: int = 1) -> Iterator[dict]:
  """This host's part of the batches for steps start_step .. num_steps - 1:
  {"images": [B / host_count, H, W, 3] uint8, "labels": [B / host_count] int32}, and, when components
  asked for extra batches, each of them whole under batch[EXTRA][name] = {"images": [V, ...], "labels"}.

  Every batch (indices and augmentation) is a pure function of (seed, step). `source` holds encoded
  images (load_split(..., decode_images=False)); `transform(encoded, rng)` -> [H, W, 3] uint8.
  """
  load = functools.partial(_pk_batch, source=source, sampler=sampler, transform=transform, seed=seed,
                           rows=host_rows(sampler.batch_size, host_index, host_count),
                           extra_batches=tuple(extra_batches))
  dataset = grain.MapDataset.range(start_step, num_steps).map(load).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Outside an absl app (tests, notebooks): grain reads its flags.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch // num_workers, 1)))
  return iter(dataset)


def _padded_batch(records: list, batch_size: int, transform: Callable) -> dict:
  images = np.stack([transform(r["image"]) for r in records])
  labels = np.array([r["label"] for r in records], np.int32)
  pad = batch_size - len(records)
  return {
      "images": np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
      "labels": np.pad(labels, (0, pad)),
      "mask": np.arange(batch_size) < len(records),
  }


def eval_batches(source, batch_size: int, transform: Callable = decode_image,
                 num_threads: int = 4) -> Iterator[dict]:
  """The whole split in order, in batches of fixed shape; "mask" [B] marks the real rows.

  `source` holds encoded images; `transform(encoded)` -> [H, W, 3] uint8 (the test transform).
  """
  batch = functools.partial(_padded_batch, batch_size=batch_size, transform=transform)
  dataset = grain.MapDataset.source(source).batch(batch_size, batch_fn=batch)
  return iter(dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)))
