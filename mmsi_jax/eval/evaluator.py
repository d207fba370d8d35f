"""One evaluation of a model on a split: embed it, compute the retrieval metrics (and NMI), draw the
figures. The train loop calls `Evaluator.evaluate` with the current parameters, and once per run
`Evaluator.raw_pixel_baseline`, whose results are kept beside the dataset (`BASELINE_CACHE`)."""

import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Optional

import jax
import matplotlib
import ml_collections
import numpy as np
import PIL
from PIL import Image

from mmsi_jax.data import pipeline, transforms
from mmsi_jax.eval import clustering, figures, retrieval
from mmsi_jax.eval.clustering import nmi
from mmsi_jax.eval.retrieval import nearest_neighbors, retrieval_metrics
from mmsi_jax.models.embedding import l2_normalize

# The raw-pixel baselines computed so far, in <data.data_dir>/BASELINE_CACHE/<key>/ (see
# Evaluator.raw_pixel_baseline).
BASELINE_CACHE = "raw_pixel_baselines"


def make_embed_fn(model, normalization: str = "symmetric", features: bool = False) -> Callable:
  """Jitted `(model params, batch_stats, images uint8) -> embeddings [N, D]` in inference mode; with
  `features`, the backbone's features [N, F], L2-normalised, instead (no embedding head)."""
  @jax.jit
  def embed(params, batch_stats, images):
    variables = {"params": params, "batch_stats": batch_stats}
    images = transforms.normalize(images, normalization)
    if features:
      return l2_normalize(model.apply(variables, images, train=False, method=model.features))
    return model.apply(variables, images, train=False)
  return embed


def embed_split(embed: Callable, source, batch_size: int,
                transform: Callable = transforms.decode_image) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings [N, D] and labels [N] of a whole split, in order; `embed(images) -> [B, D]`;
  `transform(encoded image) -> [H, W, 3] uint8` is the test transform."""
  outputs, labels = [], []
  for batch in pipeline.eval_batches(source, batch_size, transform):
    mask = batch["mask"]
    outputs.append(np.asarray(embed(batch["images"]))[mask])
    labels.append(batch["labels"][mask])
  return np.concatenate(outputs), np.concatenate(labels)


def raw_pixels(images, max_side: int) -> np.ndarray:
  """The raw-pixel baseline's embedding: pixels of images [N, H, W, 3] box-downsampled to at most
  max_side x max_side (so that it fits in memory on large test sets), flattened, L2-normalised."""
  images = np.asarray(images)
  if max(images.shape[1:3]) > max_side:
    images = np.stack([np.asarray(Image.fromarray(image).resize((max_side, max_side), Image.BOX))
                       for image in images])
  flat = images.astype(np.float32).reshape(len(images), -1)
  return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def split_fingerprint(source, chunk: int = 1024) -> str:
  """SHA-256 of a split's encoded images and labels, in order: everything of the split that an
  evaluation reads."""
  digest = hashlib.sha256()
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      digest.update(hashlib.sha256(record["image"]).digest())
      digest.update(int(record["label"]).to_bytes(8, "little", signed=True))
  return digest.hexdigest()


@functools.cache
def _evaluation_code_fingerprint() -> str:
  """SHA-256 of the code that computes an evaluation (this module, the metrics, the figures, the test
  transforms) and the versions of the libraries it calls: a cached result of other code is not read."""
  digest = hashlib.sha256()
  for module in (sys.modules[__name__], retrieval, clustering, figures, transforms):
    digest.update(inspect.getsource(module).encode())
  for version in (jax.__version__, np.__version__, PIL.__version__, matplotlib.__version__):
    digest.update(version.encode())
  return digest.hexdigest()


class Evaluator:
  """Evaluates embeddings of one split queried against itself.

  Args:
    config: the run's config (data.*, eval.*, seed).
    source: the split, images encoded (pipeline.load_split(..., decode_images=False)).
    figures_dir: where figures go (<figures_dir>/<name>_grid.png, _recall.png); None: no figures.
    method: what is evaluated, named in the figures' titles (e.g. "small_cnn + multi_similarity").
    write_image: also receives each figure, (tag, [H, W, 3] uint8, step) (e.g. TensorBoard's).
    split: the split's name in the figures' titles (default: data.name/data.test_split).
  """

  def __init__(self, config: ml_collections.ConfigDict, source, figures_dir: Optional[str],
               method: str = "", write_image: Optional[Callable] = None, split: str = ""):
    self.config = config
    self.source = source
    self.split = split or f"{config.data.name}/{config.data.test_split}"
    self.figures_dir = figures_dir
    self.method = method
    self.write_image = write_image
    self.transform = transforms.test_transform(config.data)

  def evaluate(self, embed: Callable, prefix: str, step: int, figures_name: Optional[str] = None,
               method: Optional[str] = None) -> dict:
    """Metrics keyed "<prefix>/<metric>": retrieval metrics, and NMI when config.eval.nmi; with a
    figures_dir, also draws the retrieval grid and the Recall@K curve of `method` (default: the
    evaluator's) after `step` steps, into <figures_dir>/<figures_name (default step_<step>)>_grid.png
    and _recall.png."""
    config = self.config
    embeddings, labels = embed_split(embed, self.source, config.data.eval_batch_size, self.transform)
    ks = tuple(config.eval.ks)
    metrics = retrieval_metrics(embeddings, labels, ks=ks, chunk_size=config.eval.chunk_size)
    if config.eval.nmi:
      metrics["nmi"] = nmi(embeddings, labels, seed=config.seed)
    if self.figures_dir:
      name = figures_name or f"step_{step:06d}"
      caption = ", ".join(p for p in (method or self.method, f"step {step}") if p)
      curve = figures.recall_curve(ks, [metrics[f"recall@{k}"] for k in ks],
                                   title=f"{caption}: Recall@K on {self.split}")
      grid = self.retrieval_grid(embeddings, labels, title=f"{caption}: nearest images on {self.split}")
      os.makedirs(self.figures_dir, exist_ok=True)
      path = os.path.join(self.figures_dir, name)
      curve.savefig(f"{path}_recall.png")
      grid.save(f"{path}_grid.png")
      if self.write_image:
        self.write_image(f"{prefix}/retrieval_grid", np.asarray(grid), step)
        self.write_image(f"{prefix}/recall_at_k",
                         np.asarray(Image.open(f"{path}_recall.png").convert("RGB")), step)
    return {f"{prefix}/{k}": v for k, v in metrics.items() if not k.startswith("num_")}

  def raw_pixel_baseline(self, prefix: str = "baseline") -> dict:
    """The metrics of raw pixels (box-downsampled to config.eval.baseline_side), as `evaluate`'s, and
    their figures <prefix>_grid.png and _recall.png.

    Nothing a run trains enters them: they are computed once for what they depend on, `baseline_key`
    (the split's encoded images and labels, the test transform, the eval settings, the code), and kept
    in <data.data_dir>/raw_pixel_baselines/<SHA-256 of the key>/ (metrics.json, the figures, key.json);
    every later run reads them there, the same numbers and figures as computing them again. Where
    data.data_dir cannot be written, each run computes them.
    """
    side = self.config.eval.baseline_side
    method = f"raw pixels ({side} px)"

    def compute(evaluator, prefix):
      return evaluator.evaluate(lambda images: raw_pixels(images, side), prefix, 0,
                                figures_name=prefix, method=method)

    key = self.baseline_key()
    cache = os.path.join(os.path.expanduser(self.config.data.data_dir), BASELINE_CACHE)
    entry = os.path.join(cache, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest())
    if not os.path.exists(entry):
      try:
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache, prefix=".computing_")
      except OSError:  # Not writable: no cache.
        return compute(self, prefix)
      try:
        metrics = compute(Evaluator(self.config, self.source, staging, split=self.split), "baseline")
        with open(os.path.join(staging, "key.json"), "w") as f:
          json.dump(key, f, indent=1)
        with open(os.path.join(staging, "metrics.json"), "w") as f:
          json.dump({k.split("/", 1)[1]: v for k, v in metrics.items()}, f, indent=1)
        os.rename(staging, entry)  # Whole or not at all.
      except OSError:
        if not os.path.exists(entry):
          raise
        # Another process stored it first: the same results.
      finally:
        shutil.rmtree(staging, ignore_errors=True)
    with open(os.path.join(entry, "metrics.json")) as f:
      metrics = {f"{prefix}/{k}": v for k, v in json.load(f).items()}
    if self.figures_dir:
      os.makedirs(self.figures_dir, exist_ok=True)
      for figure in ("grid", "recall"):
        shutil.copyfile(os.path.join(entry, f"baseline_{figure}.png"),
                        os.path.join(self.figures_dir, f"{prefix}_{figure}.png"))
    if self.write_image:
      for tag, figure in (("retrieval_grid", "grid"), ("recall_at_k", "recall")):
        image = Image.open(os.path.join(entry, f"baseline_{figure}.png")).convert("RGB")
        self.write_image(f"{prefix}/{tag}", np.asarray(image), 0)
    return metrics

  def baseline_key(self) -> dict:
    """What the raw-pixel baseline depends on. (Not eval.chunk_size nor the device count, which do not
    change the metrics: eval/retrieval.py.)"""
    config = self.config
    return {"split": split_fingerprint(self.source), "split_name": self.split,
            "test_transform": repr(self.transform), "baseline_side": config.eval.baseline_side,
            "ks": list(config.eval.ks), "nmi_seed": config.seed if config.eval.nmi else None,
            "grid": [config.eval.grid_queries, config.eval.grid_results],
            "backend": jax.default_backend(), "code": _evaluation_code_fingerprint()}

  def retrieval_grid(self, embeddings: np.ndarray, labels: np.ndarray, title: str = "") -> Image.Image:
    """The grid of config.eval.grid_queries queries spread over the split, each with its
    config.eval.grid_results nearest other images, right (same label) or wrong, under `title`."""
    config = self.config
    queries = np.linspace(0, len(labels) - 1, config.eval.grid_queries).astype(np.int64)
    _, neighbors = nearest_neighbors(embeddings[queries], embeddings, config.eval.grid_results,
                                     query_ids=queries)

    def images(indices):
      return np.stack([self.transform(self.source[int(i)]["image"]) for i in indices])

    return figures.retrieval_grid(images(queries), np.stack([images(row) for row in neighbors]),
                                  labels[neighbors] == labels[queries, None], title=title)
