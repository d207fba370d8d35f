"""Retrieval evaluation at SOP scale: `retrieval_metrics` against faiss exact search plus NumPy metrics.

Both evaluate the same random L2-normalised embeddings (by default 60,502 x 512 over 11,316 classes, the
SOP test split's size), queried against themselves. Each method runs in a process of its own, so that its
peak resident memory (ru_maxrss: the process's whole footprint, inputs included) is its own; the two
processes take turns, one call each per round, and the time is the median over the rounds; the 1-minute
load average before and after the rounds tells what else the machine was running. faiss-cpu
(IndexFlatIP, exact inner-product search) is a benchmark-only dependency: `pip install faiss-cpu`.
"""

import argparse
import importlib.util
import multiprocessing
import os
import resource
import time

import numpy as np

from mmsi_jax.eval import retrieval_metrics

_METHODS = ("retrieval_metrics", "faiss_numpy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--num-embeddings", type=int, default=60_502)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--num-classes", type=int, default=11_316)
  parser.add_argument("--ks", default="1,10,100,1000", help="the K of Recall@K (SOP's by default)")
  parser.add_argument("--chunk-size", type=int, default=1024, help="retrieval_metrics' chunk_size")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed rounds (median), after one warm-up round")
  parser.add_argument("--seed", type=int, default=0)


def random_split(num_embeddings: int, dim: int, num_classes: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised Gaussian embeddings [N, dim] float32, labels [N] over classes of near-equal size."""
  rng = np.random.default_rng(seed)
  embeddings = rng.standard_normal((num_embeddings, dim), dtype=np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  labels = rng.permutation(np.arange(num_embeddings) % num_classes)
  return embeddings, labels


def faiss_numpy_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: tuple) -> dict:
  """The same metrics from faiss's exact top-k (self-match dropped), computed with NumPy."""
  import faiss  # Imported here: the benchmark's only dependency outside requirements.txt.

  _, class_ids, class_sizes = np.unique(labels, return_inverse=True, return_counts=True)
  num_relevant = class_sizes[class_ids] - 1
  depth = max(max(ks), int(num_relevant.max()))
  index = faiss.IndexFlatIP(embeddings.shape[1])
  index.add(embeddings)
  _, neighbors = index.search(embeddings, depth + 1)
  is_self = neighbors == np.arange(len(embeddings))[:, None]
  neighbors = np.take_along_axis(neighbors, np.argsort(is_self, axis=1, kind="stable"), axis=1)
  relevant = labels[neighbors[:, :depth]] == labels[:, None]

  scored = num_relevant > 0
  relevant, num_relevant = relevant[scored], num_relevant[scored]
  first_hit_rank = np.where(relevant.any(axis=1), relevant.argmax(axis=1), depth)
  hits = relevant & (np.arange(depth)[None, :] < num_relevant[:, None])
  precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, depth + 1)
  metrics = {f"recall@{k}": float(np.mean(first_hit_rank < k)) for k in ks}
  metrics["precision@1"] = float(np.mean(first_hit_rank == 0))
  metrics["r_precision"] = float(np.mean(hits.sum(axis=1) / num_relevant))
  metrics["map@r"] = float(np.mean(np.sum(precision_at_i * hits, axis=1) / num_relevant))
  return metrics


_worker_inputs = {}


def _load_inputs(args: argparse.Namespace, ks: tuple) -> None:
  """A worker process's inputs, made once when it starts."""
  embeddings, labels = random_split(args.num_embeddings, args.dim, args.num_classes, args.seed)
  _worker_inputs.update(embeddings=embeddings, labels=labels, ks=ks, chunk_size=args.chunk_size)


def _evaluate(method: str) -> dict:
  inputs = _worker_inputs
  if method == "retrieval_metrics":
    return retrieval_metrics(inputs["embeddings"], inputs["labels"], ks=inputs["ks"],
                             chunk_size=inputs["chunk_size"])
  return faiss_numpy_metrics(inputs["embeddings"], inputs["labels"], inputs["ks"])


def _timed_evaluation(method: str) -> tuple[float, dict, float]:
  """Seconds of one evaluation, its metrics, and the worker's peak resident memory so far (MB)."""
  start = time.perf_counter()
  metrics = _evaluate(method)
  seconds = time.perf_counter() - start
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return seconds, {k: v for k, v in metrics.items() if not k.startswith("num_")}, peak_mb


def run(args: argparse.Namespace) -> dict:
  if importlib.util.find_spec("faiss") is None:
    raise SystemExit("The eval benchmark compares with faiss-cpu, which is not installed "
                     "(a benchmark-only dependency): pip install faiss-cpu")
  ks = tuple(int(k) for k in args.ks.split(","))
  context = multiprocessing.get_context("spawn")
  workers = {m: context.Pool(1, initializer=_load_inputs, initargs=(args, ks)) for m in _METHODS}
  load_before = os.getloadavg()[0]
  try:  # Rounds alternate the methods, so that both meet the same load; the first round warms up.
    rounds = [{m: workers[m].apply(_timed_evaluation, (m,)) for m in _METHODS}
              for _ in range(args.repeats + 1)][1:]
  finally:
    for worker in workers.values():
      worker.close()
      worker.join()
  load_after = os.getloadavg()[0]
  seconds = {m: float(np.median([r[m][0] for r in rounds])) for m in _METHODS}
  _, ours, ours_peak_mb = rounds[-1]["retrieval_metrics"]
  _, baseline, baseline_peak_mb = rounds[-1]["faiss_numpy"]
  figures = {"num_embeddings": args.num_embeddings, "dim": args.dim, "num_classes": args.num_classes,
             "ks": args.ks, "chunk_size": args.chunk_size, "repeats": args.repeats,
             "retrieval_metrics_s": seconds["retrieval_metrics"], "faiss_numpy_s": seconds["faiss_numpy"],
             "time_ratio": seconds["retrieval_metrics"] / seconds["faiss_numpy"],
             "retrieval_metrics_peak_rss_mb": ours_peak_mb, "faiss_numpy_peak_rss_mb": baseline_peak_mb,
             "peak_rss_ratio": ours_peak_mb / baseline_peak_mb,
             "max_metric_difference": max(abs(ours[k] - baseline[k]) for k in baseline),
             "retrieval_metrics_rounds_s": [round(r["retrieval_metrics"][0], 2) for r in rounds],
             "faiss_numpy_rounds_s": [round(r["faiss_numpy"][0], 2) for r in rounds],
             "load_average_before": load_before, "load_average_after": load_after}
  figures.update({f"metric/{k}": v for k, v in ours.items()})
  return figures
