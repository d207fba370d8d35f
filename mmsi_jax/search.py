"""The nearest images of queries in an index of mmsi_jax.embed, printed and drawn:

    python -m mmsi_jax.search --index=index.npz --query=IMAGE_OR_DIR --k=10 [--figure=search.png]

Each query image (a file, or every image under a directory) is embedded by the index's model
(--model: another path to the same model, e.g. its export), and its k nearest index entries by cosine
similarity are found exactly, on the device, one block of similarities at a time as the evaluator
finds them (eval/retrieval.py, `nearest_neighbors`). Each query prints its neighbours' ids, similarities
and classes where the index knows them; the figure shows each query beside its neighbours, framed
green or red where both the query's class (its subdirectory's name) and the neighbour's are known and
agree or differ.
"""

import argparse
import os
import pathlib
import sys
import zipfile

import numpy as np

from mmsi_jax import embed as embed_lib
from mmsi_jax import inference


def read_index(path: str) -> dict:
  """The arrays of an index written by mmsi_jax.embed (read with allow_pickle=False)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      index = {k: f[k] for k in f.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ValueError(f"--index={path} is not a readable .npz ({type(e).__name__}: {e}); write it "
                     f"with python -m mmsi_jax.embed.") from None
  missing = {"ids", "vectors", "model", "images", "data_dir"} - set(index)
  if missing:
    raise ValueError(f"--index={path} is not an index of mmsi_jax.embed (it lacks {sorted(missing)}).")
  return index


def class_names(index: dict) -> list[str] | None:
  """Each index entry's class name (or label), or None where the index has no labels."""
  if "labels" not in index:
    return None
  if "classes" in index:
    return [str(index["classes"][label]) for label in index["labels"]]
  return [str(label) for label in index["labels"]]


def draw(query_images: list, query_names: list[str], query_classes: list, results: list[list],
         result_names: list[list[str]], result_classes: list[list], similarities: np.ndarray, path: str):
  """Writes a figure to `path`: one row per query, the query then its results, each titled with its
  name (and similarity); a result framed green/red where its class and the query's are known and
  agree/differ."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, columns = len(query_images), 1 + similarities.shape[1]
  fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
  for row in range(rows):
    cells = [(query_images[row], f"query\n{query_names[row]}", "tab:blue")]
    for col, image in enumerate(results[row]):
      known = query_classes[row] is not None and result_classes[row][col] is not None
      colour = ("tab:green" if result_classes[row][col] == query_classes[row] else "tab:red"
                ) if known else "0.6"
      cells.append((image, f"{similarities[row, col]:.3f}\n{result_names[row][col]}", colour))
    for ax, (image, title, colour) in zip(axes[row], cells):
      ax.imshow(image)
      ax.set_title(title, fontsize=6)
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_color(colour)
        spine.set_linewidth(3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _short(name: str, width: int = 18) -> str:
  return name if len(name) <= width else "..." + name[-(width - 3):]


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.search", description=__doc__.split("\n")[0])
  parser.add_argument("--index", required=True, help="An index written by python -m mmsi_jax.embed.")
  parser.add_argument("--query", required=True, help="An image file, or a directory of images.")
  parser.add_argument("--k", type=int, default=10, help="Neighbours per query.")
  parser.add_argument("--model", default=None, help="The model (default: the index's).")
  parser.add_argument("--figure", default="search.png", help="Where to draw the results ('' : not).")
  parser.add_argument("--chunk_size", type=int, default=1024, help="The side of a block of similarities.")
  args = parser.parse_args(argv)
  from mmsi_jax.eval import retrieval  # pylint: disable=g-import-not-at-top  (JAX: after the flags)
  try:
    index = read_index(args.index)
    embedder = inference.load(args.model or str(index["model"]))
    if os.path.isdir(args.query):
      queries = embed_lib.ImageSet(args.query, str(index["data_dir"]))
    elif os.path.isfile(args.query):
      queries = None
    else:
      raise ValueError(f"--query={args.query}: no such image file or directory.")
    paths = queries.paths if queries is not None else [args.query]
    names = list(queries.ids) if queries is not None else [os.path.basename(args.query)]
    vectors = embedder.embed_files(paths)
    if vectors.shape[1] != index["vectors"].shape[1]:
      raise ValueError(f"The model embeds in {vectors.shape[1]} dimensions, the index's vectors have "
                       f"{index['vectors'].shape[1]}: pass the index's own model (--model).")
    if not 0 < args.k <= len(index["ids"]):
      raise ValueError(f"--k={args.k} must be in [1, {len(index['ids'])}] (the index's size).")
    similarities, neighbors = retrieval.nearest_neighbors(vectors, index["vectors"], args.k,
                                                          chunk_size=args.chunk_size)
  except (ValueError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1

  index_classes = class_names(index)
  query_classes = [None] * len(paths)
  if queries is not None and queries.classes is not None:
    query_classes = [str(queries.classes[label]) for label in queries.labels]
  for name, row_sim, row in zip(names, similarities, neighbors):
    print(f"{name}:")
    for rank, (sim, i) in enumerate(zip(row_sim, row), 1):
      label = "" if index_classes is None else f"  class {index_classes[i]}"
      print(f"  {rank:3d}. {sim:.4f}  {index['ids'][i]}{label}")
  if args.figure:
    from mmsi_jax.data import transforms  # pylint: disable=g-import-not-at-top
    gallery = embed_lib.ImageSet.of_index(index)
    draw([transforms.decode_image(pathlib.Path(p).read_bytes()) for p in paths], [_short(n) for n in names],
         query_classes,
         [[transforms.decode_image(gallery.encoded(i)) for i in row] for row in neighbors],
         [[_short(str(index["ids"][i])) for i in row] for row in neighbors],
         [[None if index_classes is None else index_classes[i] for i in row] for row in neighbors],
         similarities, args.figure)
    print(f"Drew {args.figure}.")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
