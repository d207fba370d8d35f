"""Embeddings of images by a trained model, as an index for mmsi_jax.search:

    python -m mmsi_jax.embed --workdir=runs/demo --images=DIR_OR_DATASET_SPLIT --out=index.npz

--workdir is a run's workdir (its latest finished checkpoint) or an exported model (.npz,
python -m mmsi_jax.export). --images is
  - a directory: every image file under it (by suffix: .jpg, .png, ...), sorted by path; when every
    image lies in a subdirectory of it, the subdirectory is its class (labels, and their names in
    "classes");
  - or a prepared dataset split NAME/SPLIT (e.g. glyphs/test, cub200/test), read from --data_dir
    (default: the run's data.data_dir), with the dataset's labels.
Images are preprocessed as the run's evaluation preprocesses them (inference.py).

The index (.npz, read with allow_pickle=False) holds
  ids      [N] str       the image's path under the directory, or the dataset's file name
  vectors  [N, D] float32  L2-normalised embeddings
  labels   [N] int64     where known
  classes  [C] str       the class names of the labels, for a directory of class subdirectories
  model    str           the model's path (search embeds its queries with it)
  images   str           "dir:<absolute path>" or "dataset:<NAME/SPLIT>", and data_dir: where the
                         images are, for search's figure
"""

import argparse
import os
import sys
from typing import Optional

import numpy as np

from mmsi_jax import inference

DIR_PREFIX, DATASET_PREFIX = "dir:", "dataset:"


class ImageSet:
  """Images to embed or draw: ids [N], labels [N] or None, class names or None, and each image's
  encoded bytes (`encoded(i)`), from a directory or a prepared dataset split (module docstring)."""

  def __init__(self, spec: str, data_dir: str):
    self.data_dir = data_dir
    self.classes: Optional[np.ndarray] = None
    if os.path.isdir(spec):
      self.root = os.path.abspath(spec)
      self.location = DIR_PREFIX + self.root
      self.paths = inference.image_files(self.root)
      if not self.paths:
        raise ValueError(f"--images={spec}: no image files under it (by suffix: "
                         f"{', '.join(inference.IMAGE_SUFFIXES)}).")
      self.ids = np.array([os.path.relpath(p, self.root) for p in self.paths])
      folders = [os.path.dirname(i) for i in self.ids]
      self.labels = None
      if all(folders) and all(os.sep not in f for f in folders):  # One level of class folders.
        self.classes, self.labels = np.unique(folders, return_inverse=True)
      self.source = None
      return
    from mmsi_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TFDS: a split only)
    name, _, split = spec.partition("/")
    if name not in pipeline.names() or not split:
      raise ValueError(f"--images={spec}: no such directory, nor a dataset split NAME/SPLIT with NAME "
                       f"one of {pipeline.names()} (e.g. glyphs/test).")
    self.location = DATASET_PREFIX + spec
    self.source = pipeline.load_split(name, split, data_dir, decode_images=False)
    records = [(r["label"], r.get("file_name", b"")) for r in self.source]
    self.labels = np.array([label for label, _ in records], np.int64)
    self.ids = np.array([(n.decode() if isinstance(n, bytes) else str(n)) or str(i)
                         for i, (_, n) in enumerate(records)])

  def __len__(self) -> int:
    return len(self.ids)

  def encoded(self, index: int) -> bytes:
    if self.source is None:
      with open(self.paths[index], "rb") as f:
        return f.read()
    return self.source[int(index)]["image"]

  @classmethod
  def of_index(cls, index: dict) -> "ImageSet":
    """The images an index (as `write_index` wrote it) was made of."""
    location = str(index["images"])
    spec = location.removeprefix(DIR_PREFIX).removeprefix(DATASET_PREFIX)
    return cls(spec, str(index["data_dir"]))


def embed(embedder: inference.Embedder, images: ImageSet, batch_size: int = 0) -> np.ndarray:
  """Embeddings [N, D] of `images`, in order."""
  if images.source is None:
    return embedder.embed_files(images.paths, batch_size)
  from mmsi_jax.eval import evaluator  # pylint: disable=g-import-not-at-top
  vectors, _ = evaluator.embed_split(embedder, images.source,
                                     batch_size or embedder.config.data.eval_batch_size,
                                     embedder.transform)
  return vectors


def write_index(path: str, images: ImageSet, vectors: np.ndarray, model: str) -> None:
  """Writes the index (module docstring) to `path`, atomically."""
  arrays = {"ids": images.ids, "vectors": vectors.astype(np.float32),
            "model": np.array(os.path.abspath(model)), "images": np.array(images.location),
            "data_dir": np.array(os.path.abspath(images.data_dir))}
  if images.labels is not None:
    arrays["labels"] = np.asarray(images.labels, np.int64)
  if images.classes is not None:
    arrays["classes"] = images.classes
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = f"{path}.partial"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)
  os.replace(partial, path)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.embed", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="A run's workdir, or a model exported by python -m mmsi_jax.export.")
  parser.add_argument("--images", required=True,
                      help="A directory of images, or a prepared dataset split NAME/SPLIT.")
  parser.add_argument("--out", required=True, help="The index to write (.npz).")
  parser.add_argument("--data_dir", default=None,
                      help="Where the prepared datasets are (default: the run's data.data_dir).")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="Images per embedding call (default: the run's data.eval_batch_size).")
  args = parser.parse_args(argv)
  try:
    embedder = inference.load(args.workdir)
    images = ImageSet(args.images, args.data_dir or embedder.config.data.data_dir)
    vectors = embed(embedder, images, args.batch_size)
    write_index(args.out, images, vectors, args.workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  labelled = "" if images.labels is None else f", {len(np.unique(images.labels))} classes"
  print(f"Wrote {args.out}: {len(vectors)} embeddings of {vectors.shape[1]} dimensions{labelled}, "
        f"from {images.location}.")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
