"""One evaluation of a model on a split: embed it, compute the retrieval metrics (and NMI), draw the
figures. The train loop calls `Evaluator.evaluate` with the current parameters."""

import os
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
from PIL import Image

from mmsi_jax.data import pipeline, transforms
from mmsi_jax.eval import figures
from mmsi_jax.eval.clustering import nmi
from mmsi_jax.eval.retrieval import nearest_neighbors, retrieval_metrics
from mmsi_jax.models.embedding import l2_normalize


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
    """The metrics of raw pixels (box-downsampled to config.eval.baseline_side)."""
    side = self.config.eval.baseline_side
    return self.evaluate(lambda images: raw_pixels(images, side), prefix, 0, figures_name=prefix,
                         method=f"raw pixels ({side} px)")

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
