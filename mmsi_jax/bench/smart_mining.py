"""Smart Mining's refresh search at SOP's training size against faiss's exact search, in the same run.

    python -m mmsi_jax.bench smart_mining --json smart_mining.json

A refresh (batch_policies/smart_mining.py) finds, for every sample of the training split, its `neighbors` nearest
samples of other classes and its nearest positive, exactly (eval/retrieval.py, blockwise on the device).
The baseline gives the same lists with faiss-cpu (IndexFlatIP, exact): it searches k + the largest
class's size - 1 nearest, drops the sample itself and its own class (which cannot hold more), and finds
the nearest positive of each sample with NumPy, class by class. Both run on the same random unit
embeddings (by default 59,551 x 512 over 11,318 classes, SOP's training split), timed in turn round
after round (the first round warms up, medians over the rest); `lists_agree` is the share of samples
whose lists are identical. faiss-cpu is a benchmark-only dependency: `pip install faiss-cpu`.
"""

import argparse
import importlib.util
import os

import numpy as np

from mmsi_jax.bench import timing
from mmsi_jax.bench.eval import random_split
from mmsi_jax.eval.retrieval import nearest_by_class


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--num-embeddings", type=int, default=59_551)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--num-classes", type=int, default=11_318)
  parser.add_argument("--neighbors", type=int, default=64, help="k, the list of other-class samples")
  parser.add_argument("--chunk-size", type=int, default=1024, help="the search's block side")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  parser.add_argument("--seed", type=int, default=0)


def refresh_lists(embeddings, labels, neighbors: int, chunk_size: int):
  """What a refresh searches: other-class lists [N, k] and the nearest positive [N]."""
  _, negatives = nearest_by_class(embeddings, labels, neighbors, same_class=False,
                                  chunk_size=chunk_size)
  _, positive = nearest_by_class(embeddings, labels, 1, same_class=True)
  return negatives, positive[:, 0]


def faiss_lists(embeddings, labels, neighbors: int):
  """The same lists from faiss's exact search and a NumPy pass over each class."""
  import faiss  # Imported here: the benchmark's only dependency outside requirements.txt.

  _, class_ids, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
  index = faiss.IndexFlatIP(embeddings.shape[1])
  index.add(embeddings)
  _, found = index.search(embeddings, neighbors + int(class_sizes.max()))
  other = labels[found] != labels[:, None]  # Drops the sample itself and its class.
  order = np.argsort(~other, axis=1, kind="stable")[:, :neighbors]
  negatives = np.take_along_axis(np.where(other, found, -1), order, axis=1)
  positive = np.full(len(labels), -1, np.int64)
  members = np.split(np.argsort(class_ids, kind="stable"), np.cumsum(class_sizes)[:-1])
  for rows in members:
    if len(rows) > 1:
      sim = embeddings[rows] @ embeddings[rows].T
      np.fill_diagonal(sim, -np.inf)
      positive[rows] = rows[np.argmax(sim, axis=1)]
  return negatives, positive


def run(args: argparse.Namespace) -> dict:
  if importlib.util.find_spec("faiss") is None:
    raise SystemExit("The smart_mining benchmark compares with faiss-cpu, which is not installed "
                     "(a benchmark-only dependency): pip install faiss-cpu")
  embeddings, labels = random_split(args.num_embeddings, args.dim, args.num_classes, args.seed)
  results = {}

  def call(name, fn):
    def timed():
      results[name] = fn()
      return results[name]
    return timed

  load_before = os.getloadavg()[0]
  seconds = timing.time_interleaved({
      "refresh": call("refresh", lambda: refresh_lists(embeddings, labels, args.neighbors,
                                                       args.chunk_size)),
      "faiss": call("faiss", lambda: faiss_lists(embeddings, labels, args.neighbors)),
  }, repeats=args.repeats, warmup=1)
  ours, theirs = results["refresh"], results["faiss"]
  agree = np.all(ours[0] == theirs[0], axis=1) & (ours[1] == theirs[1])
  return {"num_embeddings": args.num_embeddings, "dim": args.dim, "num_classes": args.num_classes,
          "neighbors": args.neighbors, "chunk_size": args.chunk_size, "repeats": args.repeats,
          "refresh_search_s": seconds["refresh"], "faiss_s": seconds["faiss"],
          "time_ratio": seconds["refresh"] / seconds["faiss"], "lists_agree": float(agree.mean()),
          "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
